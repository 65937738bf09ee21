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
import numpy as np
import pytest

from deepseek_jax.config import get_preset
from deepseek_jax.mesh import make_mesh
from deepseek_jax.train.checkpoint import Checkpointer, config_dict
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.state import abstract_state, init_state, plan
from experiments.train import main

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


def test_killed_run_resumes_bit_identical(tmp_path):
    steps = ["--steps", "12", "--ckpt-every", "4"]
    ref = _spawn(TINY + steps + ["--out", str(tmp_path / "ref")])
    run = _spawn(TINY + steps + ["--out", str(tmp_path / "run")])
    _wait_for(tmp_path / "run" / "checkpoints" / "4", run)
    run.send_signal(signal.SIGKILL)  # no chance to save: resume from the last committed step
    run.wait()
    assert ref.wait() == 0, ref.stdout.read()
    resumed = _spawn(TINY + steps + ["--out", str(tmp_path / "run")])
    log = resumed.communicate()[0]
    assert resumed.returncode == 0, log
    assert "resumed from" in log
    want, got = _losses(tmp_path / "ref"), _losses(tmp_path / "run")
    assert sorted(want) == list(range(12)) and sorted(got) == list(range(12))
    for step, losses in got.items():
        assert all(x == want[step][0] for x in losses), (step, losses, want[step])  # bitwise


def test_sigterm_finishes_step_saves_and_exits(tmp_path):
    out = tmp_path / "run"
    run = _spawn(TINY + ["--steps", "500", "--ckpt-every", "2", "--out", str(out)])
    _wait_for(out / "checkpoints" / "2", run)
    run.send_signal(signal.SIGTERM)
    log = run.communicate(timeout=120)[0]
    assert run.returncode == 0, log
    assert "interrupted; checkpoint saved" in log
    steps = _losses(out)
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == max(steps) + 1  # the state after the last finished step is on disk


def test_restore_onto_a_different_mesh(tmp_path):
    cfg, tcfg = get_preset("tiny"), TrainConfig(steps=2, batch_size=8, seq_len=16)
    _, state, _, _ = init_state(cfg, tcfg, make_mesh(1, 8))
    meta = {"model_config": config_dict(cfg)}
    ck = Checkpointer(tmp_path, async_save=False)
    ck.save(0, state, meta)
    ck.wait()
    mesh = make_mesh(2, 4)
    _, abs_state, layout, _ = plan(cfg, tcfg, mesh)
    with jax.set_mesh(mesh):
        restored = ck.restore(0, abstract_state(abs_state, layout), meta)
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
    w = restored.params["moe_layers"]["mlp"]["w_gate"][...]
    assert w.sharding.mesh.shape == mesh.shape
    assert w.sharding.spec[1] == ("node", "gpu")
    ck.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    common = TINY + ["--steps", "3", "--mesh", "node=2,gpu=4", "--ckpt-every", "100"]
    one = _spawn(common + ["--out", str(tmp_path / "one")])
    port = _free_port()
    procs = [
        _spawn(
            common
            + [
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
    for p in [one, *procs]:
        log = p.communicate(timeout=600)[0]
        assert p.returncode == 0, log
    want, got = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(got) == [0, 1, 2]
    for s in range(3):
        np.testing.assert_allclose(got[s][0], want[s][0], rtol=1e-6)


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


def test_corrupt_and_incompatible_checkpoints(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(TINY + ["--steps", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    # a different model in the same out dir: refused, naming the field
    assert main(TINY + ["--steps", "2", "--out", str(out), "hidden_size=32"]) == 2
    err = capsys.readouterr().err
    assert "incompatible checkpoint" in err and "hidden_size" in err
    # a damaged checkpoint: refused, and left as it was
    for f in (out / "checkpoints" / "1").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "manifest" in f.name:
            f.write_bytes(b"garbage")
    assert main(TINY + ["--steps", "2", "--out", str(out)]) == 2
    assert "checkpoint" in capsys.readouterr().err


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
    assert rc == 2 and "loss is nan" in err.lower() or "loss is inf" in err.lower(), err
    assert "last good checkpoint is step" in err
    good = int(err.split("last good checkpoint is step ")[1].split()[0])
    assert (out / "checkpoints" / str(good)).exists()
