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
# # deepseek-jax quickstart: a small DeepSeek-V3, trained, inspected, decoded, reloaded
#
# This notebook builds the DeepSeek-V3 architecture at a small size and walks through
# what makes it different from a dense transformer:
#
# 1. **Configs** use the Hugging Face `DeepseekV3` field names; the calculators give the
#    671 B model's parameter and KV-cache figures from an abstract init (nothing allocated).
# 2. **A named mesh** `(node, gpu)`: on a CPU runtime we fake 8 devices, so the model is
#    born sharded exactly as on a GPU pod.
# 3. **Training** with the project's own job (`make train`) on real text (this Python's
#    standard library sources), with a live loss plot.
# 4. **Checkpoints**: the run's Orbax checkpoint reloaded onto the mesh, and a round trip
#    through the Hugging Face safetensors layout.
# 5. **DeepSeekMoE**: the expert load of every MoE layer as a heat map.
# 6. **Generation** through the absorbed-MLA latent-cache decode.
#
# Full size (the `small` preset, a few minutes on a laptop CPU) by default;
# `DEEPSEEK_JAX_NOTEBOOK_SMALL=1` runs the `tiny` preset for a few steps (the test suite).

# %%
# Install the package only when it does not import yet (a fresh Jupyter or Colab runtime).
# REPO: the folder of a clone, or the git URL of one you trust. Left empty, the clone this
# notebook sits in is installed.
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = os.environ.get("DEEPSEEK_JAX_REPO", "")
if importlib.util.find_spec("deepseek_jax") is None:
    here = Path.cwd().resolve()
    clone = next((p for p in (here, *here.parents) if (p / "deepseek_jax").is_dir()), None)
    source = REPO or (str(clone) if clone else "")
    if not source:
        raise RuntimeError(
            "deepseek_jax is not installed and this notebook is not inside a clone of the "
            "repository: set REPO (or DEEPSEEK_JAX_REPO) to a clone's folder or its git URL"
        )
    target = source if Path(source).exists() else f"git+{source}"
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", target])
    importlib.invalidate_caches()

# %%
# 8 virtual CPU devices, so that a (node=2, gpu=4) mesh is real. Must precede `import jax`;
# it does not affect GPUs.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["XLA_FLAGS"] = flags.strip()
SMALL = os.environ.get("DEEPSEEK_JAX_NOTEBOOK_SMALL") == "1"  # the test suite's short run

import jax
import matplotlib.pyplot as plt
import numpy as np

print(jax.__version__, jax.default_backend(), len(jax.devices()), "devices")

# %% [markdown]
# ## 1. Configs and the paper's figures

# %%
from deepseek_jax.codesign.kv_cache import mla_kv_bytes_per_token
from deepseek_jax.codesign.params import abstract_report
from deepseek_jax.presets import get_preset

v3 = get_preset("v3-671b")
report = abstract_report(v3)  # shapes only: nothing is allocated
print(
    f"V3: {report.total_params / 1e9:.2f} B parameters, "
    f"{report.activated_params / 1e9:.2f} B activated per token, "
    f"MTP {report.mtp_params / 1e9:.2f} B"
)
print(f"latent KV cache: {mla_kv_bytes_per_token(v3):,} B per token in BF16")

PRESET = "tiny" if SMALL else "small"
dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
cfg = get_preset(PRESET, [f"dtype={dtype}"])
fields = ("hidden_size", "num_hidden_layers", "first_k_dense_replace", "n_routed_experts")
fields += ("num_experts_per_tok", "n_group", "topk_group", "kv_lora_rank", "qk_rope_head_dim")
print(PRESET, {k: getattr(cfg, k) for k in fields})

# %% [markdown]
# ## 2. A model born sharded on a `(node, gpu)` mesh
#
# Whatever devices exist: two "nodes" when the device count is even, one otherwise.
# Parameters are created under `jit` with their final shardings (routed experts split over
# all devices, everything else replicated: no tensor parallelism, as in DeepSeek-V3).

# %%
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax.build import init_model
from deepseek_jax.mesh import make_mesh
from deepseek_jax.model import Transformer

n = len(jax.devices())
mesh = make_mesh(node=2, gpu=n // 2) if n % 2 == 0 else make_mesh(node=1, gpu=n)
fresh = init_model(cfg, mesh, seed=0)
print(mesh.shape)
print("routed expert weights:", fresh.moe_layers.mlp.w_up[...].sharding.spec)
print("embedding:", fresh.embed_tokens.embedding[...].sharding.spec)
data = NamedSharding(mesh, P(("node", "gpu")))  # the batch over every device
forward = nnx.jit(Transformer.__call__)  # compiled once, reused by every model of this shape

# %% [markdown]
# ## 3. Train with the main job, watching the loss
#
# `experiments.train` is what `make train` runs: text from the standard library, a BPE
# tokenizer trained locally, AdamW with ZeRO-1, multi-token prediction, aux-loss-free
# balancing, checkpoints and metrics. `on_record` receives each metrics record, which
# redraws the plot while it trains.

# %% figure="training"
import tempfile

from experiments.live_plot import LiveLoss
from experiments.train import main as train_main

run_dir = Path(tempfile.mkdtemp(prefix="deepseek_jax_")) / "run"
args = ["--preset", PRESET, "--dtype", dtype, "--out", str(run_dir), "--no-progress"]
args += ["--mesh", f"node={mesh.shape['node']},gpu={mesh.shape['gpu']}", "--sample-tokens", "0"]
if SMALL:
    args += ["--steps", "6", "--batch-size", "8", "--seq-len", "32", "--eval-every", "3"]
else:  # the default job, 16 x 128 tokens a step: 300 steps take a few minutes on 2 cores
    steps = int(os.environ.get("DEEPSEEK_JAX_NOTEBOOK_STEPS", "300"))
    args += ["--steps", str(steps), "--eval-every", str(max(1, steps // 6))]
live = LiveLoss(f"{PRESET} preset on {dict(mesh.shape)}", moe_layers=cfg.num_moe_layers)
try:
    assert train_main(args, on_record=live.update) == 0
finally:
    live.close()

# %% [markdown]
# ## 4. Save and reload
#
# The run saved Orbax checkpoints (async, atomic, keep-N). Reload the last one onto the
# mesh, then round-trip it through the Hugging Face safetensors layout
# (`save_pretrained` / `from_pretrained`, what `transformers` and vLLM read): the logits
# must not change.

# %%
from deepseek_jax.interop.pretrained import from_pretrained, save_pretrained
from deepseek_jax.interop.train_checkpoint import load_run
from deepseek_jax.train.data import DataConfig, load_corpus

model, step = load_run(str(run_dir), mesh=mesh)
print(f"reloaded step {step} from {run_dir / 'checkpoints'}")

corpus = load_corpus(DataConfig(vocab_size=cfg.vocab_size, byte_level=cfg.vocab_size <= 256))
rows = 2 * n if SMALL else 4 * n
held_out = next(corpus.eval_batches(rows, 32 if SMALL else 128, max_batches=1))[:, :-1]
with jax.set_mesh(mesh):
    ids = jax.device_put(np.asarray(held_out, np.int32), data)
    out = forward(model, ids)
hf_dir = run_dir.parent / "hf"
files = save_pretrained(model, hf_dir)
reloaded = from_pretrained(hf_dir, mesh=mesh, dtype=dtype)
with jax.set_mesh(mesh):
    again = forward(reloaded, ids)
diff = float(np.max(np.abs(np.asarray(again.logits_BTV) - np.asarray(out.logits_BTV))))
print(f"{files} -> from_pretrained: max |logit difference| {diff:.1e}")
assert diff < 1e-5, diff  # float32 storage: the same weights

# %% [markdown]
# ## 5. Expert load per layer
#
# Each MoE layer sends every token to `num_experts_per_tok` routed experts. The heat map
# counts, on held-out text, how many tokens each expert receives relative to an even share
# (1.0). The aux-loss-free bias (DeepSeek-V3 section 2.1.2) moves after every step to push
# overloaded experts down and underloaded ones up, by gamma = 0.001 a step: early in
# training the routers specialise faster than that, so the load first grows uneven (the
# balance curves above) before the bias catches up. `moe_routing.ipynb` shows the bias alone.

# %% figure="expert_load"
with jax.set_mesh(mesh):
    before = forward(fresh, ids)
names = [f"MoE layer {i}" for i in range(cfg.num_moe_layers)] + ["MTP"] * len(model.mtp)
fig, axes = plt.subplots(1, 2, figsize=(12, 0.6 * len(names) + 2.2), sharey=True)
for ax, o, title in ((axes[0], before, "at initialisation"), (axes[1], out, f"step {step}")):
    load_LE = np.concatenate([np.asarray(o.moe_stats.load_LE), np.asarray(o.mtp_stats.load_LE)])
    ratio_LE = load_LE / load_LE.mean(-1, keepdims=True)
    im = ax.imshow(ratio_LE, cmap="RdBu_r", vmin=0, vmax=2, aspect="auto")
    ax.set(title=f"{title}: max/mean {ratio_LE.max(-1).mean():.2f}", xlabel="routed expert")
    ax.set_xticks(range(cfg.n_routed_experts))
axes[0].set_yticks(range(len(names)), names)
fig.colorbar(im, ax=axes, label="tokens / even share")
fig.suptitle(f"expert load on {ids.size:,} held-out tokens")
plt.show()

# %% [markdown]
# ## 6. Generate through the latent cache
#
# Decoding runs the absorbed MLA: `W_uk` is folded into the query and `W_uv` into the
# output, so each step attends over the cached 512-wide latent (here `kv_lora_rank`) and
# the shared RoPE key, never re-expanding per-head keys and values. `mla_memory.ipynb`
# checks that it equals the training path.

# %%
from deepseek_jax.infer.generate import Generator

prompt = "def "
prompt_ids = np.asarray([corpus.tokenizer.encode(prompt)] * n, np.int32)  # a row per device
gen = Generator(model, temperature=0.8, top_k=40)
with jax.set_mesh(mesh):
    result = gen(jax.device_put(prompt_ids, data), 16 if SMALL else 96, seed=0)
print(prompt + corpus.tokenizer.decode(result.tokens[0].tolist()))
itemsize = np.dtype(dtype).itemsize
print(f"cache per token: {result.cache_bytes_per_token} B over {cfg.num_hidden_layers} layers")
assert result.cache_bytes_per_token == mla_kv_bytes_per_token(cfg, bytes_per_value=itemsize)

# %% [markdown]
# ## Next
#
# - `mla_memory.ipynb`: MLA's cache against MHA and GQA, the absorbed decode checked, and
#   the serving engine's paged cache as requests come and go.
# - `moe_routing.ipynb`: node-limited routing on a virtual `(node, gpu)` mesh, and one MoE
#   layer's compiled GPU schedule with and without dual micro-batch overlap.
# - `python -m experiments.train --help`: the job above from the command line
#   (`fp8=true` trains with DeepSeek-V3's FP8 recipe).
# - `python -m experiments.codesign` reproduces the papers' co-design tables.
