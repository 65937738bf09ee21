"""Parameter and KV-cache figures of a preset, from abstract init (no weights allocated).

    python -m experiments.params --preset v3-671b [key=value ...]

Prints total / activated / MTP parameters and the BF16 latent-cache bytes per token, a
comparison with GQA models, and last a JSON line.
"""

from __future__ import annotations

import argparse
import json

from deepseek_jax.codesign.kv_cache import (
    GQA_MODELS,
    gqa_kv_bytes_per_token,
    mla_kv_bytes_per_token,
)
from deepseek_jax.codesign.params import abstract_report
from deepseek_jax.presets import PRESETS, get_preset


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="v3-671b", choices=sorted(PRESETS))
    ap.add_argument("overrides", nargs="*", help="model config overrides, key=value")
    args = ap.parse_args(argv)
    cfg = get_preset(args.preset, args.overrides)
    rep = abstract_report(cfg)
    kv = mla_kv_bytes_per_token(cfg)
    print(
        f"preset {args.preset}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.n_routed_experts} routed experts (top-{cfg.num_experts_per_tok})"
    )
    rows = [
        (
            "total parameters (main model)",
            f"{rep.total_params:,}",
            f"{rep.total_params / 1e9:.2f} B",
        ),
        (
            "activated per token",
            f"{rep.activated_params:,.0f}",
            f"{rep.activated_params / 1e9:.2f} B",
        ),
        ("MTP module (own)", f"{rep.mtp_params:,}", f"{rep.mtp_params / 1e9:.2f} B"),
        ("KV cache per token (BF16)", f"{kv:,} B", f"{kv / 1024:.1f} KiB"),
    ]
    w = max(len(r[0]) for r in rows)
    for name, exact, short in rows:
        print(f"  {name:<{w}}  {exact:>20}  {short:>10}")
    print("KV cache per token vs GQA models (BF16, all layers):")
    for name, shape in GQA_MODELS.items():
        b = gqa_kv_bytes_per_token(**shape)
        print(f"  {name:<{w}}  {b:>18,} B  {b / kv:>9.2f}x")
    out = {
        "preset": args.preset,
        "total_params": rep.total_params,
        "activated_params": round(rep.activated_params),
        "mtp_params": rep.mtp_params,
        "kv_cache_bytes_per_token": kv,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
