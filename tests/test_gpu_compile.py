"""The train step compiled for a (node=2, gpu=8) H100 cluster without a GPU (the harness
``experiments.gpu_compile`` in the ``.venv-gpu`` of ``make gpu-compile``): with
``overlap=dual`` every all-to-all is async with compute beside it (MTP included) and should
be hidden behind compute; the control (``overlap=none``, latency-hiding scheduler off)
fails the same checks; V3's layer shape fits an 80 GB H100.

Each figure comes from one compile in a subprocess (module-scoped): 2-3 CPU-minutes each.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
GPU_PY = ROOT / ".venv-gpu" / "bin" / "python"
# bench-small's shape: a scan over 2 MoE layers (no dense one) and the MTP module.
BENCH = [
    "--preset", "bench-small", "--batch", "32", "--seq-len", "256",
    "num_hidden_layers=2", "first_k_dense_replace=0",
]  # fmt: skip


def harness(*args: str, timeout: int = 3600) -> dict:
    """The harness's JSON line, run in .venv-gpu (the CUDA plugin wheels)."""
    if not GPU_PY.exists():
        if os.environ.get("DEEPSEEK_JAX_REQUIRE_GPU_COMPILE"):
            pytest.fail(f"{GPU_PY} missing: run `make gpu-venv`")
        pytest.skip(f"{GPU_PY} missing: `make gpu-venv` (make test builds it)")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # each GPU program is compiled once a run
    # The conftest's CPU flags (8 host devices, LLVM -O0) do not change XLA:GPU's schedule;
    # -O0 only shortens the LLVM part of the compile.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    # ptxas at -O0: the checks read the scheduled HLO and the buffer sizes, both fixed before
    # PTX is assembled (the same JSON either way, measured; 5-15 % less CPU time).
    fast = ["--xla", "xla_gpu_disable_gpuasm_optimizations=true"]
    out = subprocess.run(
        [str(GPU_PY), "-m", "experiments.gpu_compile", "--json", *fast, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if out.returncode:
        raise AssertionError(f"harness failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def dual() -> dict:
    return harness(*BENCH, "overlap=dual")


@pytest.fixture(scope="module")
def control() -> dict:
    # Without the MTP block: the control only has to fail the checks, at half the compile.
    return harness(*BENCH, "--no-lhs", "overlap=none", "num_nextn_predict_layers=0")


def test_dual_runs_both_halves_async(dual):
    # 2 halves x 2 blocks (MoE scan body, MTP) x (4 forward: one per dispatch hop, the ids
    # and gate weights packed beside the payload, and one per combine hop; 4 backward: the
    # cotangents' way back, the gate weights' beside the payload's).
    assert dual["all_to_all_total"] == 2 * 2 * (4 + 4), dual
    assert dual["all_to_all_overlapped"] > dual["all_to_all_total"] // 2, dual
    # Our Pallas dispatch kernels are compiled in (ep_kernel=auto is pallas on a GPU): per
    # block, permute and combine once per hop and half (nothing else is a Triton call).
    assert dual["custom_calls"].get("__gpu$xla.gpu.triton") == 2 * (4 + 4), dual


def test_dual_has_no_sync_all_to_all(dual):
    """Every all-to-all has compute in its window (measured: 32 of 32; 13 of 56 were sync
    before the packed exchange and the one-phase-per-hop schedule of overlap.py)."""
    assert dual["sync_all_to_all"] == 0, dual
    assert dual["all_to_all_overlapped"] == dual["all_to_all_total"], dual


def test_control_fails_the_checks(control):
    """Without the split and the scheduler the same checks fail (measured, MTP off for half
    the compile: 6 of 8 all-to-alls sync, hidden 0.02; compile 61 s)."""
    assert control["sync_all_to_all"] > 0, control
    assert control["all_to_all_hidden_fraction"] < 0.9, control


# Measured: hidden fraction 0.35 forward, 0.48 backward (0.41 overall; before the packed
# exchange and the one-phase-per-hop schedule 0.22 / 0.31; overlap=none with the scheduler
# on: 0.11 / 0.14, 7 of 28 sync). Not reachable by the dual pairing at this width: a half's
# GEMMs (attention 0.5 us, experts 0.8, shared 0.2) against 23.5 us of dispatch and as
# much combine per half and block (hop 2 is [8, 408, 512] bf16, 3.3 MB, 18.3 us; hop 1
# 5.2 us) hide <= 0.03 forward (the harness's gemm_bound_forward); what XLA hides it hides
# behind memory-bound work (the scan's residual stacks, routing, permutes).
@pytest.mark.xfail(strict=True, reason="hidden fraction 0.35 fwd / 0.48 bwd measured (0.9)")
def test_dual_hides_the_all_to_alls(dual):
    for phase in ("forward", "backward"):
        assert dual[f"all_to_all_hidden_fraction_{phase}"] >= 0.9, dual


@pytest.mark.slow
def test_fp8_kernels_compile_into_the_gpu_train_step():
    """FP8 dispatch and FP8 GEMMs with their GPU defaults (fp8_backend=auto: pallas): the
    Mosaic GPU GEMM in Fprop, Dgrad and Wgrad of every linear beside the Triton dispatch
    kernels (measured: 180 and 16 calls; compile 740 s under load)."""
    out = harness(*BENCH, "overlap=dual", "ep_fp8_dispatch=true", "fp8=true")
    assert out["custom_calls"].get("__gpu$xla.gpu.triton") == 16, out
    assert out["custom_calls"].get("mosaic_gpu_v2") == 180, out


@pytest.mark.slow
def test_v3_layer_shape_fits_an_h100():
    """V3-671B at 4 layers (3 dense, 1 MoE) and the MTP module, 16 experts per device."""
    out = harness(
        "--preset", "v3-671b", "--batch", "16", "--seq-len", "4096",
        "--remat", "full", "num_hidden_layers=4",
    )  # fmt: skip
    used = out["temp_bytes_per_device"] + out["argument_bytes_per_device"]
    assert used < 80e9, out
    print(json.dumps(out), file=sys.stderr)


@pytest.mark.parametrize("program", ["train", "prefill", "decode"])
def test_programs_build_on_abstract_state(program):
    """The harness's programs trace and lower on ShapeDtypeStructs (here over 8 CPU devices;
    the GPU compile itself runs in the subprocess tests above)."""
    import jax

    from deepseek_jax.codesign import gpu_compile as gc
    from deepseek_jax.mesh import make_mesh
    from deepseek_jax.presets import get_preset

    mesh = make_mesh(2, 4)
    cfg = gc.gpu_config(get_preset("tiny"), {"overlap": "dual"})
    build = {"train": gc._train, "prefill": gc._prefill, "decode": gc._decode}[program]
    with jax.set_mesh(mesh):
        text = build(cfg, mesh, 16, 8, "none").lower().as_text()
    assert "all_to_all" in text  # the MoE layer ran expert-parallel
    with pytest.raises(ValueError, match="--batch 12"):
        gc.compile_program(program, cfg, mesh, 12, 8)


# V3's layer shape under overlap=dual: one MoE layer + MTP, (2, 8) H100, two 2048-token
# sequences per device (each half one sequence). Measured (quiet, compile 67 s): 32
# all-to-alls, 0 sync, hidden 0.64 forward / 0.55 backward, 29.8 + 27.8 GB per device.
# At 4096 tokens XLA's rematerialisation cannot bring the step under its memory budget
# ("only reduced to 65.42GiB"), and the scheduler then keeps 19 of 32 sync (hidden 0.26 /
# 0.11, 72.9 GB). The GEMM-pairing bound at 4096 is 0.35 / 0.69 (capacity factor 3: hop
# 2's padded buffer is 3.9 ms per half against 1.5 ms of expert GEMMs).
V3_DUAL = [
    "--preset", "v3-671b", "--batch", "32", "--seq-len", "2048",
    "num_hidden_layers=1", "first_k_dense_replace=0", "overlap=dual",
]  # fmt: skip


@pytest.fixture(scope="module")
def v3_dual() -> dict:
    return harness(*V3_DUAL)


@pytest.mark.slow
def test_v3_shape_dual_runs_every_all_to_all_async_and_fits(v3_dual):
    out = v3_dual
    assert out["temp_bytes_per_device"] + out["argument_bytes_per_device"] < 80e9, out
    assert out["all_to_all_total"] == 32, out  # the block was split: 2 x the unsplit 16
    assert out["sync_all_to_all"] == 0, out


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="V3 shape: hidden 0.64 / 0.55 measured (0.9)")
def test_v3_shape_dual_hides_the_all_to_alls(v3_dual):
    for phase in ("forward", "backward"):
        assert v3_dual[f"all_to_all_hidden_fraction_{phase}"] >= 0.9, v3_dual


# overlap=dual_deferred with FP8 dispatch and capacity factor 1.0 (where the GEMM-pairing
# bound is highest: 0.65 / 0.73), the same shape. Measured (loaded, compile 231 s): 32
# all-to-alls, 0 sync, hidden 0.62 forward / 0.69 backward (overlap=dual: 0.56 / 0.59),
# 30.3 + 27.8 GB. Combine(B) of the one MoE layer runs beside half A's final norm and head.
V3_DEFERRED = [*V3_DUAL[:-1], "overlap=dual_deferred", "ep_fp8_dispatch=true"]


# The same program with the scheduler told the costs (``--latency-profile``: a PGLE profile
# written from the first compile's schedule under the harness's cost model), the MTP block
# deferring its combine(B) too, experts(B) cut beside combine(A)'s two hops. Measured
# (loaded, both compiles 527 s): 32 all-to-alls, 0 sync, hidden 0.996 forward / 0.938
# backward, 33.6 + 27.8 GB per device; the profile priced every kernel of the second compile.
@pytest.mark.slow
def test_v3_shape_deferred_with_the_costs_told_hides_the_all_to_alls():
    out = harness(*V3_DEFERRED, "ep_capacity_factor=1.0", "--latency-profile")
    assert out["temp_bytes_per_device"] + out["argument_bytes_per_device"] < 80e9, out
    assert out["sync_all_to_all"] == 0, out
    assert out["latency_profile_coverage"] > 0.95, out  # its names met the second compile's
    for phase in ("forward", "backward"):
        assert out[f"all_to_all_hidden_fraction_{phase}"] >= 0.9, out


@pytest.mark.slow
def test_v3_shape_deferred_combine_runs_every_all_to_all_async_and_fits():
    out = harness(*V3_DEFERRED, "ep_capacity_factor=1.0")
    assert out["temp_bytes_per_device"] + out["argument_bytes_per_device"] < 80e9, out
    assert out["all_to_all_total"] == 32, out  # the main block's 16 (its combine(B) at the
    assert out["sync_all_to_all"] == 0, out  # head) and the MTP block's 16
