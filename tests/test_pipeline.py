"""The pipeline executor: pipelined loss and gradients equal the unpipelined model's on
stage meshes, stage meshes run the unpipelined model too, training and its errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.build import init_model
from deepseek_jax.mesh import make_mesh
from deepseek_jax.pipeline.placement import layer_plan, pipeline_for
from deepseek_jax.pipeline.schedule import make_schedule
from deepseek_jax.presets import get_preset
from deepseek_jax.sharding import data_parallel_size
from deepseek_jax.train.config import TrainConfig
from experiments.train import main, parse_args
from tests.layouts import spec
from tests.pipeline_equal import SCHEDULES, check_equal, fewest_microbatches, layers_for

TCFG = TrainConfig()


def test_layer_plan_uneven_and_dualpipe_copies():
    v3 = get_preset("v3-671b")  # 61 layers, the first 3 dense, over 16 stages
    plan = layer_plan(v3, make_schedule("1f1b", 16, 16))
    counts = (plan.dense_valid.sum(-1) + plan.moe_valid.sum(-1))[:, 0]
    assert counts.tolist() == [4] * 13 + [3] * 3 and counts.sum() == 61
    assert plan.dense_valid[0, 0].sum() == 3 and not plan.dense_valid[1:].any()
    assert sorted(plan.moe_idx[plan.moe_valid].tolist()) == list(range(58))
    dual = layer_plan(
        get_preset("tiny").with_overrides(["num_hidden_layers=4"]), make_schedule("dualpipe", 4, 8)
    )
    # chunk 0 of stage s runs part s; chunk 1 runs part PP-1-s (the mirrored copy)
    assert dual.part_of.tolist() == [[0, 3], [1, 2], [2, 1], [3, 0]]


def test_data_parallel_size_excludes_stage():
    mesh = make_mesh(2, 2, stage=2)
    assert data_parallel_size(mesh) == 4
    from deepseek_jax.train.runner import _build

    args = parse_args(["--preset", "tiny", "--batch-size", "4", "--mesh", "stage=2,node=2,gpu=2"])
    assert _build(args).tcfg.batch_size == 4  # was "not divisible by ... size 8"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pipeline", "dualpipe", "--mesh", "stage=1,node=2,gpu=4"], "no stages"),
        (["--pipeline", "1f1b", "--microbatches", "1"], "at least 2 micro-batches"),
        (["--pipeline", "dualpipev", "--microbatches", "4"], "3 layers cannot fill 4 chunks"),
        (["--pipeline", "1f1b", "--microbatches", "8"], "does not split into 8"),
        (["--microbatches", "2"], "needs a --pipeline"),
    ],
)
def test_bad_pipelines_are_one_line_errors(tmp_path, capsys, args, message):
    argv = ["--preset", "tiny", "--batch-size", "8", "--steps", "1", "--out", str(tmp_path)]
    if "--mesh" not in args:
        argv += ["--mesh", "stage=2,node=2,gpu=2"]
    assert main(argv + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_odd_stage_count_refused_for_dualpipe():
    mesh = make_mesh(1, 1, stage=3, devices=jax.devices()[:3])
    tcfg = TrainConfig(batch_size=8, pipeline="dualpipe", microbatches=8)
    with pytest.raises(ValueError, match="even stage count, got 3; use dualpipev"):
        pipeline_for(get_preset("tiny", ["num_hidden_layers=6"]), tcfg, mesh)


@pytest.mark.slow
@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize(
    "mesh_shape", [(2, 2, 2), (4, 1, 2), (2, 1, 4)], ids=["2x2x2", "4x1x2", "2x1x4"]
)
def test_every_schedule_equals_unpipelined_wide(name, mesh_shape):
    """Beyond the fast cases (tests/test_pipeline_equal*.py): a steady phase (twice the
    fewest micro-batches), two MoE layers per chunk on 4 stages, against the unpipelined
    model on the same stage mesh."""
    stage = mesh_shape[0]
    m = 2 * fewest_microbatches(name, stage)
    layers = 9 if stage == 4 else layers_for(name, stage)
    check_equal(name, mesh_shape, layers, m, same_mesh=True)


def _train_losses(out) -> list[float]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [
        r["loss"]
        for r in sorted((r for r in recs if r["kind"] == "train"), key=lambda r: r["step"])
    ]


QUICK = ["--preset", "tiny", "--batch-size", "8", "--seq-len", "16", "--no-progress"]
QUICK += ["--sample-tokens", "0", "--eval-every", "1000", "--ckpt-every", "1000"]
PIPELINED = ["--mesh", "stage=2,node=2,gpu=2", "--pipeline", "1f1b", "--microbatches", "2"]


def test_pipelined_training_logs_the_same_losses(tmp_path):
    """5 steps of 1F1B over 2 stages (tiny at 2 layers, one per stage) log the unpipelined
    run's losses to 1e-5 relative."""
    runs = {}
    for name, mesh in (("plain", ["--mesh", "node=2,gpu=4"]), ("piped", PIPELINED)):
        runs[name] = tmp_path / name
        argv = [*QUICK, "--steps", "5", *mesh, "--out", str(runs[name]), "num_hidden_layers=2"]
        assert main(argv) == 0
    want, got = _train_losses(runs["plain"]), _train_losses(runs["piped"])
    assert len(want) == len(got) == 5
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.slow
def test_pipelined_training_logs_the_same_losses_and_checkpoints_cross(tmp_path, capsys):
    """5 steps pipelined = 5 steps unpipelined (1e-5 relative); each run's checkpoint then
    resumes in the other layout, and both agree on step 6."""
    plain, piped = tmp_path / "plain", tmp_path / "piped"
    assert main(QUICK + ["--steps", "5", "--mesh", "node=2,gpu=4", "--out", str(plain)]) == 0
    assert main(QUICK + ["--steps", "5", *PIPELINED, "--out", str(piped)]) == 0
    want, got = _train_losses(plain), _train_losses(piped)
    assert len(want) == len(got) == 5
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # One step more than saved is a schedule change: allowed explicitly (the layout change
    # itself needs no flag).
    more = ["--steps", "6", "--allow-config-change"]
    assert main(QUICK + [*more, *PIPELINED, "--out", str(plain)]) == 0
    assert main(QUICK + [*more, "--mesh", "node=2,gpu=4", "--out", str(piped)]) == 0
    assert capsys.readouterr().out.count("resumed from") == 2
    np.testing.assert_allclose(_train_losses(plain)[-1], _train_losses(piped)[-1], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["scan", "unroll"])
def test_unpipelined_forward_on_a_stage_mesh(loop):
    """tiny (1 dense layer: not divisible by 2 stages) initialises and runs on a stage mesh
    under both layer loops, equal to the same model on a (node, gpu) mesh."""
    cfg = get_preset("tiny")
    ids = jax.random.randint(jax.random.key(0), (8, 16), 0, cfg.vocab_size)
    logits = []
    for mesh in (make_mesh(2, 2, stage=2), make_mesh(2, 4)):
        model = init_model(cfg, mesh, seed=1, layer_loop=loop)
        with jax.set_mesh(mesh):
            x = jax.device_put(ids, spec("batch", None))
            logits.append(np.asarray(nnx.jit(lambda m, x: m(x).logits_BTV)(model, x)))
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-6)
