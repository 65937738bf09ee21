"""Expert-parallel exchange: inter-node copies per token and layer time, flat vs two-hop.

8 virtual CPU devices as (node=8, gpu=1) and (node=2, gpu=4); 256 routed experts, top-8,
8 groups (one per node on the first mesh), M = topk_group = 4; hidden 256, expert FFN 128,
1 shared expert, float32; 256 random tokens per device through the real router (random
gate). Copies are counted from the send buffers the layer actually fills: the flat path
sends one row per (token, expert) on another node, the two-hop path one per (token,
other node), so its count is at most M = 4. Times are medians of the jitted MoE layer
forward, the paths timed round-robin (CPU: the collectives are memory copies, so the
time says little about a real network). The last line is JSON; its top-level figures are
the (node=8, gpu=1) mesh, ``meshes`` has both.

    python -m experiments.bench_ep [--rounds 5] [--tokens 256]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax import sharding
from deepseek_jax.config import EPOptions
from deepseek_jax.mesh import make_mesh
from deepseek_jax.moe.layer import MoE
from deepseek_jax.presets import get_preset
from experiments.machine_info import describe, log_backend_choices, print_description

MESHES = ((8, 1), (2, 4))
PATHS = ("flat", "two_hop")
OVERRIDES = [
    "n_routed_experts=256",
    "num_experts_per_tok=8",
    "n_group=8",
    "topk_group=4",
    "hidden_size=256",
    "moe_intermediate_size=128",
    "dtype=float32",
]


def build(mesh, path: str, overrides: list[str] = ()):
    """The MoE layer sharded on ``mesh`` and its jitted forward (output, stats)."""
    cfg = get_preset("bench-small", [*OVERRIDES, *overrides])
    graphdef, state = nnx.split(MoE(cfg, rngs=nnx.Rngs(0), ep=EPOptions(path=path)))
    with jax.set_mesh(mesh):
        state = jax.device_put(state, sharding.state_shardings(state, mesh))
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return cfg, state, forward


def measure(node: int, gpu: int, tokens: int, rounds: int, overrides: list[str] = ()) -> dict:
    mesh = make_mesh(node, gpu)
    runs = {p: build(mesh, p, overrides) for p in PATHS}
    cfg = runs["flat"][0]
    x = jax.random.normal(jax.random.key(1), (8, tokens, cfg.hidden_size), jnp.float32)
    out, times = {}, {p: [] for p in PATHS}
    with jax.set_mesh(mesh):
        x = jax.device_put(x, sharding.logical_to_spec(("batch",)))
        for p, (_, state, fwd) in runs.items():  # compile, warm up, read the counts
            y, stats = jax.block_until_ready(fwd(state, x))
            out[p] = (y, stats)
        for _ in range(rounds):
            for p, (_, state, fwd) in runs.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fwd(state, x))
                times[p].append(time.perf_counter() - t0)
    n_tok = 8 * tokens
    assignments = n_tok * cfg.num_experts_per_tok
    row = {"mesh": f"node={node},gpu={gpu}"}
    for p in PATHS:
        stats = out[p][1]
        row[p] = {
            "internode_copies_per_token": int(stats.internode) / n_tok,
            "intranode_copies_per_token": int(stats.intranode) / n_tok,
            "dropped_fraction": int(stats.dropped) / assignments,
            "ms": 1e3 * float(np.median(times[p])),
        }
    row["max_abs_diff"] = float(jnp.max(jnp.abs(out["flat"][0] - out["two_hop"][0])))
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per device")
    ap.add_argument("overrides", nargs="*", help="model config overrides key=value")
    args = ap.parse_args(argv)
    log_backend_choices()
    rows = [measure(n, g, args.tokens, args.rounds, args.overrides) for n, g in MESHES]
    print(
        f"MoE layer, 256 experts top-8, 8 groups, M=4, {8 * args.tokens} random tokens, "
        f"hidden 256, FFN 128, float32, {jax.default_backend()}, median of {args.rounds}"
        + (f", overrides {' '.join(args.overrides)}" if args.overrides else "")
    )
    print(f"{'mesh':<14} {'path':<8} {'inter/tok':>9} {'intra/tok':>9} {'dropped':>8} {'ms':>8}")
    for r in rows:
        for p in PATHS:
            f = r[p]
            print(
                f"{r['mesh']:<14} {p:<8} {f['internode_copies_per_token']:>9.3f} "
                f"{f['intranode_copies_per_token']:>9.3f} {f['dropped_fraction']:>8.2%} "
                f"{f['ms']:>8.1f}"
            )
        cut = r["flat"]["internode_copies_per_token"] / max(
            r["two_hop"]["internode_copies_per_token"], 1e-9
        )
        r["internode_reduction"] = cut
        print(
            f"{r['mesh']:<14} inter-node copies cut {cut:.2f}x by two-hop "
            f"(outputs differ by {r['max_abs_diff']:.1e})"
        )
    main_row = rows[0]
    result = {
        "flat_internode_copies_per_token": round(main_row["flat"]["internode_copies_per_token"], 4),
        "twohop_internode_copies_per_token": round(
            main_row["two_hop"]["internode_copies_per_token"], 4
        ),
        "dropped_fraction": max(r[p]["dropped_fraction"] for r in rows for p in PATHS),
        "flat_ms": round(main_row["flat"]["ms"], 2),
        "twohop_ms": round(main_row["two_hop"]["ms"], 2),
        "internode_reduction": round(main_row["internode_reduction"], 3),
        "meshes": rows,
        "overrides": args.overrides,
        "machine": describe(),
    }
    print_description(result["machine"])
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
