"""Which experts each MoE layer picks for each token: the router's decisions, replayed.

The MoE layer returns per-expert loads only (what training needs). To show where the
tokens of a sentence go, ``route_probe`` runs the model block by block and, before each
MoE block's experts, calls the same router (``routing.gate_scores``, ``routing.route``)
on the same input the layer sees. The loads it implies equal the model's own
``moe_stats.load_LE`` (tested), so the picture is the model's real routing.

Shape letters: L MoE layers, B batch, T positions, D hidden, K experts per token, E routed
experts.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

import deepseek_jax.moe.routing as routing


class RouteProbe(NamedTuple):
    idx_LBTK: Int[Array, "L B T K"]  # chosen experts per MoE layer, best first
    weight_LBTK: Float[Array, "L B T K"]  # their gate weights
    scores_LBTE: Float[Array, "L B T E"]  # unbiased affinities s of every expert


def _layers(stacked) -> list:
    """The blocks of a layer stack (leading axis L), one module each."""
    if stacked is None:
        return []
    graphdef, state = nnx.split(stacked)
    n = jax.tree.leaves(state)[0].shape[0]
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(n)]


def route_probe(model, ids_BT: Int[Array, "B T"]) -> RouteProbe:
    """The main model's routing of ``ids_BT`` in every MoE layer (MTP modules excluded).

    Args:
      model: a ``Transformer``.
      ids_BT: token ids [B, T].
    Returns:
      A ``RouteProbe`` with L = the number of MoE layers.
    """
    cfg = model.cfg
    if model.moe_layers is None:
        raise ValueError("route_probe: the model has no MoE layers (first_k_dense_replace)")
    positions_BT = jnp.broadcast_to(jnp.arange(ids_BT.shape[1]), ids_BT.shape)
    x_BTD = model.embed_tokens(ids_BT)
    for block in _layers(model.dense_layers):
        x_BTD, _ = block(x_BTD, positions_BT)
    idx, weight, scores = [], [], []
    for block in _layers(model.moe_layers):
        # The MoE's input, as Block.__call__ forms it (attention residual, then the norm).
        a_BTD = x_BTD + block.self_attn(block.input_layernorm(x_BTD), positions_BT)
        u_BTD = block.post_attention_layernorm(a_BTD).astype(cfg.run.dtype)
        logits_BTE = u_BTD.astype(jnp.float32) @ block.mlp.gate[...].astype(jnp.float32)
        s_BTE = routing.gate_scores(logits_BTE, cfg)
        bias = block.mlp.e_score_correction_bias
        idx_BTK, w_BTK = routing.route(s_BTE, None if bias is None else bias[...], cfg)
        idx.append(idx_BTK)
        weight.append(w_BTK)
        scores.append(s_BTE)
        x_BTD, _ = block(x_BTD, positions_BT)
    return RouteProbe(jnp.stack(idx), jnp.stack(weight), jnp.stack(scores))
