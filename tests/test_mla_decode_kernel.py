"""The Pallas MLA decode kernel (interpret mode) against its jnp twin and the paged
attention of the engine; it lowers for CUDA (Triton) by cross-lowering, and at V3's decode
shape it compiles for an H200 (deviceless compile in ``.venv-gpu``) where one block of all
128 heads does not."""

import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mla_decode import Blocks, mla_decode, mla_decode_reference
from tests.test_gpu_compile import GPU_PY, ROOT


def _inputs(B=3, H=4, C=16, R=8, N=12, P=8, M=5, seed=0, n_keys=(1, 17, 40)):
    ks = jax.random.split(jax.random.key(seed), 4)
    qlat = jax.random.normal(ks[0], (B, H, C))
    qrope = jax.random.normal(ks[1], (B, H, R))
    ckv = jax.random.normal(ks[2], (N, P, C))
    krope = jax.random.normal(ks[3], (N, P, R))
    perm = np.random.default_rng(seed).permutation(np.arange(1, N))[: B * M]
    table = jnp.asarray(np.resize(perm, (B, M)), jnp.int32)
    return qlat, qrope, ckv, krope, table, jnp.asarray(n_keys[:B], jnp.int32)


@pytest.mark.parametrize("pages_per_split", [1, 2, 8])  # 5, 3 and 1 splits
def test_kernel_equals_reference(pages_per_split):
    args = _inputs()
    out = mla_decode(*args, blocks=Blocks(pages_per_split), interpret=True)
    ref = mla_decode_reference(*args)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


# H=8 in 4, 2 and 1 blocks, 3 ragged ones (3, 3, 2 heads), and a block wider than H.
@pytest.mark.parametrize("heads_per_block", [2, 4, 8, 3, 16])
def test_head_blocks_equal_reference(heads_per_block):
    # ragged lengths: one key, a whole page, one past it, mid-page, all pages
    args = _inputs(B=5, H=8, N=30, n_keys=(1, 8, 9, 21, 40))
    out = mla_decode(*args, blocks=Blocks(2, heads_per_block), interpret=True)
    ref = mla_decode_reference(*args)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("field", ["heads_per_block", "pages_per_split"])
def test_bad_blocks_name_the_field(field):
    with pytest.raises(ValueError, match=f"Blocks.{field}=0"):
        mla_decode(*_inputs(), blocks=Blocks(**{field: 0}), interpret=True)


def test_kernel_lowers_for_cuda():
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in _inputs(B=2, M=4)]
    dev = AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=dev)
    with use_abstract_mesh(mesh):
        blocks = Blocks(2, heads_per_block=2)  # 2 head blocks x 2 requests x 2 splits
        lowered = jax.jit(lambda *a: mla_decode(*a, blocks=blocks)).trace(*specs)
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


def _h200_compile(*blocks: str) -> dict:
    """``experiments.gpu_compile_mla`` (V3: H=128, C=512, R=64, pages of 16, bf16 pool;
    4 requests of 1024 positions) for an H200 in ``.venv-gpu``: its JSON line."""
    if not GPU_PY.exists():
        if os.environ.get("DEEPSEEK_JAX_REQUIRE_GPU_COMPILE"):
            pytest.fail(f"{GPU_PY} missing: run `make gpu-venv`")
        pytest.skip(f"{GPU_PY} missing: `make gpu-venv` (make test builds it)")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cmd = [str(GPU_PY), "-m", "experiments.gpu_compile_mla", "--target", "h200"]
    shape = ["--heads", "128", "--lora", "512", "--rope", "64", "--page", "16"]
    out = subprocess.run(
        [*cmd, *shape, "--batch", "4", "--context", "1024", *blocks],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if out.returncode:
        raise AssertionError(f"gpu_compile_mla failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_v3_decode_shape_compiles_for_an_h200():
    """Default Blocks (64 heads per program): one Triton kernel (measured: compile ~2 s)."""
    out = _h200_compile()
    assert out["ok"], out
    assert out["blocks"]["heads_per_block"] == 64, out
    assert out["custom_calls"] == {"__gpu$xla.gpu.triton": 1}, out


def test_v3_decode_shape_in_one_head_block_exceeds_shared_memory():
    """The control: all 128 heads in one program (the kernel before head blocks) asks for
    more shared memory than an H200 block has (measured: 346116 of 232448 bytes)."""
    out = _h200_compile("heads_per_block=128")
    assert not out["ok"], out
    assert "Shared memory size limit exceeded" in out["error"], out
