"""The pipeline executor: pipelined loss and gradients equal the unpipelined model's on
stage meshes, stage meshes run the unpipelined model too, training and its errors."""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.build import init_model
from deepseek_jax.mesh import make_mesh
from deepseek_jax.pipeline.executor import value_and_grad
from deepseek_jax.pipeline.placement import Pipeline, layer_plan, pipeline_for
from deepseek_jax.pipeline.schedule import make_schedule
from deepseek_jax.presets import get_preset
from deepseek_jax.sharding import data_parallel_size, state_shardings
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.loss import total_loss
from deepseek_jax.train.step import head_loss
from experiments.train import main, parse_args
from tests.layouts import spec

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


ROWS, T = 16, 8  # one global batch for every mesh: 16 sequences of 8 positions (+1 target)


@functools.cache
def _reference(layers: int):
    """The unpipelined loss terms and gradient on one device, shared by every schedule and
    mesh of this layer count; the parameters (on the host) and tokens they used."""
    cfg = get_preset("tiny", [f"num_hidden_layers={layers}"])
    mesh = make_mesh(1, 1, devices=jax.devices()[:1])
    graphdef, params, rest = nnx.split(init_model(cfg, mesh, seed=1), nnx.Param, ...)
    ids = jax.random.randint(jax.random.key(0), (ROWS, T + 1), 0, cfg.vocab_size)
    with jax.set_mesh(mesh):
        terms, grads = jax.jit(_unpipelined(graphdef))(params, rest, ids)
    return cfg, graphdef, *jax.device_get((params, rest, ids, terms, grads))


def _unpipelined(graphdef):
    def ref(params, rest, ids):
        def loss_fn(p):
            out = nnx.merge(graphdef, p, rest, copy=True)(ids[:, :-1])
            return total_loss(out, ids, TCFG)

        (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return terms, grads

    return ref


@functools.cache
def _reference_on(mesh_shape: tuple[int, int, int], layers: int, rows: int):
    """The same on a stage mesh (which exercises the gathered layer stacks), for the wider
    slow cases."""
    stage, node, gpu = mesh_shape
    cfg, graphdef, params, rest, _, _, _ = _reference(layers)
    mesh = make_mesh(node, gpu, stage=stage)
    params, rest = _placed(mesh, params, rest)
    ids = jax.random.randint(jax.random.key(0), (rows, T + 1), 0, cfg.vocab_size)
    with jax.set_mesh(mesh):
        ids = jax.device_put(ids, spec("batch", None))
        terms, grads = jax.jit(_unpipelined(graphdef))(params, rest, ids)
    return ids, terms, grads


def _placed(mesh, *states):
    return tuple(jax.device_put(s, state_shardings(s, mesh)) for s in states)


def _check_equal(name, mesh_shape, layers, m, *, same_mesh: bool = False):
    """Pipelined loss terms, gradients and MoE loads against the unpipelined model's."""
    stage, node, gpu = mesh_shape
    cfg, graphdef, params, rest, ids, want_terms, want = _reference(layers)
    mesh = make_mesh(node, gpu, stage=stage)
    params, rest = _placed(mesh, params, rest)
    if same_mesh:
        ids, want_terms, want = _reference_on(mesh_shape, layers, m * node * gpu)
    pipe = Pipeline.build(cfg, name, stage, m)
    step = functools.partial(head_loss, TCFG)
    with jax.set_mesh(mesh):
        ids = jax.device_put(ids, spec("batch", None))
        fn = jax.jit(
            lambda p, r, i: value_and_grad(pipe, graphdef, p, r, i, step, TCFG.balance_alpha)
        )
        terms, grads, moe, mtp = fn(params, rest, ids)
    for k, v in want_terms.items():
        np.testing.assert_allclose(terms[k], v, rtol=2e-6, err_msg=k)
    rel = jax.tree.map(
        lambda a, b: float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)), grads, want
    )
    worst = max(jax.tree_util.tree_leaves_with_path(rel), key=lambda kv: kv[1])
    assert worst[1] < 1e-5, worst
    assert moe[0].shape == (cfg.num_moe_layers, cfg.n_routed_experts)
    tokens = ids.shape[0] * (ids.shape[1] - 1) * cfg.num_experts_per_tok
    np.testing.assert_allclose(moe[0].sum(-1), tokens)  # every micro-batch's load, once
    np.testing.assert_allclose(mtp.load_LE.sum(-1), tokens)


def _layers(name: str, stage: int) -> int:
    """An uneven split everywhere, the dense first layer on stage 0: tiny's 3 layers over 2
    stages (2 + 1), 5 over 4 stages or DualPipeV's 4 chunks, 9 over DualPipeV's 8 chunks."""
    chunks = stage * (2 if name == "dualpipev" else 1)
    return {2: 3, 4: 5, 8: 9}[chunks]


MESHES = [(2, 2, 2), (4, 1, 2), (2, 1, 4)]
SCHEDULES = ["1f1b", "zb1p", "dualpipe", "dualpipev"]


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("mesh_shape", MESHES)
def test_every_schedule_equals_unpipelined(name, mesh_shape):
    """Every schedule on every mesh at the fewest micro-batches it takes (the warm-up and
    cool-down phases are the whole table then), each with an uneven layer split."""
    stage = mesh_shape[0]
    m = 2 * stage if name.startswith("dualpipe") else stage
    _check_equal(name, mesh_shape, _layers(name, stage), m)


@pytest.mark.slow
@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("mesh_shape", MESHES)
def test_every_schedule_equals_unpipelined_wide(name, mesh_shape):
    """The same with a steady phase (twice the fewest micro-batches for 1F1B and ZB1P, 4 PP
    for DualPipe), two MoE layers per chunk on 4 stages, against the unpipelined model on
    the same stage mesh."""
    stage = mesh_shape[0]
    m = 4 * stage if name.startswith("dualpipe") else 2 * stage
    layers = 9 if stage == 4 else _layers(name, stage)
    _check_equal(name, mesh_shape, layers, m, same_mesh=True)


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
