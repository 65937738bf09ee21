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
# # Node-limited routing, made visible
#
# DeepSeek-V3 places its 256 routed experts on 8 nodes (one group of 32 per node) and lets
# each token reach at most M = 4 nodes: nodes are ranked by the sum of the two best
# (biased) scores of their experts, and the token's top-8 experts are chosen inside the
# best M. A token then crosses InfiniBand once per node it reaches and fans out to that
# node's experts over NVLink (two-hop), instead of once per expert (flat).
#
# Here on a virtual `(node, gpu)` mesh of 8 CPU devices:
#
# 1. which nodes and experts the tokens of a sentence reach;
# 2. inter-node copies per token, flat against two-hop, counted from the router's choices
#    and from the exchange's own send buffers;
# 3. how the aux-loss-free bias moves the load towards balance;
# 4. the compiled GPU schedule of one MoE layer with and without dual micro-batch overlap,
#    from a deviceless compile for a cluster of H100s.
#
# `DEEPSEEK_JAX_NOTEBOOK_SMALL=1` uses a `tiny` model (the test suite).

# %%
import os

# 8 virtual CPU devices for the mesh; must precede `import jax`. The mesh below uses the
# CPU devices even when a GPU is present.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["XLA_FLAGS"] = flags.strip()
SMALL = os.environ.get("DEEPSEEK_JAX_NOTEBOOK_SMALL") == "1"  # the test suite's short run

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from deepseek_jax.mesh import make_mesh
from deepseek_jax.presets import get_preset

mesh = make_mesh(node=4, gpu=2, devices=jax.devices("cpu"))
if SMALL:
    cfg = get_preset("tiny", ["n_routed_experts=16", "num_experts_per_tok=4", "dtype=float32"])
else:
    cfg = get_preset("small", ["dtype=float32"])
NODES = mesh.shape["node"]
PER_NODE = cfg.n_routed_experts // NODES
print(mesh.shape)
print(
    f"{cfg.n_routed_experts} routed experts in {cfg.n_group} groups, {PER_NODE} per node "
    f"({PER_NODE // mesh.shape['gpu']} per device); each token picks "
    f"{cfg.num_experts_per_tok} inside at most M = {cfg.topk_group} nodes"
)

# %% [markdown]
# ## 1. Where the tokens of a sentence go
#
# `route_probe` replays each MoE layer's router on the input that layer sees (the loads it
# implies equal the model's own statistics; a test checks it). The model is freshly
# initialised: which experts win is arbitrary, but the node limit already holds.

# %% figure="token_routes"
from deepseek_jax.model import Transformer
from deepseek_jax.moe.probe import route_probe
from deepseek_jax.train.data import DataConfig, load_corpus

corpus = load_corpus(DataConfig(vocab_size=cfg.vocab_size, byte_level=cfg.vocab_size <= 256))
model = Transformer(cfg, rngs=nnx.Rngs(0))  # unsharded, on the default device
probe_fn = nnx.jit(route_probe)  # one compiled program per input shape
sentence = "Each token crosses the slow links once per node."
ids = np.asarray([corpus.tokenizer.encode(sentence)], np.int32)
probe = probe_fn(model, jnp.asarray(ids))
tokens = [corpus.tokenizer.decode([int(i)]) for i in ids[0]]
layers = sorted({0, cfg.num_moe_layers - 1})
fig, axes = plt.subplots(1, len(layers), figsize=(6 * len(layers), 0.28 * len(tokens) + 1.8))
for ax, layer in zip(np.atleast_1d(axes), layers, strict=True):
    idx_TK = np.asarray(probe.idx_LBTK[layer, 0])
    w_TK = np.asarray(probe.weight_LBTK[layer, 0])
    grid_TE = np.zeros((len(tokens), cfg.n_routed_experts))
    np.put_along_axis(grid_TE, idx_TK, w_TK, axis=1)
    im = ax.imshow(np.where(grid_TE > 0, grid_TE, np.nan), cmap="viridis", aspect="auto")
    for e in range(1, cfg.n_routed_experts):  # solid: node boundaries, dotted: GPUs
        per_gpu = PER_NODE // mesh.shape["gpu"]
        if e % per_gpu == 0:
            ax.axvline(
                e - 0.5,
                color="k",
                lw=1 if e % PER_NODE == 0 else 0.4,
                ls="-" if e % PER_NODE == 0 else ":",
            )
    ax.set_xticks(
        [PER_NODE * (k + 0.5) - 0.5 for k in range(NODES)], [f"node {k}" for k in range(NODES)]
    )
    nodes_T = [len(set(row // PER_NODE)) for row in idx_TK]
    ax.set_yticks(
        range(len(tokens)), [f"{t!r}  {n} nodes" for t, n in zip(tokens, nodes_T, strict=True)]
    )
    ax.set_title(f"MoE layer {layer}: chosen experts, colour = gate weight", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04)
    assert max(nodes_T) <= cfg.topk_group
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Inter-node copies per token, flat against two-hop
#
# The MoE layer on the mesh can exchange tokens either way (`EPOptions(path=...)`). Run it
# both ways on the same tokens and read the copies its send buffers held
# (`MoEStats.internode`); `internode_copies` counts the same from the router's choices. A
# token starting on a node that holds some of its experts sends those none.

# %%
from jax.sharding import PartitionSpec as P

from deepseek_jax import sharding
from deepseek_jax.codesign.routing_traffic import internode_copies
from deepseek_jax.config import EPOptions
from deepseek_jax.moe import routing
from deepseek_jax.moe.layer import MoE

B, T = 16, (32 if SMALL else 256)
x_BTD = jax.random.normal(jax.random.key(1), (B, T, cfg.hidden_size), jnp.float32)
measured = {}
for path in ("flat", "two_hop"):
    layer = MoE(cfg, rngs=nnx.Rngs(0), ep=EPOptions(path=path))
    graphdef, state = nnx.split(layer)
    with jax.set_mesh(mesh):
        layer = nnx.merge(graphdef, jax.device_put(state, sharding.state_shardings(state, mesh)))
        _, stats = nnx.jit(MoE.__call__)(layer, jax.device_put(x_BTD, P(("node", "gpu"))))
    measured[path] = int(stats.internode) / (B * T)
    assert int(stats.dropped) == 0
gate_DE = np.asarray(layer.gate[...])  # the same gate in both layers (same seed)
scores = routing.gate_scores(x_BTD.reshape(B * T, -1) @ gate_DE, cfg)
idx_TK, _ = routing.route(scores, None, cfg)
src_node_T = np.repeat(np.arange(B) // (B // 8) // mesh.shape["gpu"], T)  # rows per device
flat_T, two_hop_T = internode_copies(np.asarray(idx_TK), src_node_T, PER_NODE)
counted = {"flat": flat_T.mean(), "two_hop": two_hop_T.mean()}
for path in measured:
    print(f"{path:8s} exchange buffers {measured[path]:.3f}   router count {counted[path]:.3f}")
    assert abs(measured[path] - counted[path]) < 1e-9

# %% [markdown]
# The same count at DeepSeek-V3's size: 256 experts on 8 nodes, top-8, for every node
# limit M (random router scores). Flat sends a copy per remote expert, up to 8; two-hop
# one per remote node, at most M. V3 uses M = 4.

# %% figure="copies_per_token"
v3 = get_preset("v3-671b")
n_tok = 2048 if SMALL else 16384
logits = jax.random.normal(jax.random.key(2), (n_tok, v3.n_routed_experts))
src = np.asarray(jax.random.randint(jax.random.key(3), (n_tok,), 0, v3.n_group))
Ms = list(range(1, v3.n_group + 1))
flat_M, hop_M = [], []
for m in Ms:
    c = get_preset("v3-671b", [f"topk_group={m}"])
    idx, _ = routing.route(routing.gate_scores(logits, c), None, c)
    f, h = internode_copies(np.asarray(idx), src, v3.n_routed_experts // v3.n_group)
    flat_M.append(f.mean())
    hop_M.append(h.mean())
fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [1.5, 1]})
a.plot(Ms, flat_M, "o-", label="flat: one per remote expert")
a.plot(Ms, hop_M, "s-", label="two-hop: one per remote node")
a.plot(Ms, Ms, ":", color="gray", label="M (the node limit)")
a.axvline(v3.topk_group, color="k", lw=0.8, ls="--")
a.text(v3.topk_group + 0.1, 0.3, "V3: M = 4", fontsize=8)
a.set(xlabel="node limit M (topk_group)", ylabel="inter-node copies per token", ylim=(0, 8.5))
a.set_title("256 experts on 8 nodes, top-8, random scores", fontsize=10)
a.legend(fontsize=8)
paths = list(measured)
pos = np.arange(len(paths))
b.bar(pos - 0.2, [measured[p] for p in paths], 0.4, label="exchange buffers (measured)")
b.bar(pos + 0.2, [counted[p] for p in paths], 0.4, label="router count")
b.set_xticks(pos, paths)
b.set(ylabel="inter-node copies per token")
b.set_title(
    f"this mesh {dict(mesh.shape)}, {cfg.n_routed_experts} experts, M = {cfg.topk_group}",
    fontsize=10,
)
b.legend(fontsize=8)
fig.tight_layout()
plt.show()
print(f"V3 (M = 4): flat {flat_M[3]:.2f}, two-hop {hop_M[3]:.2f} copies per token")

# %% [markdown]
# ## 3. The aux-loss-free bias moves the load towards balance
#
# DeepSeek-V3 adds a bias `b_i` to each expert's score for the *choice* only (the gate
# weights stay unbiased) and, after each step, lowers it by gamma for overloaded experts
# and raises it for underloaded ones (V3 report 2.1.2). `bias_balancing_run` runs that
# rule alone on fixed router scores (a first MoE layer's, on held-out text): the gate does
# not learn, so what moves the load is the bias. Training does the same every step
# (`quickstart.ipynb` plots it per layer).

# %% figure="bias_balancing"
rows = next(corpus.eval_batches(8, 64 if SMALL else 256, max_batches=1))[:, :-1]
held_out = probe_fn(model, jnp.asarray(rows, jnp.int32))
scores_TE = held_out.scores_LBTE[0].reshape(-1, cfg.n_routed_experts)
steps, gamma = (60 if SMALL else 80), 1e-3
bias_NE, load_NE = routing.bias_balancing_run(scores_TE, cfg, gamma, steps)
_, still_NE = routing.bias_balancing_run(scores_TE, cfg, 0.0, 2)
ratio_N = np.asarray(load_NE.max(-1) / load_NE.mean(-1))
fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.8))
a.plot(ratio_N, label=f"gamma = {gamma:g}")
a.axhline(float(still_NE[0].max() / still_NE[0].mean()), color="gray", ls="--", label="gamma = 0")
a.axhline(1.0, color="k", lw=0.8, ls=":")
a.set(xlabel="update step", ylabel="max / mean expert load", ylim=(0.95, None))
a.set_title(
    f"{scores_TE.shape[0]} tokens, {cfg.n_routed_experts} experts, top-{cfg.num_experts_per_tok}",
    fontsize=10,
)
a.legend(fontsize=8)
start_E = np.asarray(load_NE[0] / load_NE[0].mean())  # each expert's load before any update
spread = (start_E - start_E.min()) / max(np.ptp(start_E), 1e-9)  # 0: least, 1: most loaded
colours = plt.cm.coolwarm(spread)
for e in range(cfg.n_routed_experts):
    b.plot(np.asarray(bias_NE[:, e]), color=colours[e], lw=1.2)
b.set(xlabel="update step", ylabel="routing bias b_i")
b.set_title("each expert's bias; red: most loaded at the start, blue: least", fontsize=10)
fig.tight_layout()
plt.show()
tenth = max(1, steps // 10)
print(
    f"max/mean load: first {ratio_N[0]:.2f}, mean of the last tenth {ratio_N[-tenth:].mean():.2f}"
)
assert ratio_N[-tenth:].mean() < ratio_N[0]

# %% [markdown]
# ## 4. One MoE layer's GPU schedule, with and without dual micro-batch overlap
#
# On a GPU, a dispatch or combine all-to-all can travel while the device computes, if XLA's
# latency-hiding scheduler finds independent work to put between the collective's start and
# its done. One batch has none: its experts need its dispatch, its combine needs its
# experts. `overlap=dual` (V3TR 3.2.1, `deepseek_jax/overlap.py`) splits each device's batch
# into halves A and B and orders the phases so that one half's all-to-all has the other
# half's compute beside it.
#
# `experiments.gpu_compile` compiles the real program for a cluster of H100s on this CPU
# (no GPU: abstract devices from the CUDA plugin, JAX_NOTES.md) and saves XLA's schedule;
# `codesign.timeline` replays it under the cost model of `codesign/schedule.py`: kernels one
# after another on the compute stream, each all-to-all on the link from its start for its
# bytes over the link's bandwidth, the compute stream waiting at its done if it has not
# arrived. The program is a prefill (a forward pass over a batch of prompts) of a model cut
# to one MoE layer: there the split covers the MoE's phases (the training step also splits
# attention, forward and backward: README, "Deviceless GPU compile"). It is XLA's intended
# schedule priced by a model, not a measurement.

# %% figure="gpu_schedule" needs=".venv-gpu"
import json
import subprocess
import tempfile
from pathlib import Path

import deepseek_jax
from deepseek_jax.codesign.timeline import CATEGORIES, OTHER, timeline, totals

ROOT = Path(deepseek_jax.__file__).resolve().parents[1]
GPU_PY = ROOT / ".venv-gpu" / "bin" / "python"  # jax plus the CUDA plugin wheels
if SMALL:  # 8 experts, one per device; compiles in seconds
    GPU_MESH, GPU_MODEL = {"node": 2, "gpu": 4}, ["--preset", "tiny", "--batch", "16"]
    GPU_MODEL += ["--seq-len", "128"]
else:  # bench-small's widths, 16 experts, one per device
    GPU_MESH, GPU_MODEL = {"node": 2, "gpu": 8}, ["--preset", "bench-small", "--batch", "32"]
    GPU_MODEL += ["--seq-len", "512"]
ONE_MOE_LAYER = ["num_hidden_layers=1", "first_k_dense_replace=0", "num_nextn_predict_layers=0"]

if not GPU_PY.exists():
    print(
        f"The deviceless compile needs {GPU_PY.relative_to(ROOT)}, a venv with the CUDA "
        "plugin wheels (no GPU needed). Build it with `make gpu-venv` (or `make gpu-compile`), "
        "then run this cell again."
    )
else:
    out_dir = Path(tempfile.mkdtemp(prefix="gpu_schedule_"))
    mesh_arg = ",".join(f"{k}={v}" for k, v in GPU_MESH.items())
    # LLVM at -O0 shortens the compile; XLA's schedule is decided before LLVM runs.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
    runs = {}
    for ov in ("none", "dual"):  # both compiles at once, one process each
        cmd = [str(GPU_PY), "-m", "experiments.gpu_compile", "--json", "--target", "h100"]
        cmd += ["--mesh", mesh_arg, "--program", "prefill", *GPU_MODEL, *ONE_MOE_LAYER]
        cmd += ["--hlo-out", str(out_dir / f"{ov}.hlo"), f"overlap={ov}"]
        runs[ov] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    summaries, bars = {}, {}
    for ov, proc in runs.items():
        stdout, _ = proc.communicate()
        assert proc.returncode == 0, f"overlap={ov}: the compile failed ({proc.returncode})"
        summaries[ov] = json.loads(stdout.strip().splitlines()[-1])
        bars[ov] = timeline((out_dir / f"{ov}.hlo").read_text(), GPU_MESH)

    colours = dict(zip([c for c, _ in CATEGORIES] + [OTHER], ["C0", "C2", "C4", "C1", "0.7"]))
    link = {("node",): "C3", ("gpu",): "C9"}  # the all-to-all's mesh axis

    def us(b, length):  # a (start, width) span in microseconds
        return [(b.start_s * 1e6, length * 1e6)]

    fig, axes = plt.subplots(2, 1, figsize=(13, 7.5), sharex=True)
    for ax, ov in zip(axes, ("none", "dual"), strict=True):
        comp = [b for b in bars[ov] if b.lane == "compute"]
        coll = [b for b in bars[ov] if b.lane == "collective" and b.category == "all-to-all"]
        for b in comp:  # row 0: the compute stream, one bar per kernel
            ax.broken_barh(us(b, b.end_s - b.start_s), (-0.4, 0.8), color=colours[b.category])
        for i, b in enumerate(coll, start=1):  # a row per all-to-all, in issue order
            c = link.get(b.axes, "k")
            window = us(b, b.end_s - b.start_s)
            ax.broken_barh(window, (i - 0.4, 0.8), facecolor="none", edgecolor=c, lw=0.8)
            style = dict(alpha=0.9) if b.is_async else dict(alpha=0.4, hatch="//")
            ax.broken_barh(us(b, b.transfer_s), (i - 0.3, 0.6), color=c, **style)
        names = [f"a2a {','.join(b.axes)}" + ("" if b.is_async else " (sync)") for b in coll]
        ax.set_yticks(range(len(coll) + 1), ["compute", *names], fontsize=8)
        ax.invert_yaxis()
        t = totals(bars[ov])
        ax.set_title(
            f"overlap={ov}: {len(coll)} all-to-alls, {len(coll) - sum(b.is_async for b in coll)} "
            f"sync; compute {t.compute_s * 1e6:.2f} us + waiting for transfers "
            f"{t.stall_s * 1e6:.2f} us = {t.makespan_s * 1e6:.2f} us",
            fontsize=10,
        )
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    fig.legend(handles, list(colours), fontsize=8, ncol=5, loc="lower center")
    axes[1].set_xlabel(
        "us under the cost model. All-to-alls: solid, bytes on the link (red: node, blue: "
        "gpu; hatched: sync); outline, start..done"
    )
    fig.suptitle(
        f"one MoE layer, prefill of {GPU_MODEL[1]} ({' '.join(GPU_MODEL[2:])}) on "
        f"{GPU_MESH} H100s: the compiled schedule",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    plt.show()
    keys = ("all_to_all_total", "sync_all_to_all", "all_to_all_overlapped")
    keys += ("all_to_all_hidden_fraction", "compile_s")
    for ov in ("none", "dual"):
        print(f"overlap={ov:5s}", {k: round(summaries[ov][k], 3) for k in keys})
    n_none, n_dual = (summaries[o]["all_to_all_total"] for o in ("none", "dual"))
    assert n_dual == 2 * n_none, (n_none, n_dual)  # each half exchanges on its own
    ends = {ov: totals(bars[ov]).makespan_s for ov in bars}
    print(f"end of the layer: none {ends['none'] * 1e6:.1f} us, dual {ends['dual'] * 1e6:.1f} us")
