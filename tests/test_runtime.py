"""Entry-point process set-up: the one-time re-exec with huge-page malloc."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCRIPT = """
import os, sys
from experiments.runtime import reexec_with_hugepage_malloc
print("run", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:], flush=True)
reexec_with_hugepage_malloc()
"""


def _run(tmp_path, **env):
    script = tmp_path / "entry.py"
    script.write_text(SCRIPT)
    full_env = {
        k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "DEEPSEEK_JAX_NO_REEXEC")
    }
    full_env.update(env, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, str(script), "a b", "--flag"],
        env=full_env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [line.split(" ", 3) for line in out.stdout.splitlines()]


@pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables are Linux-only")
def test_restarts_once_with_the_tunable_and_the_same_pid_and_arguments(tmp_path):
    runs = _run(tmp_path, GLIBC_TUNABLES="glibc.malloc.arena_max=4")
    assert len(runs) == 2  # the original start and one restart, no loop
    (_, pid0, tun0, args0), (_, pid1, tun1, args1) = runs
    assert pid0 == pid1 and args0 == args1 == "['a b', '--flag']"
    assert tun0 == "glibc.malloc.arena_max=4"
    assert tun1 == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"  # existing ones kept


def test_opt_out_runs_once(tmp_path):
    assert len(_run(tmp_path, DEEPSEEK_JAX_NO_REEXEC="1")) == 1
