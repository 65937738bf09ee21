"""The Colab notebooks: valid notebooks whose code compiles (fast), and that run top to
bottom in their smoke mode (slow; the install cell is a no-op once the package imports)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def _code(nb_path: Path) -> list[str]:
    nb = json.loads(nb_path.read_text())
    assert nb["nbformat"] == 4, nb_path
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] for c in cells), f"{nb_path.name}: commit without outputs"
    return ["".join(c["source"]) for c in cells]


def test_there_is_a_notebook():
    assert NOTEBOOKS


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_code_compiles(nb_path):
    for i, src in enumerate(_code(nb_path)):
        compile(src, f"{nb_path.name}[cell {i}]", "exec")


@pytest.mark.slow
@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_smoke_mode(nb_path, tmp_path):
    script = tmp_path / "nb.py"
    script.write_text("import matplotlib\nmatplotlib.use('Agg')\n" + "\n\n".join(_code(nb_path)))
    env = {**os.environ, "DEEPSEEK_JAX_NOTEBOOK_SMOKE": "1"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # what the notebook sets
    root = Path(__file__).parents[1]
    env["PYTHONPATH"] = f"{root}{os.pathsep}{env.get('PYTHONPATH', '')}"
    proc = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
