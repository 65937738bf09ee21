"""The causal attention core of MLA's training/prefill path (S = T), on one of two backends:
einsums in XLA (``_causal_attend_xla``, query-blocked so masked key blocks are skipped) or
our fused C++ kernel on CPU (``cpu_kernels/attention.py``), chosen by
``cfg.run.attention_backend`` through ``resolve_attention_backend``. The XLA path is the kernel's
plain-jnp twin (tests/test_mla.py, tests/test_cpu_attention.py).

Shape letters: B batch, T query positions, S key positions, H heads, N nope head dim, R rope
head dim, O v head dim, K = N + R.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import cpu_kernels.attention as cpu_attention
import deepseek_jax.backends as backends
from deepseek_jax.attention_core import masked_softmax
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.rope import softmax_scale

# Causal attention runs in this many query blocks when T allows: block i only scores the
# keys it can see, so n blocks do (n + 1) / 2n of the T x T work (56 % for 8).
CAUSAL_QUERY_BLOCKS = 8


def resolve_attention_backend(cfg: ModelConfig, shape_BTHNRO: tuple[int, ...]) -> str:
    """The attention core for one device's [B, T, H] and head dims (N, R, O).

    ``"auto"``: our fused C++ kernel where it builds, on CPU in float32, *and* was measured
    faster than the XLA einsums here at this shape class (``backends.measured``); else
    ``"xla"``. An explicit ``"cpu_kernel"`` fails clearly where the kernel cannot run.
    """
    name, shape = cfg.run.attention_backend, shape_BTHNRO
    if name == "xla":
        return backends.note("attention", shape, name, "attention_backend=xla")
    built = backends.kernel_available(cpu_attention.KERNEL, "the C++ causal attention")
    if name == "cpu_kernel":
        if not built:
            raise RuntimeError(
                "attention_backend='cpu_kernel' needs jax on CPU and the C++ kernel "
                f"(cpu_kernels/attention.cc), which is unavailable here (backend: "
                f"{jax.default_backend()}); use 'xla'"
            )
        return backends.note("attention", shape, name, "attention_backend=cpu_kernel")
    if not built:
        return backends.note("attention", shape, "xla", "auto: no C++ kernel here")
    if jnp.dtype(cfg.run.dtype) != jnp.float32:
        return backends.note(
            "attention", shape, "xla", f"auto: the kernel is float32, not {cfg.run.dtype}"
        )
    return backends.measured(
        "attention",
        shape_BTHNRO,
        {
            "cpu_kernel": _timed(_causal_attend_kernel, shape_BTHNRO, cfg),
            "xla": _timed(_causal_attend_xla, shape_BTHNRO, cfg),
        },
        build_id=cpu_attention.KERNEL.identity(),
        fallback="xla",
    )


def _timed(attend, shape_BTHNRO: tuple[int, ...], cfg: ModelConfig) -> backends.Candidate:
    """``attend`` forward (and backward) on random inputs of one device's shapes."""
    B, T, H, N, R, O = shape_BTHNRO

    def build(backward: bool):
        keys = jax.random.split(jax.random.key(0), 5)
        shapes = [(B, T, H, N), (B, T, H, R), (B, T, H, N), (B, T, R), (B, T, H, O)]
        args = [jax.random.normal(k, s, cfg.run.dtype) for k, s in zip(keys, shapes, strict=True)]
        loss = lambda *a: jnp.sum(attend(*a, cfg).astype(jnp.float32))  # noqa: E731
        run = jax.jit(jax.grad(loss, argnums=tuple(range(5))) if backward else loss)
        return lambda: jax.block_until_ready(run(*args))

    return build


def causal_attend(
    qnope_BTHN: Float[Array, "B T H N"],
    qrope_BTHR: Float[Array, "B T H R"],
    knope_BSHN: Float[Array, "B S H N"],
    krope_BSR: Float[Array, "B S R"],
    v_BSHO: Float[Array, "B S H O"],
    cfg: ModelConfig,
) -> Float[Array, "B T H O"]:
    """Causal softmax attention (S = T) on the configured backend."""
    B, T, H, N = backends.local_shape(qnope_BTHN)
    shape = (B, T, H, N, qrope_BTHR.shape[-1], v_BSHO.shape[-1])
    attend = _causal_attend_xla
    if resolve_attention_backend(cfg, shape) == "cpu_kernel":
        attend = _causal_attend_kernel
    return attend(qnope_BTHN, qrope_BTHR, knope_BSHN, krope_BSR, v_BSHO, cfg)


def _heads_qk(qnope_BTHN, qrope_BTHR, knope_BSHN, krope_BSR):
    """(q_BTHK, k_BSHK), K = N + R: the rope key, one per position, broadcast to every head
    (unscaled, in the inputs' dtype: each backend scales and casts in its own order)."""
    B, S, H, _ = knope_BSHN.shape
    krope_BSHR = jnp.broadcast_to(krope_BSR[:, :, None, :], (B, S, H, krope_BSR.shape[-1]))
    q_BTHK = jnp.concatenate([qnope_BTHN, qrope_BTHR], -1)
    return q_BTHK, jnp.concatenate([knope_BSHN, krope_BSHR], -1)


def _causal_attend_kernel(qnope_BTHN, qrope_BTHR, knope_BSHN, krope_BSR, v_BSHO, cfg):
    """Our fused C++ kernel (``cpu_kernels/attention.py``), in float32."""
    f32 = jnp.float32
    q_BTHK, k_BSHK = _heads_qk(qnope_BTHN, qrope_BTHR, knope_BSHN, krope_BSR)
    q_BTHK, k_BSHK = q_BTHK.astype(f32) * softmax_scale(cfg), k_BSHK.astype(f32)
    out_BTHO = cpu_attention.causal_attention(q_BTHK, k_BSHK, v_BSHO.astype(f32))
    return out_BTHO.astype(cfg.run.dtype)


def _causal_attend_xla(
    qnope_BTHN: Float[Array, "B T H N"],
    qrope_BTHR: Float[Array, "B T H R"],
    knope_BSHN: Float[Array, "B S H N"],
    krope_BSR: Float[Array, "B S R"],
    v_BSHO: Float[Array, "B S H O"],
    cfg: ModelConfig,
) -> Float[Array, "B T H O"]:
    """Causal attention in einsums, head-major: the score-sized tensors are [B, H, T, S]
    from the start, so no transpose ever copies them, and query blocks skip the key blocks
    that are fully masked. Scores and softmax in float32."""
    dt, f32 = jnp.dtype(cfg.run.dtype), jnp.float32
    T = qnope_BTHN.shape[1]
    n = CAUSAL_QUERY_BLOCKS if T % CAUSAL_QUERY_BLOCKS == 0 and T >= 256 else 1
    c = T // n
    q_BTHK, k_BSHK = _heads_qk(qnope_BTHN, qrope_BTHR, knope_BSHN, krope_BSR)
    q_BHTK = (q_BTHK * softmax_scale(cfg)).astype(dt).transpose(0, 2, 1, 3)
    k_BHSK = k_BSHK.transpose(0, 2, 1, 3)
    v_BHSO = v_BSHO.transpose(0, 2, 1, 3)
    # Blocks by split + concatenate, not slicing: the backward then concatenates the block
    # gradients instead of zero-padding each one to full length and adding them.
    q_blocks, k_blocks, v_blocks = (jnp.split(a, n, axis=2) for a in (q_BHTK, k_BHSK, v_BHSO))
    outs = []
    for i in range(n):
        S = (i + 1) * c  # query rows [i c, S) see keys [0, S)
        k_BHSK = jnp.concatenate(k_blocks[: i + 1], axis=2)
        s_BHTS = jnp.einsum("bhtk,bhsk->bhts", q_blocks[i], k_BHSK, preferred_element_type=f32)
        visible_TS = jnp.arange(S)[None, :] <= (i * c + jnp.arange(c))[:, None]
        probs_BHTS = masked_softmax(s_BHTS, visible_TS, dt)
        v_BHSO = jnp.concatenate(v_blocks[: i + 1], axis=2)
        outs.append(jnp.einsum("bhts,bhso->bhto", probs_BHTS, v_BHSO))
    return jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3)
