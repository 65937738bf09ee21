"""The DeepSeek-V3 papers' co-design tables, recomputed: ours, the paper's, the difference.

    python -m experiments.codesign [--config PRESET_OR_CONFIG_JSON] [--cluster NAME]
                                   [--pp 16] [--plot DIR]

Prints KV cache (ISCA Table 1), training FLOPs (Table 2), throughput / MFU (Table 4), the EP
decode bound (2.3.2), node-limited routing (4.3), pipeline bubbles (V3TR Table 2) and
network topologies (Table 3) as Markdown. ``--config`` / ``--cluster`` add rows for your
model and cluster. ``--plot DIR`` writes kv_cache_vs_context.png and decode_tpot_vs_bw.png.
The last line is one JSON object: {table: {row: {quantity: {"ours", "paper"}}}}.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from deepseek_jax.codesign import report, table
from deepseek_jax.codesign.dense_models import DENSE_MODELS
from deepseek_jax.codesign.ep_decode import config_decode_bound
from deepseek_jax.codesign.hardware import CLUSTERS, GB200_NVL72, H800, get_cluster
from deepseek_jax.codesign.kv_cache import (
    dense_kv_bytes_per_token,
    mha_kv_bytes_per_token,
    mla_kv_bytes_per_token,
)
from deepseek_jax.config import ModelConfig
from deepseek_jax.presets import PRESETS, V3_671B, get_preset


def load_config(spec: str) -> tuple[str, ModelConfig]:
    """A preset name, or a path to a Hugging Face config.json (or its folder)."""
    if spec in PRESETS:
        return spec, get_preset(spec)
    from deepseek_jax.interop.hf_config import config_from_hf

    path = os.path.abspath(spec)
    name = os.path.basename(os.path.dirname(path) if os.path.isfile(path) else path)
    return name or spec, config_from_hf(spec)


def activated_from_abstract_init(cfg: ModelConfig) -> float:
    """Activated parameters per token, counted on the model's abstract init."""
    from deepseek_jax.codesign.params import abstract_report

    return abstract_report(cfg).activated_params


def user_setup(args) -> report.UserSetup | None:
    if args.config is None and args.cluster is None:
        return None
    name, cfg = load_config(args.config or "v3-671b")
    cluster = get_cluster(args.cluster or "h800")
    act = activated_from_abstract_init(cfg)
    return report.UserSetup(name=name, cfg=cfg, cluster=cluster, activated_params=act)


def plot_kv(path: str, user: report.UserSetup | None) -> None:
    import matplotlib.pyplot as plt

    ctx = np.logspace(10, 17.3, 60, base=2)
    series = {
        "DeepSeek-V3 (MLA)": mla_kv_bytes_per_token(V3_671B),
        "DeepSeek-V3 as MHA": mha_kv_bytes_per_token(V3_671B),
    }
    series |= {f"{n} (GQA)": dense_kv_bytes_per_token(m) for n, m in DENSE_MODELS.items()}
    if user and user.cfg:
        series[f"{user.name} (MLA)"] = mla_kv_bytes_per_token(user.cfg)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, per_token in series.items():
        ax.loglog(ctx, per_token * ctx / 2**30, label=label)
    ax.set(
        xlabel="context length (tokens)",
        ylabel="KV cache per sequence (GiB, BF16)",
        title="KV cache vs context length (ISCA Table 1)",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tpot(path: str, user: report.UserSetup | None) -> None:
    import matplotlib.pyplot as plt

    bw = np.logspace(np.log10(10), np.log10(2000), 80)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    curves = {
        "V3, hidden 7000, 61 layers (paper)": dict(cfg=V3_671B, hidden=7000),
        "V3, hidden 7168, 58 MoE layers": dict(cfg=V3_671B, all_layers=False),
    }
    if user and user.cfg:
        curves[f"{user.name}, MoE layers"] = dict(cfg=user.cfg, all_layers=False)
    for label, kw in curves.items():
        ax.loglog(
            bw, [config_decode_bound(bandwidth_GBps=b, **kw).tpot_ms for b in bw], label=label
        )
    for name, b in (
        ("H800 IB", H800.scale_out_GBps),
        ("H800 NVLink", H800.nvlink_GBps),
        ("NVL72", GB200_NVL72.scale_up_GBps),
    ):
        ax.axvline(b, color="gray", ls=":", lw=1)
        ax.text(b, ax.get_ylim()[1], name, rotation=90, va="top", ha="right", fontsize=7)
    ax.set(
        xlabel="per-GPU EP bandwidth (GB/s)",
        ylabel="TPOT bound (ms)",
        title="Decode TPOT bound under EP (ISCA 2.3.2)",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", help=f"preset ({', '.join(sorted(PRESETS))}) or config.json path")
    ap.add_argument("--cluster", choices=sorted(CLUSTERS), help="cluster preset for your rows")
    ap.add_argument("--pp", type=int, default=16, help="pipeline stages for the bubble table")
    ap.add_argument("--plot", metavar="DIR", help="write PNG figures into DIR")
    args = ap.parse_args(argv)
    user = user_setup(args)
    tables = report.all_tables(user, pp=args.pp)
    for t in tables:
        print(table.to_markdown(t))
        print()
    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
        plot_kv(os.path.join(args.plot, "kv_cache_vs_context.png"), user)
        plot_tpot(os.path.join(args.plot, "decode_tpot_vs_bw.png"), user)
        print(f"figures written to {args.plot}")
    out = table.to_json(tables)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
