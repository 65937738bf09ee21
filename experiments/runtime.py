"""Process set-up shared by the command-line entry points (not imported by the library):
which malloc the process runs with, decided with its train step's backends.

XLA:CPU allocates each execution's temporaries (about 2 GB per bench-small train step)
with posix_memalign from its worker threads, which glibc serves with a fresh mmap every
time: every step then page-faults them in 4 KiB at a time (~500k faults, ~0.8 CPU-s per
step on 2 cores). ``glibc.malloc.hugetlb=1`` makes glibc advise transparent huge pages
(2 MiB) for those mappings: the XLA-only train step ran 13 % faster with it (700 -> 790
tokens/s, AVX-512 machine). But a train step calling our C++ kernels turned bimodal with
it (steps alternating ~1.9 s and 5-7 s; 1,005 tokens/s without it), so the tunable is
only worth having when the program that runs calls no C++ kernel.

glibc reads tunables only at start-up, so every entry point starts without the tunable
and calls ``start`` first; in an entry point that trains, the first program whose backends
are decided (``program_race``: raced, or the cached decision) picks the mode, before it
compiles, and an XLA-only program restarts the process once with the tunable (same pid,
argv and environment plus the tunable; the decision is cached, so the restarted process
does not race again). Entry points that train nothing keep glibc's default: their
programs' backends are decided while compiling them, and the tunable was never measured
to help them. ``DEEPSEEK_JAX_NO_REEXEC=1`` keeps the default; a ``GLIBC_TUNABLES`` that
already names ``glibc.malloc.hugetlb`` is honoured as set. One log line says which mode
and why.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence

_TUNABLE = "glibc.malloc.hugetlb=1"
_RESTARTED = "DEEPSEEK_JAX_MALLOC_RESTARTED"  # set on the restart: the program it was for
_log = logging.getLogger("deepseek_jax.runtime")
_decided: list[str] = []  # the program that picked this process's mode


def malloc_mode(
    program: str | None,
    kernels: Sequence[str],
    env: Mapping[str, str],
    *,
    platform: str = "cpu",
    processes: int = 1,
    os_name: str = sys.platform,
) -> tuple[bool, str]:
    """(restart with the huge-page tunable?, the log line) for a process whose program
    ``program`` calls the C++ ``kernels`` (None: the entry point races no train step)."""
    tunables = env.get("GLIBC_TUNABLES", "")
    huge, default = f"malloc: huge pages ({_TUNABLE})", "malloc: glibc default"
    if "glibc.malloc.hugetlb" in tunables:
        if env.get(_RESTARTED):
            return False, f"{huge}: restarted for {env[_RESTARTED]}, which calls no C++ kernel"
        return False, f"malloc: as GLIBC_TUNABLES={tunables} says (set by the user)"
    if os_name != "linux":
        return False, f"{default}: glibc tunables are Linux-only ({os_name})"
    if env.get("DEEPSEEK_JAX_NO_REEXEC"):
        return False, f"{default}: DEEPSEEK_JAX_NO_REEXEC is set"
    if program is None:
        return False, f"{default}: no train step here (huge pages measured on train steps only)"
    if platform != "cpu":
        return False, f"{default}: {program} runs on {platform} (huge pages help XLA:CPU)"
    if kernels:
        names = ", ".join(k.removeprefix("deepseek_jax_") for k in kernels)
        return False, f"{default}: {program} calls C++ kernels ({names}), bimodal with huge pages"
    if processes > 1:
        return False, f"{default}: {processes} processes (a restart would leave the others)"
    return True, f"{huge}: {program} calls no C++ kernel; restarting with the tunable"


def start(trains: bool) -> None:
    """Call first in every entry point's ``__main__``. ``trains``: whether it runs a raced
    train step (``jit_train_step``), whose decided backends then pick the malloc."""
    logging.basicConfig(format="%(message)s")
    logging.getLogger("deepseek_jax").setLevel(logging.INFO)
    if not trains:
        _log.info(malloc_mode(None, (), os.environ)[1])
        return
    import deepseek_jax.program_race as program_race

    program_race.listeners.append(choose_malloc)


def choose_malloc(program: str, kernels: Sequence[str]) -> None:
    """A ``program_race`` listener: the first decided program picks this process's malloc
    mode (logged); an XLA-only one restarts the process with the tunable."""
    if _decided:
        return
    _decided.append(program)
    import jax

    restart, line = malloc_mode(
        program,
        kernels,
        os.environ,
        platform=jax.default_backend(),
        processes=jax.process_count(),
    )
    _log.info(line)
    if restart:
        tunables = os.environ.get("GLIBC_TUNABLES", "")
        env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, _TUNABLE])))
        env[_RESTARTED] = program
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)
