"""Generation benchmark: ``python -m experiments.bench_generate`` (part of ``make bench``).

Random-weight ``bench-small``, batch 1, a 128-token prompt, 128 new tokens, greedy, through
the compiled prefill and decode programs over the MLA latent cache. Compilation is timed
apart; each figure is the median over ``--repeats`` runs. The last line is JSON with
``prefill_tokens_per_s``, ``decode_tokens_per_s`` and ``cache_bytes_per_token``.
(For scale: transformers' PyTorch model of the same shape decodes at about 24-35 tokens/s
on a 2-core CPU, re-expanding the whole latent cache through ``kv_b_proj`` every step.)
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from deepseek_jax.presets import PRESETS

    ap = argparse.ArgumentParser(
        prog="python -m experiments.bench_generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--preset", default="bench-small", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument(
        "--scan",
        action="store_true",
        help="decode with the scanned layer stack instead of unrolled layers",
    )
    ap.add_argument("overrides", nargs="*", help="model config overrides key=value")
    args = ap.parse_args(argv)

    import jax
    import numpy as np
    from flax import nnx

    from deepseek_jax.infer.generate import Generator
    from deepseek_jax.model import Transformer
    from deepseek_jax.presets import get_preset
    from experiments.machine_info import describe, log_backend_choices, print_description

    log_backend_choices()
    cfg = get_preset(args.preset, [f"dtype={args.dtype}", *args.overrides])
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    prompt = np.asarray(
        jax.random.randint(jax.random.key(1), (args.batch, args.prompt_len), 0, cfg.vocab_size),
        np.int32,
    )
    gen = Generator(model, unroll=not args.scan)
    compile_s = gen.compile(args.batch, args.prompt_len, args.new_tokens)
    runs = [gen(prompt, args.new_tokens) for _ in range(args.repeats)]
    rates = [r.rates(args.prompt_len) for r in runs]
    pre = [r["prefill_tokens_per_s"] for r in rates]
    dec = [r["decode_tokens_per_s"] for r in rates]
    print(
        f"{args.preset}: batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new "
        f"tokens, {cfg.run.dtype}, {'scanned' if args.scan else 'unrolled'} layers, "
        f"{jax.devices()[0].platform}; compile {compile_s:.1f} s"
    )
    print(f"prefill tokens/s: median {np.median(pre):.0f}  best {max(pre):.0f}")
    print(f"decode tokens/s:  median {np.median(dec):.1f}  best {max(dec):.1f}")
    machine = describe()
    print_description(machine)
    print(
        json.dumps(
            {
                "prefill_tokens_per_s": round(float(np.median(pre)), 1),
                "decode_tokens_per_s": round(float(np.median(dec)), 1),
                "cache_bytes_per_token": runs[0].cache_bytes_per_token,
                "overrides": args.overrides,
                "machine": machine,
            }
        )
    )
    return 0


if __name__ == "__main__":
    from experiments.runtime import start

    start(trains=False)
    sys.exit(main())
