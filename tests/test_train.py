"""The training job: resume bit-identity, reshard-restore, multi-process, bad inputs."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.mesh import make_mesh
from deepseek_jax.presets import get_preset
from deepseek_jax.train.checkpoint import (
    Checkpointer,
    config_dict,
    resume_differences,
    run_meta,
)
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.state import abstract_state, init_state, plan
from experiments.train import main
from tests.layouts import axes

ROOT = Path(__file__).resolve().parents[1]
QUICK = [  # a few tiny batches, nothing printed or sampled: for tests of the entry point
    "--batch-size",
    "8",
    "--seq-len",
    "16",
    "--no-progress",
    "--sample-tokens",
    "0",
    "--eval-every",
    "1000",
]
TINY = ["--preset", "tiny", *QUICK]


def _env(devices: int | None = 8) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0" + (
        f" --xla_force_host_platform_device_count={devices}" if devices else ""
    )
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT)
    # No malloc restart (experiments/runtime.py, tested in test_runtime.py): it only picks
    # glibc's huge-page tunable, and costs each run a second start-up (imports, backends).
    env["DEEPSEEK_JAX_NO_REEXEC"] = "1"
    return env


def _spawn(args: list[str], env=None, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.train", *args],
        cwd=ROOT,
        env=env or _env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def _losses(out: Path) -> dict[int, list[float]]:
    per_step: dict[int, list[float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            per_step.setdefault(r["step"], []).append(r["loss"])
    return per_step


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {path} appeared:\n{proc.stdout.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.05)


# The killed-and-resumed run and the two-process run are both checked against one
# uninterrupted single-process run of the same schedule (the reference fixture).
MESH = ["--mesh", "node=2,gpu=4"]
SCHEDULE = TINY + MESH + ["--steps", "12"]
RESUME = SCHEDULE + ["--ckpt-every", "4"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, list[float]]:
    """The per-step losses of an uninterrupted one-process run of ``RESUME``. Later runs of
    the same program load its compiled programs from the test run's compilation cache
    (conftest) instead of compiling them again."""
    out = tmp_path_factory.mktemp("reference")
    ref = _spawn(RESUME + ["--out", str(out)])
    log = ref.communicate()[0]
    assert ref.returncode == 0, log
    losses = _losses(out)
    assert sorted(losses) == list(range(12)), losses
    return losses


def test_killed_run_resumes_bit_identical(tmp_path, reference):
    run = _spawn(RESUME + ["--out", str(tmp_path / "run")])
    _wait_for(tmp_path / "run" / "checkpoints" / "4", run)
    run.send_signal(signal.SIGKILL)  # no chance to save: resume from the last committed step
    run.wait()
    resumed = _spawn(RESUME + ["--out", str(tmp_path / "run")])
    log = resumed.communicate()[0]
    assert resumed.returncode == 0, log
    assert "resumed from" in log
    got = _losses(tmp_path / "run")
    assert sorted(got) == list(range(12))
    for step, losses in got.items():
        assert all(x == reference[step][0] for x in losses), (step, losses, reference[step])


def test_sigterm_finishes_step_saves_and_exits(tmp_path):
    out = tmp_path / "run"
    # the reference's schedule: all its programs come from the compilation cache. A save
    # after every step keeps the run busy for seconds after the first, well past the poll.
    run = _spawn(SCHEDULE + ["--ckpt-every", "1", "--out", str(out)])
    _wait_for(out / "checkpoints" / "1", run)
    run.send_signal(signal.SIGTERM)
    log = run.communicate(timeout=120)[0]
    assert run.returncode == 0, log
    assert "interrupted; checkpoint saved" in log
    steps = _losses(out)
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == max(steps) + 1  # the state after the last finished step is on disk


TINY_TCFG = TrainConfig(steps=2, batch_size=8, seq_len=16)


@pytest.fixture(scope="module")
def tiny_state():
    """A fresh tiny train state on a (node=2, gpu=4) mesh, as host arrays and sharded."""
    cfg, mesh = get_preset("tiny"), make_mesh(2, 4)
    graphdef, state, layout, tx = init_state(cfg, TINY_TCFG, mesh)
    return cfg, mesh, graphdef, state, layout, tx, jax.device_get(state)


def test_restore_onto_a_different_mesh(tmp_path, tiny_state):
    cfg, _, _, state, _, _, host = tiny_state
    ck = Checkpointer(tmp_path, async_save=False)
    ck.save(0, state, {"model_config": config_dict(cfg)})
    ck.wait()
    mesh = make_mesh(1, 8)
    _, abs_state, layout, _ = plan(cfg, TINY_TCFG, mesh)
    with jax.set_mesh(mesh):
        restored = ck.restore(0, abstract_state(abs_state, layout))
    chex.assert_trees_all_equal(jax.device_get(restored), host)
    w = restored.params["moe_layers"]["mlp"]["w_gate"][...]
    assert w.sharding.mesh.shape == mesh.shape
    assert w.sharding.spec[1] == axes("expert")
    ck.close()


def test_zero1_shards_every_adam_moment_over_the_data_devices(tiny_state):
    _, mesh, _, state, _, _, _ = tiny_state
    n = mesh.size
    params = {
        jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(state.params)[0]
    }
    moments = 0
    for kp, m in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        key = jax.tree_util.keystr(kp)
        name = next((s for s in (".mu", ".nu") if s in key), None)
        if name is None:
            continue
        p = params[key.split(name, 1)[1]]
        assert m.shape == p.shape, key
        # replicated parameters (all but routed experts) keep 1/n of their moments per
        # device; expert-sharded ones are already split n ways and stay so
        assert m.addressable_shards[0].data.size * n == m.size, (key, m.sharding.spec)
        moments += 1
    assert moments == 2 * len(params)


def test_a_train_step_moves_the_routing_bias_by_the_expert_load(tiny_state):
    """V3TR 2.1.2: after the step every expert's bias moved by gamma against its load's
    deviation from the mean (load from the same forward pass, computed separately)."""
    from flax import nnx

    from deepseek_jax.moe.routing import update_bias
    from deepseek_jax.train.step import batch_sharding, global_batch, jit_train_step

    cfg, mesh, graphdef, state, layout, tx, _ = tiny_state
    rows = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 17))
    ids = global_batch(rows, batch_sharding(mesh), 8, 16)
    with jax.set_mesh(mesh):
        out = nnx.jit(lambda m, x: m(x))(nnx.merge(graphdef, state.params, state.rest), ids[:, :-1])
    load_LE = np.asarray(out.moe_stats.load_LE)
    before = np.asarray(state.rest["moe_layers"]["mlp"]["e_score_correction_bias"][...])
    step = jit_train_step(graphdef, tx, TINY_TCFG, layout, mesh)
    new, _ = step(jax.tree.map(jnp.copy, state), ids)  # the step donates its input
    after = np.asarray(new.rest["moe_layers"]["mlp"]["e_score_correction_bias"][...])
    want = np.stack(
        [update_bias(b, l, TINY_TCFG.bias_gamma) for b, l in zip(before, load_LE, strict=True)]
    )
    assert np.any(after != before)
    np.testing.assert_array_equal(after, want)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path, reference):
    """Two processes of 4 CPU devices each (the mesh's node axis is the process) log the
    one-process run's losses."""
    port = _free_port()
    procs = [
        _spawn(
            SCHEDULE
            + [
                "--ckpt-every",  # one save at the end: saves do not change the losses
                "100",
                "--out",
                str(tmp_path / "two"),
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                "--cpu-devices",
                "4",
            ],
            env=_env(None),
        )
        for i in range(2)
    ]
    for p in procs:
        log = p.communicate(timeout=600)[0]
        assert p.returncode == 0, log
    got = _losses(tmp_path / "two")
    assert sorted(got) == list(range(12))
    for s in range(12):
        np.testing.assert_allclose(got[s][0], reference[s][0], rtol=1e-6)


@pytest.mark.parametrize(
    "args, message",
    [
        (["n_group=3"], "n_routed_experts"),
        (["hidden_size=big"], "hidden_size: expected int"),
        (["bogus_field=1"], "unknown model config field"),
        (["--mesh", "node=3,gpu=2"], "does not match the 8 available devices"),
        (["--mesh", "node=2,gpu=8"], "does not match"),
        (["--mesh", "nodes=2"], "expected node=N,gpu=G"),
        (["--batch-size", "6"], "not divisible by the data-parallel size 8"),
        (["--seq-len", "4096"], "exceeds max_position_embeddings 512"),
        (["--data", "/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
        (["--steps", "0"], "TrainConfig.steps"),
    ],
)
def test_bad_inputs_are_one_line_errors(tmp_path, capsys, args, message):
    argv = TINY + ["--steps", "2", "--out", str(tmp_path / "o")]
    overrides = [a for a in args if "=" in a and not a.startswith("node")]
    flags = [a for a in args if a not in overrides]
    assert main(argv + flags + overrides) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_unknown_preset_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--preset", "huge"])
    assert e.value.code == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err


def _files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in root.rglob("*") if f.is_file()}


def test_resume_differences_architecture_always_schedule_once_trained():
    cfg, tcfg = get_preset("tiny"), TrainConfig(steps=4, batch_size=8, seq_len=16)
    saved = run_meta(cfg, tcfg, data="bytes-0123")
    same = run_meta(cfg.with_overrides(["dtype=bfloat16", "fp8=true"]), tcfg, data="bytes-0123")
    assert resume_differences(saved, same, step=3) == []  # run options may change
    other = run_meta(
        cfg.with_overrides(["hidden_size=32"]),
        TrainConfig(steps=8, batch_size=8, seq_len=16, seed=1),
        data="bytes-4567",
    )
    assert resume_differences(saved, other, step=3) == [
        "model_config.hidden_size: saved 64, now 32",
        "train.seed: saved 0, now 1",
        "train.steps: saved 4, now 8",
        "data: saved 'bytes-0123', now 'bytes-4567'",
    ]
    # a step-0 checkpoint (a conversion) has trained on nothing: any data and schedule
    assert resume_differences(saved, other, step=0) == [
        "model_config.hidden_size: saved 64, now 32"
    ]


def test_corrupt_and_incompatible_checkpoints(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(TINY + ["--steps", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    ckpt = out / "checkpoints"
    before = _files(ckpt)
    # a different model, seed or schedule in the same out dir: refused, naming the field
    for change, field in (
        (["--steps", "2", "hidden_size=32"], "model_config.hidden_size: saved 64, now 32"),
        (["--steps", "1", "--seed", "1"], "train.seed: saved 0, now 1"),
        (["--steps", "3"], "train.steps: saved 1, now 3"),
    ):
        assert main(TINY + ["--out", str(out), *change]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: incompatible checkpoint") and field in err, err
        assert "\n" not in err and "--allow-config-change" in err
    assert _files(ckpt) == before
    # run options (the dtype a GPU run adds) may change; --allow-config-change overrides
    assert main(TINY + ["--out", str(out), "--steps", "1", "--dtype", "bfloat16"]) == 0
    assert (
        main(TINY + ["--out", str(out), "--steps", "1", "--seed", "1", "--allow-config-change"])
        == 0
    )
    assert "changed train.seed: saved 0, now 1" in capsys.readouterr().out
    assert _files(ckpt) == before  # nothing trained, nothing saved
    # a damaged checkpoint: refused, and left as it was
    for f in (ckpt / "1").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "manifest" in f.name:
            f.write_bytes(b"garbage")
    damaged = _files(ckpt)
    assert damaged != before
    assert main(TINY + ["--steps", "2", "--out", str(out)]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert _files(ckpt) == damaged


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(
        TINY
        + [
            "--steps",
            "6",
            "--ckpt-every",
            "1",
            "--lr",
            "1e30",
            "--warmup-steps",
            "0",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "loss is nan" in err.lower() or "loss is inf" in err.lower(), err
    assert "last good checkpoint is step" in err
    good = int(err.split("last good checkpoint is step ")[1].split()[0])
    assert (out / "checkpoints" / str(good)).exists()
