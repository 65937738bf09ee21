# ruff: noqa: E501 - HLO lines are kept whole, as XLA prints them
"""The pipeline's stage-to-stage transfers in the deviceless GPU compile: the schedule reader
counts collective-permutes like all-to-alls (a hand-written module, fast), and the pipelined
train step compiled for a (stage=2, node=1, gpu=8) H100 cluster has every stage
``collective-permute`` async with compute between start and done (the executor's
double-buffered tick), while the control (latency-hiding scheduler off) does not.

The compiles run the harness in ``.venv-gpu`` (``tests/test_gpu_compile.harness``): 3-6
CPU-minutes each under load, so they are slow tests.
"""

import collections

import pytest

from deepseek_jax.codesign.overlap_report import summary
from deepseek_jax.codesign.schedule import CostModel, Schedule
from tests.hlo_fixtures import FUSED_DOT, SYNC, XWY, module
from tests.test_gpu_compile import harness

AXES = {"stage": 2, "node": 1, "gpu": 2}  # device ids row-major: stage 1 is ids 2, 3
HLO = module(
    FUSED_DOT,
    f"""ENTRY %main (x: bf16[4,16,8], w: bf16[128,256], y: bf16[64,128]) -> bf16[4,16,8] {{
{XWY}
  %s = ((bf16[4,16,8]{{2,1,0}}), bf16[4,16,8]{{2,1,0}}) collective-permute-start(%x), channel_id=1, source_target_pairs={{{{0,2}},{{1,3}}}}, metadata={{op_name="jit(f)/shard_map/while/body/ppermute"}}
  %g = f32[64,256]{{1,0}} fusion(%y, %w), kind=kCustom, calls=%fused_dot
  %d = bf16[4,16,8]{{2,1,0}} collective-permute-done(%s)
  %up = bf16[4,16,8]{{2,1,0}} collective-permute(%d), channel_id=2, source_target_pairs={{{{2,0}},{{3,1}}}}, {SYNC}
  ROOT %gpu = bf16[4,16,8]{{2,1,0}} collective-permute(%up), channel_id=3, source_target_pairs={{{{0,1}},{{1,0}}}}
}}""",
)


def test_reader_counts_stage_permutes():
    model = CostModel()
    out = summary(Schedule(HLO, AXES, model))
    assert out["collectives"] == 3  # the gpu-axis permute is not a stage transfer
    assert out["stage_collective_permute_total"] == 2
    assert out["stage_collective_permute_overlapped"] == 1
    assert out["sync_stage_collective_permute"] == 1
    # The async one: a 64x256x128 dot against 1 KiB over the stage link; the sync one hides 0.
    compute = 2 * 64 * 256 * 128 / model.flops
    transfer = 4 * 16 * 8 * 2 / dict(model.link_Bps)["stage"]
    want = min(1.0, compute / transfer) / 2  # two transfers of equal size
    assert out["stage_collective_permute_hidden_fraction"] == pytest.approx(want)


# tiny's widths, 2 layers: 1F1B over 2 stages, 4 micro-batches of 1 sequence per device.
PIPE = [
    "--mesh", "stage=2,node=1,gpu=8", "--preset", "tiny", "--batch", "32", "--seq-len", "64",
    "--microbatches", "4",
]  # fmt: skip


@pytest.fixture(scope="module")
def one_f_one_b() -> dict:
    return harness(*PIPE, "--pipeline", "1f1b")


@pytest.mark.slow
def test_stage_transfers_async_with_compute(one_f_one_b):
    out = one_f_one_b
    # activations down and input gradients up, each a permute in the scanned tick
    assert out["stage_collective_permute_total"] >= 2, out
    assert out["sync_stage_collective_permute"] == 0, out
    assert out["stage_collective_permute_overlapped"] == out["stage_collective_permute_total"]


@pytest.mark.slow
def test_control_serialises_the_stage_transfers():
    """Without the latency-hiding scheduler the same check fails (so it can fail)."""
    out = harness(*PIPE, "--pipeline", "1f1b", "--no-lhs")
    assert out["stage_collective_permute_total"] >= 2, out
    assert out["sync_stage_collective_permute"] > 0, out


def _paired_forward(hlo: str) -> tuple[int, float, float]:
    """(computations holding both a forward micro-batch's all-to-alls and a backward's, the
    hidden fraction of those forward all-to-alls, that of every forward all-to-all). Names
    tell the halves apart: the backward's carry ``transpose(``, its recompute ``jvp(``."""
    sched = Schedule(hlo, {"stage": 2, "node": 1, "gpu": 8}, CostModel())
    where = {i.name: comp for comp, instrs in sched.comps.items() for i in instrs}
    by_comp = collections.defaultdict(list)
    for c in sched.collectives:
        if c.kind == "all-to-all":
            by_comp[where[c.name]].append(c)
    fwd = lambda cs: [c for c in cs if "jvp(" not in c.op_name]  # noqa: E731
    mixed = [
        cs for cs in by_comp.values() if fwd(cs) and any("transpose(" in c.op_name for c in cs)
    ]

    def hidden(cs):
        return sum(c.hidden * c.transfer_s for c in cs) / sum(c.transfer_s for c in cs)

    every = fwd([c for cs in by_comp.values() for c in cs])
    return len(mixed), hidden(fwd([c for cs in mixed for c in cs])) if mixed else 0.0, hidden(every)


@pytest.mark.slow
def test_dualpipe_pairs_forward_and_backward(tmp_path):
    """DualPipe's F&B tick is one computation (``pipeline/pairing.py``), so its forward's
    all-to-alls sit beside its backward's compute; the control (the tick through the kind
    switches, ``--no-pairing``) keeps them apart. Measured: 0.44 of the paired forward
    all-to-alls hidden (the head's and MTP's among them), 0.26 of all forward ones against
    0.07 in the control; 4 stage permutes, all async, hidden 0.63."""
    dual = [*PIPE, "--pipeline", "dualpipe", "num_hidden_layers=4"]
    got, outs = {}, {}
    for name, extra in (("paired", []), ("control", ["--no-pairing"])):
        path = tmp_path / f"{name}.hlo"
        outs[name] = harness(*dual, *extra, "--hlo-out", str(path))
        got[name] = _paired_forward(path.read_text())
    # Every stage transfer async with compute in its window, the switched ticks' too (with
    # 2 stages, down and up are one swap permute per window).
    out = outs["paired"]
    assert out["sync_stage_collective_permute"] == 0, out
    assert out["stage_collective_permute_overlapped"] == out["stage_collective_permute_total"]
    n_mixed, paired_hidden, every_hidden = got["paired"]
    assert n_mixed >= 1 and paired_hidden >= 0.4, got
    assert got["control"][0] == 0, got  # the halves never share a computation there
    assert every_hidden > 1.5 * got["control"][2], got


def test_only_train_is_pipelined():
    from deepseek_jax.codesign import gpu_compile as gc
    from deepseek_jax.mesh import make_mesh
    from deepseek_jax.presets import get_preset

    mesh = make_mesh(1, 4, stage=2)
    with pytest.raises(ValueError, match="--pipeline 1f1b: only --program train"):
        gc.compile_program("prefill", get_preset("tiny"), mesh, 8, 8, pipeline="1f1b")
