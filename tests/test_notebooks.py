"""The notebooks: each paired with its percent-format twin, stored without outputs, and run
top to bottom at the SMALL setting in a kernel of this interpreter (``experiments.notebooks``),
every cell that declares a figure drawing one. A failing cell fails the test with its
traceback; so do the notebooks' own assertions (the paper's cache table, the absorbed
decode against the naive path, the node limit, the copy counts)."""

from pathlib import Path

import nbformat
import pytest

from experiments import notebooks

PATHS = [notebooks.NOTEBOOK_DIR / f"{name}.ipynb" for name in notebooks.NOTEBOOKS]


def _cells(nb) -> list[tuple[str, str, str | None]]:
    return [(c.cell_type, c.source.strip(), c.metadata.get("figure")) for c in nb.cells]


def test_the_notebook_folder_holds_exactly_the_listed_pairs():
    ipynb = {p.stem for p in notebooks.NOTEBOOK_DIR.glob("*.ipynb")}
    twins = {p.stem for p in notebooks.NOTEBOOK_DIR.glob("*.py")}
    assert ipynb == twins == set(notebooks.NOTEBOOKS)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_notebook_matches_its_twin_and_has_no_outputs(path: Path):
    import jupytext

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), (
        f"{path.name}: store it without outputs (jupytext --to ipynb {path.stem}.py)"
    )
    twin = jupytext.read(path.with_suffix(".py"))
    assert _cells(nb) == _cells(twin), (
        f"{path.name} and {path.stem}.py differ: run `jupytext --sync notebooks/{path.stem}.py`"
    )
    assert nb.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    assert notebooks.expected_figures(nb), f"{path.name}: no cell declares a figure"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom_at_small(path: Path):
    nb = notebooks.execute(path, small=True, timeout=600)
    figs = notebooks.figures(nb)
    assert set(figs) == set(notebooks.expected_figures(nb))
    empty = notebooks.empty_figures(nb)  # a cell may lack .venv-gpu outside make test
    assert not empty, f"{path.name}: figure cells {empty} drew no image"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in errors if o.output_type == "error"]
