"""Run the notebooks top to bottom in a kernel of this Python: ``python -m experiments.notebooks``.

``make notebooks`` runs them at full size and saves each figure as a PNG next to its
notebook, ``<notebook>-<figure>.png``, named by the ``figure`` entry of the cell's metadata
(``# %% figure="loss"`` in the percent-format twin). ``make test`` runs them with
``--small`` (``DEEPSEEK_JAX_NOTEBOOK_SMALL=1``: a few steps of the ``tiny`` preset).

The kernel is this interpreter, declared in a temporary kernelspec, with this repository
first on ``PYTHONPATH``: no user-wide kernel is needed, and a clone tests its own code.
The notebooks are only read; their stored copies stay without outputs. Each run reports its
wall time and the kernel's CPU time (user + sys, its child processes included).

A figure cell may declare what it needs (``# %% figure="gpu_schedule" needs=".venv-gpu"``):
without that path it prints how to get it and draws nothing, which is not an error, except
under ``make test`` (``DEEPSEEK_JAX_REQUIRE_GPU_COMPILE=1``, which builds ``.venv-gpu``).

    python -m experiments.notebooks [--small] [--save-figures] [name ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = ("quickstart", "mla_memory", "moe_routing")
SMALL_ENV = "DEEPSEEK_JAX_NOTEBOOK_SMALL"
KERNEL = "deepseek-jax-notebooks"
REQUIRE_ENV = "DEEPSEEK_JAX_REQUIRE_GPU_COMPILE"  # make test: every figure must be drawn


def kernel_spec_dir(where: Path, *, small: bool) -> Path:
    """Writes a kernelspec that starts ``sys.executable`` with the run's environment."""
    spec = where / "kernels" / KERNEL
    spec.mkdir(parents=True, exist_ok=True)
    path = os.environ.get("PYTHONPATH", "")
    env = {
        "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""),
        SMALL_ENV: "1" if small else "0",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",  # figures become outputs
    }
    kernel = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"deepseek-jax ({sys.executable})",
        "language": "python",
        "env": env,
    }
    (spec / "kernel.json").write_text(json.dumps(kernel, indent=1))
    return spec.parent


# Run after the notebook's own cells (and dropped from the result): the kernel's CPU seconds.
_CPU_CELL = (
    "import resource as _r\n"
    "print(sum(getattr(_r.getrusage(w), f) for w in (_r.RUSAGE_SELF, _r.RUSAGE_CHILDREN)"
    " for f in ('ru_utime', 'ru_stime')))"
)


def _kernel_cpu_s(km) -> float | None:
    """The kernel process's CPU seconds so far (user + sys, with its waited-for children),
    from /proc; None where there is no /proc."""
    pid = getattr(getattr(km, "provisioner", None), "pid", None)
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def execute(path: Path, *, small: bool, timeout: int = 1800, progress: bool = False):
    """The notebook at ``path`` executed in a fresh kernel (cwd: its folder); its metadata
    gains ``cpu_s``, the kernel's CPU time (user + sys, with its child processes).

    Raises ``nbclient.exceptions.CellExecutionError`` (with the cell's traceback) on the
    first failing cell.
    """
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(_CPU_CELL))
    clock = [time.perf_counter(), 0.0]  # wall, kernel CPU at the last cell's end

    def report(cell, cell_index, **_):
        now, cpu = time.perf_counter(), _kernel_cpu_s(km)
        if progress and cell.source != _CPU_CELL:
            first = "".join(cell.source).strip().splitlines()[:1] or [""]
            used = f"{cpu - clock[1]:6.1f} s CPU" if cpu is not None else ""
            line = f"  [{cell_index:2d}] {now - clock[0]:6.1f} s {used}  {first[0][:64]}"
            print(line, flush=True)
        clock[0], clock[1] = now, cpu or 0.0

    with tempfile.TemporaryDirectory() as tmp:
        ksm = KernelSpecManager(kernel_dirs=[str(kernel_spec_dir(Path(tmp), small=small))])
        km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=ksm)
        client = NotebookClient(
            nb,
            km=km,
            timeout=timeout,
            kernel_name=KERNEL,
            resources={"metadata": {"path": str(path.parent)}},
            on_cell_executed=report,
        )
        try:
            client.execute()
        finally:  # nbclient leaves a kernel it did not start running
            if km.has_kernel:
                km.shutdown_kernel(now=True)
    cpu = nb.cells.pop()
    nb.metadata["cpu_s"] = float("".join(o.get("text", "") for o in cpu.outputs).strip())
    return nb


def figures(nb) -> dict[str, list[bytes]]:
    """PNG images by figure name: the image outputs of each cell whose metadata names one."""
    import base64

    out: dict[str, list[bytes]] = {}
    for cell in nb.cells:
        name = cell.get("metadata", {}).get("figure")
        if cell.cell_type == "code" and name:
            data = [o.get("data", {}) for o in cell.outputs]
            out[name] = [base64.b64decode(d["image/png"]) for d in data if "image/png" in d]
    return out


def unmet_needs(nb) -> dict[str, str]:
    """Figures whose cell needs a path this clone lacks (``needs`` in the cell's metadata,
    relative to the repository, e.g. ``.venv-gpu``): figure name -> that path. Such a cell
    says how to get it instead of drawing; with DEEPSEEK_JAX_REQUIRE_GPU_COMPILE set (``make
    test``), nothing is excused."""
    if os.environ.get(REQUIRE_ENV):
        return {}
    out = {}
    for cell in nb.cells:
        meta = cell.get("metadata", {})
        if meta.get("figure") and meta.get("needs") and not (ROOT / meta["needs"]).exists():
            out[meta["figure"]] = meta["needs"]
    return out


def empty_figures(nb) -> list[str]:
    """Figure cells that drew no image, less those excused by ``unmet_needs``."""
    excused = unmet_needs(nb)
    return sorted(n for n, pngs in figures(nb).items() if not pngs and n not in excused)


def expected_figures(nb) -> list[str]:
    """The figure names the notebook's cells declare (``figure`` in the cell metadata)."""
    return [c.metadata["figure"] for c in nb.cells if c.get("metadata", {}).get("figure")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", default=list(NOTEBOOKS), help="notebooks to run")
    ap.add_argument("--small", action="store_true", help="the test suite's short run")
    ap.add_argument(
        "--save-figures", action="store_true", help="write <notebook>-<figure>.png beside each"
    )
    args = ap.parse_args(argv)
    for name in args.names:
        path = NOTEBOOK_DIR / f"{Path(name).stem}.ipynb"
        if not path.exists():
            print(f"error: no notebook {path}", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        print(f"{path.name}:", flush=True)
        nb = execute(path, small=args.small, progress=True)
        figs = figures(nb)
        wall, cpu = time.perf_counter() - t0, nb.metadata["cpu_s"]
        print(f"{path.name}: ran in {wall:.0f} s (kernel CPU {cpu:.0f} s), figures {sorted(figs)}")
        for fig_name, need in unmet_needs(nb).items():
            print(f"  {fig_name}: not drawn, {need} is missing (see the cell's output)")
        empty = empty_figures(nb)
        if empty:
            print(f"error: {path.name}: figure cells {empty} drew no image", file=sys.stderr)
            return 1
        if args.save_figures:
            for fig_name, pngs in figs.items():
                for i, png in enumerate(pngs):
                    suffix = f"-{i + 1}" if len(pngs) > 1 else ""
                    target = path.with_name(f"{path.stem}-{fig_name}{suffix}.png")
                    target.write_bytes(png)
                    print(f"  {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
