"""The Pallas MLA decode kernel (interpret mode) against its jnp twin and the paged
attention of the engine; it lowers for CUDA (Triton) by cross-lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mla_decode import Blocks, mla_decode, mla_decode_reference


def _inputs(B=3, H=4, C=16, R=8, N=12, P=8, M=5, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    qlat = jax.random.normal(ks[0], (B, H, C))
    qrope = jax.random.normal(ks[1], (B, H, R))
    ckv = jax.random.normal(ks[2], (N, P, C))
    krope = jax.random.normal(ks[3], (N, P, R))
    perm = np.random.default_rng(seed).permutation(np.arange(1, N))[: B * M]
    table = jnp.asarray(np.resize(perm, (B, M)), jnp.int32)
    n_keys = jnp.asarray([1, 17, M * P][:B], jnp.int32)  # one key, mid-page, all pages
    return qlat, qrope, ckv, krope, table, n_keys


@pytest.mark.parametrize("pages_per_split", [1, 2, 8])  # 5, 3 and 1 splits
def test_kernel_equals_reference(pages_per_split):
    args = _inputs()
    out = mla_decode(*args, blocks=Blocks(pages_per_split), interpret=True)
    ref = mla_decode_reference(*args)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_kernel_lowers_for_cuda():
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in _inputs(B=2, M=4)]
    dev = AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=dev)
    with use_abstract_mesh(mesh):
        lowered = jax.jit(lambda *a: mla_decode(*a, blocks=Blocks(2))).trace(*specs)
        text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text or "triton" in text.lower()


def test_paged_mla_with_kernel_equals_einsums():
    """``mla_paged`` on one decode token: the kernel path (interpret) == the jnp path."""
    from flax import nnx

    from deepseek_jax.infer.paged import PagedLayer, mla_paged
    from deepseek_jax.mla import MLA
    from deepseek_jax.presets import get_preset

    cfg = get_preset("tiny")
    w = MLA(cfg, rngs=nnx.Rngs(0)).weights()
    ks = jax.random.split(jax.random.key(1), 3)
    cache = PagedLayer(
        jax.random.normal(ks[0], (9, 4, cfg.kv_lora_rank)),
        jax.random.normal(ks[1], (9, 4, cfg.qk_rope_head_dim)),
    )
    x = jax.random.normal(ks[2], (2, 1, cfg.hidden_size))
    table = jnp.asarray([[3, 1, 7, 0], [5, 2, 8, 4]], jnp.int32)
    lens = jnp.asarray([9, 14], jnp.int32)
    y_xla, c_xla = mla_paged(w, x, cache, table, lens, cfg, "xla")
    y_pl, c_pl = mla_paged(w, x, cache, table, lens, cfg, "pallas")
    np.testing.assert_allclose(y_pl, y_xla, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(c_pl.ckv_NPC, c_xla.ckv_NPC)
