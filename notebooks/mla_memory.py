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
# 4. The serving engine's paged cache: pages in use as requests come and go.
#
# `DEEPSEEK_JAX_NOTEBOOK_SMALL=1` uses the `tiny` preset for parts 3 and 4 (the test suite).

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

# %% [markdown]
# ## 4. The paged cache as requests come and go
#
# A server does not give each request a cache as long as the context. The latent cache is
# one pool of pages (a page holds the latents and RoPE keys of `page_size` positions in
# every layer) and each request has a page table. The engine (`infer/engine.py`) admits a
# request when the pool can *book* its worst case (prompt + new tokens), prefills its
# prompt one chunk per step, then decodes it one token per step beside the others
# (continuous batching). It *takes* a page from the free list only when a token needs one,
# and returns them all when the request finishes. `trace_pages` drives the engine (the
# model above) through requests of different lengths arriving at different steps and
# records the pool after every step.

# %% figure="paged_cache"
from deepseek_jax.infer.engine import Engine
from deepseek_jax.infer.page_trace import FREE, TRASH, Arrival, trace_pages

if SMALL:  # (arrival step, prompt tokens, new tokens)
    PAGE, PAGES, CHUNK = 8, 25, 8
    plan = [(0, 30, 12), (0, 6, 20), (2, 17, 8), (5, 40, 10), (9, 9, 24), (12, 20, 6)]
else:
    PAGE, PAGES, CHUNK = 16, 41, 32
    plan = [(0, 120, 40), (0, 20, 90), (3, 70, 30), (8, 200, 40), (15, 35, 100),
            (20, 90, 20), (30, 10, 60), (45, 150, 50), (60, 60, 30), (70, 25, 80)]  # fmt: skip
engine = Engine(
    model, page_size=PAGE, num_pages=PAGES, max_batch=4, prefill_chunk=CHUNK,
    batch_buckets=(4,), page_buckets=(-(-max(n + m + 1 for _, n, m in plan) // PAGE),),
)  # fmt: skip
rng = np.random.default_rng(0)
arrivals = [Arrival(s, tuple(rng.integers(0, cfg.vocab_size, n).tolist()), m) for s, n, m in plan]
trace = trace_pages(engine, arrivals)
capacity, steps = engine.alloc.capacity, np.arange(1, len(trace.in_use_S) + 1)
pages_SR = trace.pages_SR()

fig, (area, pool) = plt.subplots(2, 1, figsize=(14, 7.5), sharex=True)
colours = plt.cm.tab10(np.arange(len(plan)) % 10)
area.stackplot(steps, pages_SR.T, colors=colours, step="post",
               labels=[f"request {r}: {n} + {m} tokens" for r, (_, n, m) in enumerate(plan)])  # fmt: skip
area.step(steps, trace.in_use_S + trace.booked_S, "k--", where="post", lw=1,
          label="in use + booked (admitted requests' worst case)")  # fmt: skip
area.step(steps, trace.free_S, "C7", where="post", lw=1.5, label="free list")
area.axhline(capacity, color="k", lw=0.8, ls=":")
for r, (s, _, _) in enumerate(plan):  # arrivals
    area.plot(s + 1, capacity + 0.6, "v", color=colours[r], ms=7, clip_on=False)
area.set(ylabel=f"pages of {PAGE} tokens", ylim=(0, capacity + 1.2))
area.set_title(
    f"{PAGES - 1} pages (page 0 is the trash page), at most {engine.max_batch} requests at "
    f"once, prompts prefilled {CHUNK} tokens a step; triangles: arrivals",
    fontsize=10,
)
area.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.02))
grid = np.where(trace.owner_SN >= 0, trace.owner_SN, np.nan).T  # [pages, steps]
pool.imshow(grid, aspect="auto", cmap=plt.matplotlib.colors.ListedColormap(colours),
            vmin=-0.5, vmax=len(plan) - 0.5, interpolation="nearest",
            extent=(0.5, steps[-1] + 0.5, PAGES - 0.5, -0.5))  # fmt: skip
pool.set(xlabel="engine step", ylabel="page id")
pool.set_title("who holds each page (white: on the free list): freed pages are reused", fontsize=10)
fig.tight_layout()
plt.show()

# What the plot shows, checked: every page is free or held by one request, a request holds
# exactly the pages its cached tokens fill, and everything comes back.
assert (trace.owner_SN[:, 0] == TRASH).all()
assert ((trace.in_use_S + trace.free_S) == capacity).all()
assert (pages_SR == -(-trace.tokens_SR // PAGE)).all()
assert [len(r.output) for r in trace.requests] == [m for _, _, m in plan]
assert trace.in_use_S[-1] == 0 and trace.free_S[-1] == capacity
held = trace.tokens_SR.sum(1)
fill = held[trace.in_use_S > 0] / (PAGE * trace.in_use_S[trace.in_use_S > 0])
print(f"{len(steps)} steps, compiled programs {dict(engine.compilations)}")
print(
    f"peak: {trace.in_use_S.max()} pages in use of {capacity}, {trace.booked_S.max()} more "
    f"booked; tokens fill {fill.mean():.0%} of the pages in use on average"
)
dense = engine.max_batch * (-(-cfg.max_position_embeddings // PAGE))
print(f"a cache of the whole context ({cfg.max_position_embeddings} tokens) per batch row "
      f"would hold {dense} pages")  # fmt: skip
