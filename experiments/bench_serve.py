"""Serving benchmark: ``python -m experiments.bench_serve``.

    python -m experiments.bench_serve                       # bench-small, random weights
    python -m experiments.bench_serve --checkpoint runs/default    # what `make train` writes

Prompts: with ``--checkpoint``, windows of the run's held-out tokens (the training
corpus's cache, when it is on this machine), else random token ids.

1. Continuous batching: at each concurrency (default 1, 4, 16) that many requests (a
   ``--prompt-len`` prompt, ``--new-tokens`` greedy tokens, no stop token) are submitted
   together to the engine (one prefill program carries up to ``--prefill-rows`` of their
   prompt chunks) and run to the end, after one identical warm-up round (so
   compilation is excluded); ``--repeats`` rounds per level, the levels alternated (the
   machine's load drifts), the median run reported and every run listed. Reported:
   aggregate decode tokens/s (tokens after each request's first, over the span from the
   first request's first token to the last token), time to first token and time per
   output token (p50, p99), peak pages in use.
2. MTP speculative decoding at batch 1: the same requests through the speculative engine;
   acceptance rate of the drafts and decode tokens/s against plain decoding, and the cost
   of a speculative step in plain steps (what bounds the speed-up at a given acceptance:
   random weights accept almost nothing, a trained MTP module 80-90 %). For a checkpoint,
   also the held-out top-1 accuracy of the main head (token t+1) and of the MTP head
   (token t+2), and how often the MTP head's top-1 equals the main head's at the same
   position (teacher-forced: the greedy acceptance rate it allows).
3. Cache capacity: bytes per token of the latent cache (BF16) and how many requests at
   ``--context`` tokens a ``--cache-gib`` budget holds, against a GQA model of the same
   width (``--gqa-kv-heads`` KV heads of hidden/heads dims; ``deepseek_jax.codesign``).
4. ``--load-s`` seconds of HTTP load on 127.0.0.1 (16 client threads: streamed and whole
   completions, bad requests, clients that leave mid-stream); a request is lost when it
   neither completes nor gets a JSON error (4xx, or 503 with Retry-After).

The last line is JSON. On a shared CPU the figures are under load; only their ratios mean
much.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def parse_args(argv):
    from deepseek_jax.presets import PRESETS

    ap = argparse.ArgumentParser(
        prog="python -m experiments.bench_serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", default="bench-small", choices=sorted(PRESETS))
    src.add_argument("--checkpoint", metavar="RUN_DIR", help="a run of experiments.train")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument(
        "--repeats", type=int, default=3, help="rounds per concurrency, alternated (medians)"
    )
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--context", type=int, default=4096, help="context of the capacity row")
    ap.add_argument("--cache-gib", type=float, default=8.0, help="cache budget, GiB")
    ap.add_argument("--gqa-kv-heads", type=int, default=None, help="default: heads / 4")
    ap.add_argument("--load-s", type=float, default=0.0, help="HTTP load test seconds")
    ap.add_argument("--load-clients", type=int, default=16)
    ap.add_argument("--no-mtp", action="store_true", help="skip speculative decoding")
    ap.add_argument(
        "--prefill-rows",
        type=int,
        default=None,
        help="requests' prompt chunks per prefill program (default: the largest concurrency;"
        " 1: one request per program)",
    )
    return ap.parse_args(argv)


def _pct(xs, q):
    import numpy as np

    return float(np.percentile(xs, q)) if xs else float("nan")


def run_round(engine, prompts, new_tokens):
    """Submits all prompts at once, steps to the end; per-request timings and peak pages."""
    from deepseek_jax.infer.sampling import SamplingParams

    reqs = [engine.submit(p, SamplingParams(max_tokens=new_tokens)) for p in prompts]
    peak = 0
    s0 = dict(engine.stats)
    while engine.step():
        peak = max(peak, engine.alloc.in_use)
    delta = {k: engine.stats[k] - s0.get(k, 0) for k in ("decode_tokens", "decode_seconds")}
    lost = sum(r.finish_reason != "length" for r in reqs)
    first = min(r.token_times[0] for r in reqs)
    last = max(r.token_times[-1] for r in reqs)
    decode_tokens = sum(len(r.output) - 1 for r in reqs)
    return {
        "decode_tokens_per_s": decode_tokens / (last - first),
        # the decode steps alone (their host work included; the prefill chunks that run
        # between them while later requests join are not): a decode deployment's rate
        "decode_step_tokens_per_s": delta["decode_tokens"] / max(delta["decode_seconds"], 1e-9),
        "ttft_ms": [1e3 * (r.token_times[0] - r.t_submit) for r in reqs],
        "tpot_ms": [
            1e3 * (r.token_times[-1] - r.token_times[0]) / (len(r.output) - 1) for r in reqs
        ],
        "peak_pages": peak,
        "lost": lost,
    }


def held_out_tokens(run_dir: str):
    """The run's held-out token ids (its data cache's ``eval.npy``), or None."""
    import os

    import numpy as np

    from deepseek_jax.train.checkpoint import latest_meta
    from deepseek_jax.train.data import default_cache_dir

    meta = latest_meta(os.path.join(run_dir, "checkpoints")) or {}
    path = default_cache_dir() / str(meta.get("data")) / "eval.npy"
    return np.load(path).astype(np.int64) if meta.get("data") and path.exists() else None


def make_prompts(tokens, vocab: int, n: int, length: int, rng):
    """n prompts of ``length`` ids: windows of ``tokens`` at random offsets, else random."""
    if tokens is None or len(tokens) <= length:
        return rng.integers(0, vocab, (n, length)).tolist()
    starts = rng.integers(0, len(tokens) - length, n)
    return [tokens[s : s + length].tolist() for s in starts]


def mtp_heldout(model, tokens, seq_len: int = 128, rows: int = 8) -> dict:
    """Teacher-forced held-out top-1 accuracy of the main head (t+1) and MTP head (t+2),
    and their agreement on t+2 (the greedy acceptance rate the MTP head allows)."""
    import numpy as np
    from flax import nnx

    n = min(rows, len(tokens) // seq_len)
    ids = np.asarray(tokens[: n * seq_len]).reshape(n, seq_len).astype(np.int32)

    def heads(m, x):
        out = m(x)
        return out.logits_BTV.argmax(-1), out.mtp_logits_KBTV[0].argmax(-1)

    main, mtp = (np.asarray(a) for a in nnx.jit(heads)(model, ids))
    return {
        "main_top1": float((main[:, :-1] == ids[:, 1:]).mean()),
        "mtp_top1": float((mtp[:, :-2] == ids[:, 2:]).mean()),
        "mtp_agrees_with_main": float((mtp[:, :-2] == main[:, 1:-1]).mean()),
    }


def capacity(cfg, args):
    from deepseek_jax.codesign.kv_cache import gqa_kv_bytes_per_token, mla_kv_bytes_per_token

    heads = cfg.num_attention_heads
    kv_heads = args.gqa_kv_heads or max(1, heads // 4)
    mla = mla_kv_bytes_per_token(cfg)  # BF16, all layers
    gqa = gqa_kv_bytes_per_token(kv_heads, cfg.hidden_size // heads, cfg.num_hidden_layers)
    budget = args.cache_gib * 2**30
    per_req = lambda b: -(-args.context // args.page_size) * args.page_size * b  # noqa: E731
    return {
        "mla_bytes_per_token_bf16": mla,
        "gqa_bytes_per_token_bf16": gqa,
        "gqa_kv_heads": kv_heads,
        "resident_requests_mla": int(budget // per_req(mla)),
        "resident_requests_gqa": int(budget // per_req(gqa)),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax
    import numpy as np

    from deepseek_jax.infer.engine import Engine
    from experiments.generate import load_model

    args.hf, args.step, args.dtype, args.seed = None, None, "float32", 0
    model = load_model(args)
    cfg = model.cfg
    levels = [int(c) for c in args.concurrency.split(",")]
    rng = np.random.default_rng(1)
    total = args.prompt_len + args.new_tokens + 1
    pages = (-(-total // args.page_size)) * max(levels) + 1  # + the trash page
    shapes = dict(page_size=args.page_size, num_pages=pages, max_batch=max(levels),
                  prefill_chunk=args.prompt_len,
                  prefill_rows=args.prefill_rows or max(levels))  # fmt: skip
    engine = Engine(model, **shapes)
    name = args.checkpoint or args.preset
    print(f"{name}: prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, "
          f"{jax.devices()[0].platform}, float32, prefill rows {shapes['prefill_rows']}; "
          "figures under load (shared machine)")  # fmt: skip
    tokens = held_out_tokens(args.checkpoint) if args.checkpoint else None
    print(f"prompts: {'held-out text of the run' if tokens is not None else 'random ids'}")
    prompts = {c: make_prompts(tokens, cfg.vocab_size, c, args.prompt_len, rng) for c in levels}
    runs, lost = {c: [] for c in levels}, 0
    for c in levels:
        t0 = time.perf_counter()
        run_round(engine, prompts[c], args.new_tokens)  # compiles this batch's buckets
        print(f"concurrency {c:>3}: warm-up incl. compile {time.perf_counter() - t0:.0f} s")
    for _ in range(args.repeats):  # levels alternated: the machine's load drifts
        for c in levels:
            r = run_round(engine, prompts[c], args.new_tokens)
            lost += r["lost"]
            runs[c].append(r)
    out = {}
    for c in levels:
        rates = [r["decode_tokens_per_s"] for r in runs[c]]
        r = sorted(runs[c], key=lambda r: r["decode_tokens_per_s"])[len(rates) // 2]
        out[c] = r  # the median run (the upper one of an even count)
        print(f"concurrency {c:>3}: decode {r['decode_tokens_per_s']:8.1f} tokens/s (runs "
              f"{', '.join(f'{x:.1f}' for x in rates)})  "
              f"TTFT p50 {_pct(r['ttft_ms'], 50):7.1f} ms p99 {_pct(r['ttft_ms'], 99):7.1f} ms  "
              f"TPOT p50 {_pct(r['tpot_ms'], 50):6.1f} ms p99 {_pct(r['tpot_ms'], 99):6.1f} ms  "
              f"peak pages {r['peak_pages']}")  # fmt: skip
    c1, cmax = out[levels[0]], out[levels[-1]]
    scale = cmax["decode_tokens_per_s"] / c1["decode_tokens_per_s"]
    print(f"aggregate decode at concurrency {levels[-1]} / {levels[0]}: {scale:.2f}x")
    step_rate = {
        c: float(np.median([r["decode_step_tokens_per_s"] for r in runs[c]])) for c in levels
    }
    step_scale = step_rate[levels[-1]] / step_rate[levels[0]]
    print("decode steps alone (no prefill chunks between them), tokens/s: "
          + ", ".join(f"c{c} {step_rate[c]:.1f}" for c in levels)
          + f"; c{levels[-1]} / c{levels[0]}: {step_scale:.2f}x")  # fmt: skip
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4
    print(f"latent cache: {per_token} bytes/token (float32, {cfg.num_hidden_layers} layers; "
          f"the MTP layer adds {per_token // cfg.num_hidden_layers})")  # fmt: skip

    acceptance = speedup = step_cost = float("nan")
    if not args.no_mtp and cfg.num_nextn_predict_layers:
        spec = Engine(model, **shapes, speculative=True)
        prompts = make_prompts(tokens, cfg.vocab_size, 1, args.prompt_len, rng)
        run_round(spec, prompts, args.new_tokens)
        spec.stats.clear()
        rates = {"spec": [], "plain": []}  # alternated, medians: the machine's load drifts
        for _ in range(max(args.repeats, 3)):
            for key, eng in (("spec", spec), ("plain", engine)):
                r = run_round(eng, prompts, args.new_tokens)
                lost += r["lost"]
                rates[key].append(r["decode_tokens_per_s"])
        print("MTP rounds, tokens/s: spec " + ", ".join(f"{x:.1f}" for x in rates["spec"])
              + "; plain " + ", ".join(f"{x:.1f}" for x in rates["plain"]))  # fmt: skip
        s = {"decode_tokens_per_s": float(np.median(rates["spec"]))}
        plain = {"decode_tokens_per_s": float(np.median(rates["plain"]))}
        acceptance = spec.stats["accepted"] / max(spec.stats["drafted"], 1)
        speedup = s["decode_tokens_per_s"] / plain["decode_tokens_per_s"]
        # A speculative step emits 1 + (accepted) tokens: its cost relative to a plain step.
        step_cost = (1 + acceptance) * plain["decode_tokens_per_s"] / s["decode_tokens_per_s"]
        print(f"MTP speculative, batch 1: acceptance {acceptance:.1%}, decode "
              f"{s['decode_tokens_per_s']:.1f} vs {plain['decode_tokens_per_s']:.1f} tokens/s "
              f"plain: {speedup:.2f}x; a speculative step costs {step_cost:.2f} plain steps, "
              f"so acceptance a gives (1 + a) / {step_cost:.2f} (a = 0.85: "
              f"{1.85 / step_cost:.2f}x)")  # fmt: skip
    heldout = {}
    if tokens is not None and cfg.num_nextn_predict_layers:
        heldout = mtp_heldout(model, tokens)
        print(f"held-out top-1 (teacher-forced): main head {heldout['main_top1']:.1%}, MTP "
              f"head {heldout['mtp_top1']:.1%}; MTP top-1 = main top-1 at t+2: "
              f"{heldout['mtp_agrees_with_main']:.1%}")  # fmt: skip
    cap = capacity(cfg, args)
    print(f"resident requests at {args.context} tokens in {args.cache_gib:g} GiB (BF16): "
          f"MLA {cap['resident_requests_mla']} ({cap['mla_bytes_per_token_bf16']} B/token) vs "
          f"GQA with {cap['gqa_kv_heads']} KV heads {cap['resident_requests_gqa']} "
          f"({cap['gqa_bytes_per_token_bf16']} B/token)")  # fmt: skip
    load = {}
    if args.load_s > 0:
        from experiments.serve_load import http_load, load_engine

        eng = load_engine(model, args.load_clients, args.page_size)
        load = http_load(eng, cfg, args.load_s, args.load_clients)
        lost += load["lost"]
        print(f"HTTP load {args.load_s:g} s: {load}")
    row = {f"decode_tokens_per_s_c{c}": round(out[c]["decode_tokens_per_s"], 1) for c in levels}
    row |= {f"decode_step_tokens_per_s_c{c}": round(step_rate[c], 1) for c in levels}
    row["decode_step_scaling"] = round(step_scale, 2)
    row |= {
        f"decode_tokens_per_s_c{c}_runs": [round(r["decode_tokens_per_s"], 1) for r in runs[c]]
        for c in levels
    }
    row |= {
        f"decode_scaling_c{levels[-1]}_over_c{levels[0]}": round(scale, 2),
        "ttft_ms_p50": round(_pct(cmax["ttft_ms"], 50), 1),
        "ttft_ms_p99": round(_pct(cmax["ttft_ms"], 99), 1),
        "tpot_ms_p50": round(_pct(cmax["tpot_ms"], 50), 2),
        "tpot_ms_p99": round(_pct(cmax["tpot_ms"], 99), 2),
        "cache_bytes_per_token": per_token,
        "peak_pages_in_use": cmax["peak_pages"],
        "mtp_acceptance": round(acceptance, 3) if acceptance == acceptance else None,
        "mtp_speedup": round(speedup, 3) if speedup == speedup else None,
        "mtp_step_cost": round(step_cost, 3) if step_cost == step_cost else None,
        "lost_requests": lost,
        **{f"heldout_{k}": round(v, 3) for k, v in heldout.items()},
        **cap,
    }
    if load:
        row["load_requests"] = load["requests"]
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    from experiments.runtime import start

    start(trains=False)
    sys.exit(main())
