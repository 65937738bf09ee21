# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Multi-head Latent Attention: the KV cache against MHA and GQA
#
# Decoding is bound by memory: every new token reads the whole key/value cache of its
# sequence. Multi-head attention (MHA) caches a key and a value per head per layer;
# grouped-query attention (GQA) shares them among groups of heads. DeepSeek's MLA caches
# one compressed latent `c_kv` (`kv_lora_rank` = 512 values) and one RoPE key shared by all
# heads (`qk_rope_head_dim` = 64) per token per layer, and rebuilds per-head keys and
# values from the latent with up-projections that decoding folds into the query and the
# output ("absorbed").
#
# 1. Cache bytes per token from our calculators, beside the paper's table.
# 2. Cache size against context length for DeepSeek-V3, Qwen-2.5 72B and LLaMA-3.1 405B.
# 3. A numerical check that the absorbed decode equals the naive path, on a small model.
#
# `DEEPSEEK_JAX_NOTEBOOK_SMALL=1` uses the `tiny` preset for part 3 (the test suite).

# %%
import os

SMALL = os.environ.get("DEEPSEEK_JAX_NOTEBOOK_SMALL") == "1"  # the test suite's short run

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

print(jax.__version__, jax.default_backend())

# %% [markdown]
# ## 1. Cache bytes per token (ISCA 2025, Table 1)
#
# BF16 (2 bytes per value), all layers. The calculators read the shapes from the configs:
# `v3-671b` is our preset of the released DeepSeek-V3 `config.json`; the dense models are
# their released configs. "V3 as MHA" is what the same attention (128 heads, keys of
# 128 + 64, values of 128) would cache without the latent: the paper has no row for it.

# %%
from deepseek_jax.codesign.dense_models import LLAMA31_405B, QWEN25_72B
from deepseek_jax.codesign.kv_cache import (
    dense_kv_bytes_per_token,
    kv_cache_bytes,
    mha_kv_bytes_per_token,
    mla_kv_bytes_per_token,
)
from deepseek_jax.presets import get_preset

v3 = get_preset("v3-671b")
PAPER = {  # ISCA 2025 Table 1, bytes per token
    "DeepSeek-V3 (MLA)": 70_272,
    "Qwen-2.5 72B (GQA)": 327_680,
    "LLaMA-3.1 405B (GQA)": 516_096,
}
ours = {
    "DeepSeek-V3 (MLA)": mla_kv_bytes_per_token(v3),
    "Qwen-2.5 72B (GQA)": dense_kv_bytes_per_token(QWEN25_72B),
    "LLaMA-3.1 405B (GQA)": dense_kv_bytes_per_token(LLAMA31_405B),
}
mha = mha_kv_bytes_per_token(v3)
print(f"{'model':<24}{'ours (B/token)':>16}{'paper':>10}{'x V3':>8}")
for name, b in ours.items():
    print(f"{name:<24}{b:>16,}{PAPER[name]:>10,}{b / ours['DeepSeek-V3 (MLA)']:>8.2f}")
print(f"{'V3 as MHA':<24}{mha:>16,}{'-':>10}{mha / ours['DeepSeek-V3 (MLA)']:>8.2f}")
assert ours == PAPER, f"the calculators drifted from the paper's table: {ours}"

# %% [markdown]
# The paper prints 7.28x for LLaMA-3.1 405B; 516,096 / 70,272 is 7.34x.
#
# ## 2. Cache size against context length
#
# One sequence, BF16, all layers. The dotted line is the 80 GB of one H800; the weights
# need their own memory on top.

# %% figure="cache_vs_context"
contexts = np.array([2**k for k in range(10, 18)])  # 1K .. 128K tokens
rows = {**ours, "DeepSeek-V3 as MHA": mha}
styles = {"DeepSeek-V3 as MHA": dict(ls="--", color="gray")}
fig, (bar, line) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
names = list(rows)
bar.barh(names, [rows[k] / 1e3 for k in names], color=["C0", "C1", "C2", "gray"])
base = rows["DeepSeek-V3 (MLA)"]
for i, k in enumerate(names):
    bar.text(rows[k] / 1e3, i, f" {rows[k] / 1e3:,.1f} KB ({rows[k] / base:.2f}x)", va="center")
bar.set(xscale="log", xlabel="KB per token (log)", title="cache per token, BF16, all layers")
bar.set_xlim(1, max(rows.values()) / 1e3 * 60)
bar.invert_yaxis()
for name, per_token in rows.items():
    gb = [kv_cache_bytes(per_token, int(c)) / 1e9 for c in contexts]
    line.plot(contexts, gb, "o-", label=name, ms=3, **styles.get(name, {}))
line.axhline(80, color="k", ls=":", lw=1)
line.text(contexts[0], 85, "80 GB (one H800)", fontsize=8)
line.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="GB per sequence")
line.set_xticks(contexts, [f"{c // 1024}K" for c in contexts])
line.set_title("cache of one sequence")
line.legend(fontsize=8)
fig.tight_layout()
plt.show()
at = 128 * 1024
print(
    f"at 128K tokens: V3 {kv_cache_bytes(ours['DeepSeek-V3 (MLA)'], at) / 1e9:.1f} GB, "
    f"LLaMA-3.1 405B {kv_cache_bytes(ours['LLaMA-3.1 405B (GQA)'], at) / 1e9:.1f} GB"
)

# %% [markdown]
# ## 3. The absorbed decode equals the naive path
#
# Training and prefill run MLA *naively*: per-head keys `k = c_kv W_uk` and values
# `v = c_kv W_uv` are materialised. Decoding never does: `W_uk` is folded into the query
# (`q W_uk^T` attends to `c_kv` directly) and `W_uv` into the output, so attention runs in
# the latent space over the cache. The two are the same function (V2 paper 2.1.2), which
# we check in float32 on a small model:
#
# - one MLA layer: `mla_naive` against `mla_absorbed` over all positions at once;
# - the whole model: logits of the training forward against token-by-token decoding.

# %%
from flax import nnx

from deepseek_jax.mla import MLA, LatentCache, mla_absorbed, mla_naive
from deepseek_jax.model import Transformer

PRESET = "tiny" if SMALL else "small"
cfg = get_preset(PRESET, ["dtype=float32"])
T = 16 if SMALL else 64
x_BTD = jax.random.normal(jax.random.key(0), (2, T, cfg.hidden_size), jnp.float32)
pos_BT = jnp.broadcast_to(jnp.arange(T), (2, T))
w = MLA(cfg, rngs=nnx.Rngs(0)).weights()
naive = mla_naive(w, x_BTD, pos_BT, cfg)
absorbed, cache = mla_absorbed(w, x_BTD, pos_BT, LatentCache.init(2, T, cfg), 0, cfg)
rel = float(jnp.linalg.norm(absorbed - naive) / jnp.linalg.norm(naive))
print(f"{PRESET}, one MLA layer, {T} positions: relative difference {rel:.1e}")
assert rel < 1e-5, rel
per_token = sum(a.nbytes for a in jax.tree.leaves(cache)) // (2 * T)
print(f"its cache: {per_token} B per token (float32) = (kv_lora_rank + rope dim) x 4")
assert per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4

# %% figure="decode_error"
model = Transformer(cfg, rngs=nnx.Rngs(0))  # unsharded, on the default device
ids_BT = jax.random.randint(jax.random.key(1), (1, T), 0, cfg.vocab_size)
full_TV = nnx.jit(Transformer.__call__)(model, ids_BT).logits_BTV[0]  # all positions at once
decode = nnx.jit(Transformer.decode)  # one compiled step, reused for every position
cache = model.init_cache(batch=1, max_len=T)
steps = []
for t in range(T):
    logits_B1V, cache = decode(model, ids_BT[:, t : t + 1], cache, jnp.asarray(t, jnp.int32))
    steps.append(logits_B1V[0, 0])
step_TV = jnp.stack(steps)
err_T = np.asarray(jnp.max(jnp.abs(step_TV - full_TV), axis=-1))
scale = float(jnp.max(jnp.abs(full_TV)))
cache_bytes = sum(a.nbytes for a in jax.tree.leaves(cache)) // T
print(f"whole model: max |logit difference| {err_T.max():.1e} (logits up to {scale:.1f})")
print(f"latent cache: {cache_bytes:,} B per token over {cfg.num_hidden_layers} layers")
assert err_T.max() < 1e-4 * max(scale, 1.0), err_T.max()
assert cache_bytes == mla_kv_bytes_per_token(cfg, bytes_per_value=4)
assert bool(jnp.all(jnp.argmax(step_TV, -1) == jnp.argmax(full_TV, -1)))  # same next tokens

fig, ax = plt.subplots(figsize=(7, 3))
ax.semilogy(np.arange(T), np.maximum(err_T, 1e-12), "o-", ms=3, label="absorbed vs naive")
ax.axhline(
    np.finfo(np.float32).eps * scale, color="gray", ls=":", lw=1, label="float32 eps x max logit"
)
ax.axhline(1e-4 * max(scale, 1.0), color="C3", ls="--", lw=1, label="tolerance asserted above")
ax.set(xlabel="position", ylabel="max |logit difference|", ylim=(1e-9, 1e-2))
ax.legend(fontsize=8, loc="upper right")
ax.set_title(f"{PRESET}: token-by-token absorbed decode vs the training forward")
fig.tight_layout()
plt.show()
