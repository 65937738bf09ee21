"""8 virtual CPU devices, so a (node=2, gpu=4) mesh is real in tests.

Test programs are tiny and compiled once or twice each, so LLVM's optimisation level 0
(TEST_XLA_FLAGS) cuts the suite's compile time about threefold; numerics are unchanged.

Many tests compile the same program again (a fresh ``jit`` per ``main()`` call, or per
training subprocess), so one persistent XLA compilation cache serves the whole run: the
pytest workers and every subprocess they start inherit its directory. It is made per run
(a clean clone's CI starts empty either way) and removed at the end; a cached executable
is the one XLA would compile again, so no result depends on it.
"""

import atexit
import os
import shutil
import tempfile

TEST_XLA_FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A program race compiles a program up to four times: only tests/test_program_race.py runs it.
os.environ.setdefault("DEEPSEEK_JAX_PROGRAM_RACE", "off")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the first process of the run makes it
    _cache = tempfile.mkdtemp(prefix="deepseek_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() != "gpu":
        skip = pytest.mark.skip(reason="needs a GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def fake_timings(tmp_path, monkeypatch):
    """Fresh decision cache; ``set(ms)`` makes each backend candidate take ms[name]
    milliseconds per run, or, for a list, those samples each time it is measured.
    Returns (set, calls): calls lists every candidate actually measured."""
    from deepseek_jax import backends

    monkeypatch.setenv("DEEPSEEK_JAX_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(backends, "_decisions", {})
    calls, table = [], {}

    def measure(name, run, runs=5, budget_s=0.5):
        calls.append(name)
        ms = table[name]
        return [t / 1e3 for t in (ms if isinstance(ms, list) else [ms])]

    monkeypatch.setattr(backends, "measure", measure)
    return table.update, calls
