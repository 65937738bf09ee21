"""Autoregressive generation through the MLA latent-cache decode path.

One jitted prefill writes the prompt into the cache; one jitted ``lax.scan`` then decodes
token by token (absorbed attention: the cache is never re-expanded to per-head keys).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Int

from deepseek_jax.model import Transformer


def _pick(logits_BV, key, temperature: float, top_k: int):
    if temperature <= 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if top_k:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "new_tokens", "temperature", "top_k"))
def _generate(graphdef, state, prompt_BT, key, *, new_tokens: int, temperature: float,
              top_k: int):
    model = nnx.merge(graphdef, state)
    B, T = prompt_BT.shape
    cache = model.init_cache(B, T + new_tokens)
    logits_BTV, cache = model.decode(prompt_BT, cache, jnp.int32(0))
    key, sub = jax.random.split(key)
    first_B = _pick(logits_BTV[:, -1], sub, temperature, top_k)

    def step(carry, i):
        tok_B, cache, key = carry  # tok_B sits at position T + i
        step_model = nnx.merge(graphdef, state, copy=True)  # Variables of this trace level
        logits_B1V, cache = step_model.decode(tok_B[:, None], cache, T + i)
        key, sub = jax.random.split(key)
        nxt_B = _pick(logits_B1V[:, 0], sub, temperature, top_k)
        return (nxt_B, cache, key), nxt_B

    _, rest_NB = jax.lax.scan(step, (first_B, cache, key), jnp.arange(new_tokens - 1))
    return jnp.concatenate([first_B[:, None], rest_NB.T], axis=1)


def generate(
    model: Transformer,
    prompt_BT: Int[Array, "B T"],
    new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
) -> Int[Array, "B N"]:
    """``new_tokens`` tokens after each prompt row (greedy when temperature is 0)."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    cfg = model.cfg
    if prompt_BT.shape[1] + new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({prompt_BT.shape[1]}) + new tokens ({new_tokens}) exceed "
                         f"max_position_embeddings ({cfg.max_position_embeddings})")
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, jnp.asarray(prompt_BT, jnp.int32), jax.random.key(seed),
                     new_tokens=new_tokens, temperature=temperature, top_k=top_k)
