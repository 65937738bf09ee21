"""Autoregressive generation through the MLA latent cache: a jitted prefill, a jitted decode.

Two compiled programs per shape:
- *prefill* runs the prompt through the absorbed-MLA path, writing its latents into the
  cache, and picks the first new token;
- *decode* is a ``lax.scan`` of one-token steps over that cache (donated): each step reads
  only ``c_kv`` and the RoPE key of earlier tokens, never re-expanding them per head.

Decode is bound by weight reads at small batch. In a ``scan`` over stacked layers XLA:CPU
copies each layer's weights out of the stack at every step (a dynamic slice feeding a dot:
3-5x a bare matvec in isolation, about 10 % of a ``bench-small`` decode step), so by
default the decoder runs the layers unrolled over per-layer copies of the weights (made
once per ``Generator``: twice the layer memory while it lives). ``unroll=False`` keeps the
scanned ``Transformer.decode``; it is the default for a model on a mesh.

Shape letters: B batch, T positions, D hidden, V vocab, N generated steps (not nope dim).
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

import deepseek_jax.backends as backends
from deepseek_jax.mla import LatentCache
from deepseek_jax.model import Transformer


class UnrolledDecoder(nnx.Module):
    """``Transformer.decode`` with the stacked layers split into separate per-layer blocks."""

    def __init__(self, model: Transformer):
        self.cfg, self.dtype = model.cfg, model.dtype
        self.embed_tokens, self.norm, self.lm_head = model.embed_tokens, model.norm, model.lm_head
        self.layers = nnx.List(_split(model.dense_layers) + _split(model.moe_layers))

    def init_cache(self, batch: int, max_len: int) -> list[LatentCache]:
        return [LatentCache.init(batch, max_len, self.cfg, self.dtype) for _ in self.layers]

    def decode(
        self, ids_BT: Int[Array, "B T"], cache: list[LatentCache], cache_index: Int[Array, ""]
    ) -> tuple[Float[Array, "B T V"], list[LatentCache]]:
        positions_BT = cache_index + jnp.broadcast_to(jnp.arange(ids_BT.shape[1]), ids_BT.shape)
        x_BTD = self.embed_tokens(ids_BT)
        new = []
        for layer, c in zip(self.layers, cache, strict=True):
            x_BTD, c = layer.decode(x_BTD, positions_BT, c, cache_index)
            new.append(c)
        x_BTD = self.norm(x_BTD).astype(self.dtype)
        logits_BTV = jnp.einsum(
            "btd,dv->btv",
            x_BTD,
            self.lm_head[...].astype(self.dtype),
            preferred_element_type=jnp.float32,
        )
        return logits_BTV, new


def _split(stacked) -> list:
    if stacked is None:
        return []
    graphdef, state = nnx.split(stacked)
    n = jax.tree.leaves(state)[0].shape[0]
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(n)]


# ------------------------------------------------------------------------------ sampling


def _pick(logits_BV, key, temperature: float, top_k: int, top_p: float):
    """Greedy at temperature 0; else sample from the top-k / nucleus (top-p) tokens."""
    if temperature <= 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
    if top_p < 1.0:
        desc_BV = -jnp.sort(-logits_BV, axis=-1)
        probs_BV = jax.nn.softmax(desc_BV, axis=-1)
        keep_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p  # the best is always kept
        cut_B1 = jnp.min(jnp.where(keep_BV, desc_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cut_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------------------ programs


@partial(jax.jit, static_argnames=("graphdef", "max_len", "temperature", "top_k", "top_p"))
@backends.forward_only
def _prefill(
    graphdef, state, prompt_BT, key, *, max_len: int, temperature: float, top_k: int, top_p: float
):
    """Prompt -> (first new token, cache holding the prompt, key)."""
    dec = nnx.merge(graphdef, state)
    cache = dec.init_cache(prompt_BT.shape[0], max_len)
    logits_BTV, cache = dec.decode(prompt_BT, cache, jnp.int32(0))
    key, sub = jax.random.split(key)
    return _pick(logits_BTV[:, -1], sub, temperature, top_k, top_p), cache, key


@partial(jax.jit, static_argnames=("graphdef", "steps", "temperature", "top_k", "top_p"))
@backends.forward_only
def _decode(
    graphdef,
    state,
    first_B,
    cache,
    key,
    start,
    *,
    steps: int,
    temperature: float,
    top_k: int,
    top_p: float,
):
    """``steps`` tokens after ``first_B`` (which sits at position ``start``): [B, steps]."""

    def step(carry, i):
        tok_B, cache, key = carry
        dec = nnx.merge(graphdef, state, copy=True)  # Variables of this trace level
        logits_B1V, cache = dec.decode(tok_B[:, None], cache, start + i)
        key, sub = jax.random.split(key)
        nxt_B = _pick(logits_B1V[:, 0], sub, temperature, top_k, top_p)
        return (nxt_B, cache, key), nxt_B

    _, rest_NB = jax.lax.scan(step, (first_B, cache, key), jnp.arange(steps))
    return rest_NB.T


@dataclasses.dataclass(frozen=True)
class Generation:
    tokens: np.ndarray  # int32 [B, N], the new tokens
    prefill_s: float  # wall time of the prefill program (prompt + first token)
    decode_s: float  # wall time of the decode program (the other N - 1 tokens)
    compile_s: float  # compiling both programs (0 when this shape was compiled before)
    cache_bytes_per_token: int  # latent cache per token and sequence, all layers

    def rates(self, prompt_len: int) -> dict[str, float]:
        B, N = self.tokens.shape
        return {
            "prefill_tokens_per_s": B * prompt_len / self.prefill_s,
            "decode_tokens_per_s": B * (N - 1) / self.decode_s if N > 1 else float("nan"),
        }


class Generator:
    """Prefill and decode compiled ahead of time per (batch, prompt length, new tokens)."""

    def __init__(
        self,
        model: Transformer,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        unroll: bool | None = None,
    ):
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0 or temperature < 0:
            raise ValueError(f"top_k and temperature must be >= 0, got {top_k}, {temperature}")
        self.cfg = model.cfg
        if unroll is None:
            unroll = jax.typeof(model.lm_head[...]).sharding.mesh.empty
        self.graphdef, self.state = nnx.split(UnrolledDecoder(model) if unroll else model)
        self.sampling = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
        self._programs: dict[tuple[int, int, int], tuple] = {}

    def compile(self, batch: int, prompt_len: int, new_tokens: int) -> float:
        """Compiles both programs for this shape (once); returns the seconds it took."""
        shape = (batch, prompt_len, new_tokens)
        if shape in self._programs:
            return 0.0
        t0 = time.perf_counter()
        g, st, kw = self.graphdef, self.state, self.sampling
        prompt = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)
        key = jax.eval_shape(lambda: jax.random.key(0))
        pre_args = (prompt, key)
        pre = _prefill.lower(g, st, *pre_args, max_len=prompt_len + new_tokens, **kw).compile()
        first, cache, key = jax.eval_shape(
            lambda s, p, k: _prefill(g, s, p, k, max_len=prompt_len + new_tokens, **kw),
            st,
            *pre_args,
        )
        start = jax.ShapeDtypeStruct((), jnp.int32)
        dec = _decode.lower(g, st, first, cache, key, start, steps=new_tokens - 1, **kw).compile()
        self._programs[shape] = (pre, dec)
        return time.perf_counter() - t0

    def __call__(
        self, prompt_BT: Int[Array, "B T"], new_tokens: int, *, seed: int = 0
    ) -> Generation:
        B, T = prompt_BT.shape
        if new_tokens < 1:
            raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
        if T + new_tokens > self.cfg.max_position_embeddings:
            raise ValueError(
                f"prompt ({T}) + new tokens ({new_tokens}) exceed "
                f"max_position_embeddings ({self.cfg.max_position_embeddings})"
            )
        compile_s = self.compile(B, T, new_tokens)
        prefill, decode = self._programs[(B, T, new_tokens)]
        prompt_BT = jax.block_until_ready(jnp.asarray(prompt_BT, jnp.int32))
        t0 = time.perf_counter()
        first_B, cache, key = prefill(self.state, prompt_BT, jax.random.key(seed))
        first_B.block_until_ready()
        t1 = time.perf_counter()
        rest_BN = decode(self.state, first_B, cache, key, jnp.int32(T))
        rest_BN = np.asarray(rest_BN)
        t2 = time.perf_counter()
        per_token = sum(x.nbytes for x in jax.tree.leaves(cache)) // (B * (T + new_tokens))
        tokens = np.concatenate([np.asarray(first_B)[:, None], rest_BN], axis=1)
        return Generation(tokens.astype(np.int32), t1 - t0, t2 - t1, compile_s, int(per_token))


def generate(
    model: Transformer,
    prompt_BT: Int[Array, "B T"],
    new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> Int[Array, "B N"]:
    """``new_tokens`` tokens after each prompt row (greedy when temperature is 0)."""
    gen = Generator(model, temperature=temperature, top_k=top_k, top_p=top_p)
    return jnp.asarray(gen(prompt_BT, new_tokens, seed=seed).tokens)
