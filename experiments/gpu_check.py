"""One prepared check of our GPU kernels on a Hopper GPU: ``python -m experiments.gpu_check``.

Sections (each guarded, so one failure still prints the rest):
1. environment: versions, device, SM count;
2. lowering: the Mosaic GPU kernels cross-lowered for CUDA (also the only part on a CPU);
3. correctness on the GPU: our FP8 GEMM compiled (dense, ragged edges, bf16 output,
   grouped over ragged experts, two tile configs) against the plain-jnp reference; the xla
   backend; ``fp8_linear`` forward and gradients, pallas vs xla backend
   (``gpu_check_fp8``); the Pallas MLA decode kernel compiled against its jnp twin at
   DeepSeek-V3 decode shapes over ragged paged contexts (``gpu_check_mla``);
4. throughput: TFLOP/s of our FP8 GEMM at 4096^3 and at MoE expert shapes
   (M = 4096 rows; K = 7168, N = 2048 and K = 2048, N = 7168), against ``jnp.dot`` in
   BF16 on the same GPU, plus XLA's per-tensor FP8 dot (cuBLASLt) and our xla backend as
   context, the grouped kernel against ``lax.ragged_dot`` in BF16, and ``fp8_linear``'s
   forward + backward against a BF16 linear; then microseconds per call and effective HBM
   GB/s of the MLA decode kernel against the jitted reference (its own 60 s, kept free of
   the GEMM timings);
5. a table of section 4. The full log goes to $OUT/gpu_check.log if $OUT is set, else
   ./gpu_check.log. Sized to finish within about 5 minutes on an H200; a watchdog
   ($GPU_CHECK_TIMEOUT_S, default 300 s) writes the table and log and exits if a kernel
   hangs, and timings stop at 80 % of it (``gpu_check_harness``).

``--dry-run`` (for CPUs) runs every section with all sizes capped at 256 and the kernels in
their interpreters: a smoke test of this script, with meaningless timings.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from experiments import gpu_check_fp8, gpu_check_mla
from experiments.gpu_check_harness import Row, deadline, dry, guarded, log, section


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = Path(os.environ.get("OUT") or ".")
    return guarded(_run, dry_run="--dry-run" in argv, out_dir=out_dir)


def _run(rows: list[Row]) -> None:
    import jax

    on_gpu = jax.default_backend() == "gpu"

    @section("environment")
    def _():
        log(
            "python",
            sys.version.split()[0],
            "| jax",
            jax.__version__,
            "| backend",
            jax.default_backend(),
        )
        for d in jax.devices():
            log(" ", d, "| kind:", d.device_kind, "| SMs:", getattr(d, "core_count", "?"))

    gpu_check_fp8.lowering()
    if not on_gpu and not dry():
        log(
            "\nno GPU found: only the CPU-safe sections ran (environment, lowering); "
            "--dry-run runs the rest shrunk, in the interpreters."
        )
        return

    gpu_check_fp8.correctness()
    gpu_check_mla.correctness()
    gpu_check_fp8.throughput(rows, until=deadline(reserve_s=gpu_check_mla.BUDGET_S))
    gpu_check_mla.timing(rows)


if __name__ == "__main__":
    sys.exit(main())
