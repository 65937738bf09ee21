"""Forward time of one MoE layer versus the number of routed experts.

4096 tokens, hidden 512, expert FFN 256, top-4, 1 shared expert, float32 (preset
``bench-small``). The routed work per token is the same for every E, so a good expert
kernel keeps the time nearly flat: target time(E=256) / time(E=16) <= 1.3.
The E values are timed round-robin and reduced by the median, so that load from other
processes on a shared machine hits all of them alike. The last line is JSON.

On CPU ``--backend auto`` is ``grouped``: our C++ grouped GEMM (``cpu_kernels``) over the
exact group sizes. What still grows with E there (2 cores, measured): the expert weights
themselves, 402 MB at E = 256 against 25 MB at E = 16 in float32, which take ~8.7 ms
just to stream from memory (46 GB/s), and the router's [T, 512] x [512, E] matmul
(~2.5 ms). ``--backend einsum`` (capacity slots) pays more: one batched matmul
[E, C, 512] x [E, 512, 256] costs 1.04 us per row at E = 256, C = 80 against 0.61 us at
E = 16, C = 1088 (21.3 vs 10.7 ms), since XLA packs each expert's weights for only C
rows, plus 25 % padding and a spill loop of ~34 blocks (~3 ms): ratio ~1.56.
With ``einsum`` the "spilled" column is the share of rows beyond the slots.

    python -m experiments.bench_moe [--rounds 7] [--backend auto]
"""

from __future__ import annotations

import argparse
import json
import time
import typing

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.config import MoEBackend
from deepseek_jax.moe import dispatch, routing
from deepseek_jax.moe.layer import MoE
from deepseek_jax.presets import get_preset
from experiments.machine_info import describe, log_backend_choices, print_description

EXPERTS = (16, 64, 256)
TARGET_RATIO = 1.3


def build(n_experts: int, backend: str, overrides: list[str] = ()):
    cfg = get_preset(
        "bench-small",
        [
            f"n_routed_experts={n_experts}",
            "n_group=8",
            "topk_group=4",
            "dtype=float32",
            *overrides,
        ],
    )
    model = MoE(cfg, rngs=nnx.Rngs(0), backend=backend)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x_BTD):
        y_BTD, stats = nnx.merge(graphdef, state)(x_BTD)
        return y_BTD, stats.load_E

    return cfg, state, forward


def spilled_fraction(cfg, state, x_BTD) -> float:
    """Share of (token, expert) assignments beyond the dense slots (run by the spill loop)."""
    x_TD = x_BTD.reshape(-1, cfg.hidden_size)
    scores = routing.gate_scores(x_TD @ state["gate"][...], cfg)
    idx_TK, _ = routing.route(scores, state["e_score_correction_bias"][...], cfg)
    T, K = idx_TK.shape
    sizes = dispatch.SlotSizes.for_shapes(T, K, cfg.n_routed_experts)
    d = dispatch.sort_assignments(idx_TK, cfg.n_routed_experts, sizes)
    return float(jnp.sum(jnp.maximum(d.counts_E - sizes.capacity, 0)) / (T * K))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--backend", default="auto", choices=typing.get_args(MoEBackend))
    ap.add_argument("overrides", nargs="*", help="model config overrides key=value")
    args = ap.parse_args(argv)
    log_backend_choices()
    runs = {e: build(e, args.backend, args.overrides) for e in EXPERTS}
    D = runs[EXPERTS[0]][0].hidden_size
    x_BTD = jax.random.normal(jax.random.key(1), (4, 1024, D), jnp.float32)
    for _, state, fwd in runs.values():  # compile and warm up
        for _ in range(2):
            jax.block_until_ready(fwd(state, x_BTD))
    times = {e: [] for e in EXPERTS}
    for _ in range(args.rounds):
        for e, (_, state, fwd) in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fwd(state, x_BTD))
            times[e].append(time.perf_counter() - t0)
    ms = {e: 1e3 * float(np.median(t)) for e, t in times.items()}
    tokens = x_BTD.shape[0] * x_BTD.shape[1]
    cfg = runs[EXPERTS[0]][0]
    print(
        f"MoE layer forward, {tokens} tokens, hidden {D}, FFN {cfg.moe_intermediate_size}, "
        f"top-{cfg.num_experts_per_tok}, {cfg.n_shared_experts} shared, {cfg.run.dtype}, "
        f"backend {args.backend}, median of {args.rounds} ({jax.default_backend()})"
    )
    slots = args.backend == "einsum"
    print(f"{'E':>5} {'ms':>9} {'tokens/s':>11} {'vs E=16':>8}" + (f" {'spilled':>8}" * slots))
    for e in EXPERTS:
        row = f"{e:>5} {ms[e]:>9.1f} {tokens / ms[e] * 1e3:>11,.0f} {ms[e] / ms[16]:>8.2f}"
        if slots:
            row += f" {spilled_fraction(runs[e][0], runs[e][1], x_BTD):>8.1%}"
        print(row)
    ratio = ms[256] / ms[16]
    result = {
        **{f"ms_{e}": round(ms[e], 2) for e in EXPERTS},
        "ratio_256_to_16": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "pass": bool(ratio <= TARGET_RATIO),
        "backend": args.backend,
        "overrides": args.overrides,
        "machine": describe(),
    }
    print_description(result["machine"])
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    from experiments.runtime import start

    start(trains=False)
    main()
