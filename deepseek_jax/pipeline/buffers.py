"""Array helpers of the pipeline executor: per-chunk reads and writes of stacked trees and
buffers, masked carries, and the gradient and statistics layouts it hands back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import deepseek_jax.sharding as sharding
from deepseek_jax.pipeline.placement import LayerPlan


def take(tree, c):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, c, 0, keepdims=False), tree)


def add_at(tree, c, delta):
    def one(acc, d):
        cur = jax.lax.dynamic_index_in_dim(acc, c, 0, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(acc, cur + d.astype(acc.dtype), c, 0)

    return jax.tree.map(one, tree, delta)


def write(buf, on, c, mb, val):
    """buf[c, mb] = val where ``on``; a received transfer lands in its (chunk, micro-batch)."""
    return buf.at[c, mb].set(jnp.where(on, val.astype(buf.dtype), buf[c, mb]))


def keep_where(on, new: dict, old: dict) -> dict:
    """``new`` where ``on`` (a traced bool or True), else ``old``'s entries of the same keys."""
    if on is True:
        return new
    return {k: jax.tree.map(lambda a, b: jnp.where(on, a, b), v, old[k]) for k, v in new.items()}


def like(ref: nnx.State, tree) -> nnx.State:
    """``tree``'s leaves in ``ref``'s structure, matched by key path (the vjp of the gather
    returns plain dicts where ``ref`` has States)."""
    key = lambda path: jax.tree_util.keystr(path).replace(".value", "")  # noqa: E731
    by_path = {key(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    paths, treedef = jax.tree_util.tree_flatten_with_path(ref)
    return jax.tree.unflatten(treedef, [by_path[key(p)] for p, _ in paths])


def per_layer(stats, plan: LayerPlan, m: int):
    """[PP, C, Km, ...] per-chunk MoE statistics -> [Lm, ...] per layer of the main stack."""
    if not stats:
        return None
    n_layers = int(plan.moe_idx[plan.moe_valid].max()) + 1
    idx, valid = plan.moe_idx[plan.moe_valid], plan.moe_valid

    def one(a):
        picked = sharding.relayout_dim(a, 0, None)[valid]
        return jnp.zeros((n_layers, *a.shape[3:]), a.dtype).at[idx].add(picked)

    load, bal, drop = (one(s) for s in stats)
    return load, bal / m, drop
