"""Entry-point process set-up: the malloc mode, picked with the train step's backends."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.runtime import malloc_mode

ROOT = Path(__file__).parents[1]
KERNELS = ("deepseek_jax_native_DsjGmm", "deepseek_jax_native_DsjAttnFwd")
# An entry point whose train step's backends were decided: the kernels it calls are argv[1].
SCRIPT = """
import os, sys
from experiments.runtime import choose_malloc, start
print("run", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:], flush=True)
start(trains=True)
choose_malloc("train_step", tuple(filter(None, sys.argv[1].split(","))))
choose_malloc("another", ())  # only the first decided program picks the mode
"""


@pytest.mark.parametrize(
    "kernels, env, restart, says",
    [
        ((), {}, True, "train_step calls no C++ kernel"),  # XLA only: huge pages help
        (KERNELS, {}, False, "calls C++ kernels (native_DsjGmm, native_DsjAttnFwd)"),
        ((), {"DEEPSEEK_JAX_NO_REEXEC": "1"}, False, "DEEPSEEK_JAX_NO_REEXEC"),
        (KERNELS, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, False, "set by the user"),
        ((), {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, False, "set by the user"),
        ((), {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, True, "no C++ kernel"),
    ],
)
def test_malloc_mode_follows_the_kernels_the_program_calls(kernels, env, restart, says):
    got, line = malloc_mode("train_step", kernels, env, os_name="linux")
    assert got == restart and says in line
    assert line.startswith("malloc: huge pages" if restart else "malloc:")


def test_malloc_mode_keeps_the_default_where_the_tunable_was_not_measured_to_help():
    for kwargs in ({"platform": "gpu"}, {"processes": 2}, {"os_name": "darwin"}):
        assert malloc_mode("train_step", (), {}, **{"os_name": "linux", **kwargs})[0] is False
    restart, line = malloc_mode(None, (), {}, os_name="linux")  # an entry point that trains not
    assert not restart and "glibc default" in line


def _run(tmp_path, kernels="", **env):
    script = tmp_path / "entry.py"
    script.write_text(SCRIPT)
    drop = ("GLIBC_TUNABLES", "DEEPSEEK_JAX_NO_REEXEC", "DEEPSEEK_JAX_MALLOC_RESTARTED")
    full_env = {k: v for k, v in os.environ.items() if k not in drop}
    full_env.update(env, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, str(script), kernels, "--flag"],
        env=full_env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return [line.split(" ", 3) for line in out.stdout.splitlines()], out.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables are Linux-only")
def test_an_xla_only_step_restarts_once_with_the_tunable_and_the_same_pid_and_arguments(
    tmp_path,
):
    runs, log = _run(tmp_path, GLIBC_TUNABLES="glibc.malloc.arena_max=4")
    assert len(runs) == 2  # the original start and one restart, no loop
    (_, pid0, tun0, args0), (_, pid1, tun1, args1) = runs
    assert pid0 == pid1 and args0 == args1 == "['', '--flag']"
    assert tun0 == "glibc.malloc.arena_max=4"
    assert tun1 == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"  # existing ones kept
    lines = [line for line in log.splitlines() if line.startswith("malloc:")]
    assert len(lines) == 2 and "restarting" in lines[0] and "restarted for train_step" in lines[1]


def test_a_step_calling_kernels_or_the_opt_out_runs_once(tmp_path):
    runs, log = _run(tmp_path, kernels=",".join(KERNELS))
    assert len(runs) == 1 and runs[0][2] == ""
    assert [line for line in log.splitlines() if line.startswith("malloc:")] == [
        "malloc: glibc default: train_step calls C++ kernels (native_DsjGmm, native_DsjAttnFwd),"
        " bimodal with huge pages"
    ]
    assert len(_run(tmp_path, DEEPSEEK_JAX_NO_REEXEC="1")[0]) == 1
