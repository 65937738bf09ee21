"""One transformer block: pre-norm MLA, then a dense SwiGLU FFN or a DeepSeekMoE layer.

Shape letters: B batch, T positions, D hidden, L layers, E routed experts.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

import deepseek_jax.backends as backends
import deepseek_jax.overlap as overlap
import deepseek_jax.sharding as sharding
from deepseek_jax.config import LAYER_LOOPS, ModelConfig
from deepseek_jax.fp8 import fp8_mode
from deepseek_jax.layers import MLP, RMSNorm
from deepseek_jax.mla import MLA, LatentCache
from deepseek_jax.moe.layer import MoE, MoEStats, expert_parallel_fits, mesh_of

_log = logging.getLogger(__name__)
_unsplit_logged: set[int] = set()  # batch sizes that ``overlap=dual`` ran unsplit


class Block(nnx.Module):
    """x + MLA(norm(x)), then + FFN(norm(.)); the FFN is dense or MoE."""

    def __init__(self, cfg: ModelConfig, *, moe: bool, rngs: nnx.Rngs):
        self.is_moe = moe
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if moe:
            self.mlp = MoE(cfg, rngs=rngs)
        else:
            self.mlp = MLP(
                cfg.hidden_size,
                cfg.intermediate_size,
                std=cfg.initializer_range,
                dtype=jnp.dtype(cfg.run.dtype),
                rngs=rngs,
                fp8=fp8_mode(cfg),
            )

    def __call__(
        self, x_BTD: Float[Array, "B T D"], positions_BT: Int[Array, "B T"]
    ) -> tuple[Float[Array, "B T D"], MoEStats | None]:
        if self._dual(x_BTD.shape[0]):
            with jax.named_scope("dual_overlap"):
                x_BTD, stats = overlap.dual_block(self, x_BTD, positions_BT)
            return sharding.constrain(x_BTD, ("batch", None, "embed")), stats
        with jax.named_scope("attention"):
            x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), positions_BT)
        with jax.named_scope("moe" if self.is_moe else "mlp"):
            h_BTD = self.post_attention_layernorm(x_BTD)
            stats = None
            if self.is_moe:
                h_BTD, stats = self.mlp(h_BTD)
            else:
                h_BTD = self.mlp(h_BTD)
        x_BTD = sharding.constrain(x_BTD + h_BTD.astype(x_BTD.dtype), ("batch", None, "embed"))
        return x_BTD, stats

    def decode(
        self,
        x_BTD: Float[Array, "B T D"],
        positions_BT: Int[Array, "B T"],
        cache: LatentCache,
        cache_index: Int[Array, ""],
    ) -> tuple[Float[Array, "B T D"], LatentCache]:
        """The block over a latent cache (absorbed MLA); T new tokens at ``cache_index``.
        Forward only: the inference programs that trace it are ``backends.forward_only``."""
        a_BTD, cache = self.self_attn.decode(
            self.input_layernorm(x_BTD), positions_BT, cache, cache_index
        )
        x_BTD = x_BTD + a_BTD
        h_BTD = self.post_attention_layernorm(x_BTD)
        if x_BTD.shape[1] > 1 and self._dual(x_BTD.shape[0]):  # prefill
            h_BTD = overlap.dual_moe(self.mlp, h_BTD)[0]
        else:
            h_BTD = self.mlp(h_BTD)[0] if self.is_moe else self.mlp(h_BTD)
        return x_BTD + h_BTD.astype(x_BTD.dtype), cache

    def _dual(self, batch: int) -> bool:
        """The dual micro-batch schedule (``cfg.run.overlap``) where expert parallelism runs;
        a batch that runs expert-parallel but cannot be halved per device is said once."""
        if not (self.is_moe and self.mlp.cfg.run.overlap in ("dual", "dual_deferred")):
            return False
        if overlap.can_split(self.mlp, batch):
            return True
        if batch not in _unsplit_logged and expert_parallel_fits(mesh_of(()), batch):
            _unsplit_logged.add(batch)
            _log.warning(
                "overlap=dual: a batch of %d sequences cannot be halved on each expert-parallel"
                " device (one sequence per device, or an odd count): the MoE blocks run unsplit",
                batch,
            )
        return False


class StackStats(NamedTuple):
    """Per-MoE-layer statistics of one forward pass, stacked over layers."""

    load_LE: Float[Array, "L E"]
    balance_loss_L: Float[Array, " L"]
    dropped_L: Int[Array, " L"]  # assignments dropped by full EP buffers


def stacked_blocks(cfg: ModelConfig, n: int, *, moe: bool, rngs: nnx.Rngs) -> Block:
    """``n`` blocks with parameters stacked on a leading ``layers`` axis (scanned at use)."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs: nnx.Rngs) -> Block:
        return Block(cfg, moe=moe, rngs=rngs)

    return create(rngs)


def resolve_layer_loop(loop: str) -> str:
    """``auto``: unrolled on CPU, scanned elsewhere (``backends.layer_loop`` says why)."""
    return backends.layer_loop(loop, LAYER_LOOPS)


def run_blocks(
    blocks: Block,
    x_BTD: Float[Array, "B T D"],
    positions_BT: Int[Array, "B T"],
    remat_policy=None,
    remat: bool = False,
    loop: str = "scan",
    open_end: bool = False,
) -> tuple[Float[Array, "B T D"], StackStats | None]:
    """Runs stacked blocks in a scan or unrolled; optional rematerialisation of each block.
    Under ``overlap=dual_deferred`` each MoE block leaves half B's combine to the next one
    (``overlap.dual_block``); ``open_end``: the last one's is returned too, as a third
    value (``overlap.Pending``, for ``overlap.finish`` beside the head), else done here."""
    # A stage-sharded layer axis is gathered first: neither a scan nor unstack slices it.
    blocks = _gather_layers(blocks)
    if blocks._dual(x_BTD.shape[0]) and blocks.mlp.cfg.run.overlap == "dual_deferred":
        x_BTD, stats, pending = _run_deferred(
            blocks, x_BTD, positions_BT, remat_policy if remat else False, loop
        )
        if open_end:
            return x_BTD, stats, pending
        return overlap.finish(blocks.mlp, x_BTD, pending), stats

    def body(x, block):
        return block(x, positions_BT)

    if remat:
        body = nnx.remat(body, policy=remat_policy, prevent_cse=False)
    if resolve_layer_loop(loop) == "unroll":
        x_BTD, stats = _unrolled(body, x_BTD, blocks)
    else:
        x_BTD, stats = _layer_scan(body)(x_BTD, blocks)
    if stats is None:
        return x_BTD, None
    return x_BTD, StackStats(stats.load_E, stats.balance_loss, stats.dropped)


def _layer_scan(body):
    """``body(carry, block)`` scanned over the stacked blocks' leading (``layers``) axis."""

    @nnx.scan(
        in_axes=(nnx.Carry, 0),
        out_axes=(nnx.Carry, 0),
        transform_metadata={nnx.PARTITION_NAME: "layers"},
    )
    def run(carry, block):
        return body(carry, block)

    return run


def _run_deferred(blocks: Block, x_BTD, positions_BT, remat_policy, loop: str):
    """The dual stack with combine(B) deferred block to block (``run_blocks``): the first
    block, which has none to take, runs before the loop over the others. remat_policy:
    False for no rematerialisation. Returns (x_BTD, StackStats, the last Pending)."""

    def body(carry, block):
        x, prev = carry
        x, stats, pending = overlap.dual_block(block, x, positions_BT, prev, defer=True)
        return (x, pending), stats

    if remat_policy is not False:
        body = nnx.remat(body, policy=remat_policy, prevent_cse=False)
    if resolve_layer_loop(loop) == "unroll":
        (x_BTD, pending), stats = _unrolled(body, (x_BTD, None), blocks)
    else:
        # split, not indexing: the backward concatenates the gradients, it pads none
        graphdef, state = nnx.split(blocks)
        leaves, treedef = jax.tree.flatten(state)
        cut = [jnp.split(leaf, [1]) for leaf in leaves]
        first = nnx.merge(graphdef, jax.tree.unflatten(treedef, [c[0][0] for c in cut]))
        carry, stats = body((x_BTD, None), first)
        stats = jax.tree.map(lambda a: a[None], stats)
        if leaves[0].shape[0] > 1:
            rest = nnx.merge(graphdef, jax.tree.unflatten(treedef, [c[1] for c in cut]))
            carry, more = _layer_scan(body)(carry, rest)
            stats = jax.tree.map(lambda *a: jnp.concatenate(a), stats, more)
        x_BTD, pending = carry
    return x_BTD, StackStats(stats.load_E, stats.balance_loss, stats.dropped), pending


def _gather_layers(blocks: Block) -> Block:
    graphdef, state = nnx.split(blocks)
    return nnx.merge(graphdef, jax.tree.map(lambda a: sharding.relayout_dim(a, 0, None), state))


def _unrolled(body, x_BTD, blocks: Block):
    """One call of ``body`` per layer on that layer's slice of the stacked parameters.

    Slices by unstack, not indexing: the backward then stacks the layers' gradients into
    one buffer instead of zero-padding each to [L, ...] and summing. Per-layer stats are
    stacked to [L, ...] as a scan would return them.
    """
    graphdef, state = nnx.split(blocks)
    leaves, treedef = jax.tree.flatten(state)
    slices = [jnp.unstack(leaf) for leaf in leaves]
    stats = []
    for layer in range(leaves[0].shape[0]):
        block = nnx.merge(graphdef, jax.tree.unflatten(treedef, [s[layer] for s in slices]))
        x_BTD, s = body(x_BTD, block)
        stats.append(s)
    if stats[0] is None:
        return x_BTD, None
    return x_BTD, jax.tree.map(lambda *a: jnp.stack(a), *stats)


def scan_blocks_decode(
    blocks: Block,
    x_BTD: Float[Array, "B T D"],
    positions_BT: Int[Array, "B T"],
    cache_L: LatentCache,
    cache_index: Int[Array, ""],
) -> tuple[Float[Array, "B T D"], LatentCache]:
    """Stacked blocks over their stacked caches (leading axis L)."""

    @nnx.scan(
        in_axes=(nnx.Carry, 0, 0),
        out_axes=(nnx.Carry, 0),
        transform_metadata={nnx.PARTITION_NAME: "layers"},
    )
    def run(x, block, cache):
        return block.decode(x, positions_BT, cache, cache_index)

    return run(x_BTD, blocks, cache_L)
