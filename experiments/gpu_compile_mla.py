"""Compile the Pallas MLA decode kernel (``pallas_kernels/mla_decode.py``) for one abstract
GPU on this CPU machine (JAX_NOTES.md, "Checking overlap without a GPU"): does it fit the
GPU's shared memory at a given shape?

    JAX_PLATFORMS=cpu .venv-gpu/bin/python -m experiments.gpu_compile_mla \\
        --heads 128 --batch 4 --context 1024 heads_per_block=64

Needs the CUDA plugin wheels (``make gpu-compile`` builds ``.venv-gpu``). The pool is
bfloat16 (the GPU's default dtype) with V3's C=512 and R=64 unless told otherwise;
trailing ``field=value`` arguments set ``Blocks`` fields. Prints one JSON line: ``ok``,
the compile seconds and the kernels' custom-call targets, or the compiler's error.
Exit status 0 either way: a failed compile is a result, not a crash.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the plugin must not try to open a GPU

import argparse
import collections
import dataclasses
import json
import re
import sys
import time

_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", default="h200", help="h100 | h200")
    p.add_argument("--batch", type=int, default=4, help="requests (B)")
    p.add_argument("--context", type=int, default=1024, help="page-table positions (M P)")
    p.add_argument("--heads", type=int, default=128, help="H")
    p.add_argument("--lora", type=int, default=512, help="kv_lora_rank C")
    p.add_argument("--rope", type=int, default=64, help="rope dim R")
    p.add_argument("--page", type=int, default=16, help="positions per page P")
    p.add_argument("blocks", nargs="*", help="Blocks field=value (integers)")
    return p.parse_args(argv)


def _blocks(items: list[str]):
    from pallas_kernels.mla_decode import Blocks

    names = {f.name for f in dataclasses.fields(Blocks)}
    kw = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or key not in names or not val.isdigit():
            raise ValueError(f"{item!r}: expected field=integer, field one of {sorted(names)}")
        kw[key] = int(val)
    return Blocks(**kw)


def run(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from deepseek_jax.codesign import gpu_compile as gc
    from pallas_kernels.mla_decode import mla_decode

    blocks = _blocks(args.blocks)
    if args.context % args.page:
        raise ValueError(f"--context {args.context} is not a multiple of --page {args.page}")
    B, H, C, R, PG = args.batch, args.heads, args.lora, args.rope, args.page
    M = args.context // PG
    mesh = gc.gpu_mesh(args.target, node=1, gpu=1)
    rep = NamedSharding(mesh, P())
    bf16, i32 = jnp.bfloat16, jnp.int32
    shapes = [
        ((B, H, C), bf16), ((B, H, R), bf16), ((1 + B * M, PG, C), bf16),
        ((1 + B * M, PG, R), bf16), ((B, M), i32), ((B,), i32),
    ]  # fmt: skip
    specs = [jax.ShapeDtypeStruct(s, d, sharding=rep) for s, d in shapes]
    fn = jax.jit(lambda *a: mla_decode(*a, blocks=blocks, interpret=False))
    result = {
        "target": args.target,
        "shape": {"B": B, "H": H, "C": C, "R": R, "P": PG, "M": M},
        "blocks": dataclasses.asdict(blocks),
    }
    with jax.set_mesh(mesh):
        lowered = fn.trace(*specs).lower()
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile(compiler_options=gc.DEVICELESS_XLA_OPTIONS)
    except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED etc.
        return result | {"ok": False, "error": str(e).splitlines()[0][:500]}
    return result | {
        "ok": True,
        "compile_s": round(time.perf_counter() - t0, 1),
        "custom_calls": dict(collections.Counter(_CUSTOM_CALL.findall(compiled.as_text()))),
    }


def main(argv: list[str] | None = None) -> int:
    print(json.dumps(run(parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
