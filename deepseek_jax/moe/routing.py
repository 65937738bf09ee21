"""The DeepSeekMoE router: gate scores, node-limited top-k, balance loss, bias update.

DeepSeek-V3 (V3TR 2.1.2, eqs. 13-16; the official ``inference/model.py`` Gate) scores
every routed expert with ``s = sigmoid(u W)``, adds the load-balancing bias ``b`` for the
*choice* only, limits each token to ``topk_group`` expert groups (one group per node),
ranked by the sum of their top-2 biased scores, takes the top-k experts inside those
groups, and weights them by their *unbiased* scores, normalised and multiplied by
``routed_scaling_factor``. DeepSeek-V2 (``topk_method='group_limited_greedy'``) uses a
softmax and ranks groups by their best expert; V2-Lite (``'greedy'``) has no groups.
Everything here is float32 and works on any leading axes (``...`` below).

Shape letters: B batch, T tokens, E routed experts, K experts per token, G routing groups, M
groups kept per token, N bias-update steps (``simulate_bias``; not nope dim).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from deepseek_jax.config import ModelConfig


def gate_scores(logits_TE: Float[Array, "... E"], cfg: ModelConfig) -> Float[Array, "... E"]:
    """Expert affinities ``s`` from router logits: sigmoid (V3) or softmax (V2), in float32."""
    logits_TE = logits_TE.astype(jnp.float32)
    if cfg.scoring_func == "sigmoid":
        return jax.nn.sigmoid(logits_TE)
    return jax.nn.softmax(logits_TE, axis=-1)


def _top2_sum(x_TGe: Float[Array, "... G e"]) -> Float[Array, "... G"]:
    """Sum of the two largest values on the last axis (ties counted twice, as top_k does).

    Plain max reductions: on XLA:CPU faster than ``lax.top_k`` (README, "Measured figures").
    """
    m1 = jnp.max(x_TGe, axis=-1, keepdims=True)
    ties = jnp.sum(x_TGe == m1, axis=-1) > 1
    m2 = jnp.max(jnp.where(x_TGe == m1, -jnp.inf, x_TGe), axis=-1)
    m1 = m1[..., 0]
    return m1 + jnp.where(ties, m1, m2)


def top_k(x: Float[Array, "... E"], k: int) -> tuple[Float[Array, "... k"], Int[Array, "... k"]]:
    """The k largest values and their indices, best first; ties go to the lowest index.

    k rounds of max, lowest index at the max, mask it: on XLA:CPU faster than ``lax.top_k``
    (whose sort-based kernel does not exploit k << E; README, "Measured figures").
    """
    E = x.shape[-1]
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    vals, idx = [], []
    for _ in range(k):
        m = jnp.max(x, axis=-1, keepdims=True)
        # A NaN row has no element equal to its max: clamp, so the index stays in range
        # (its weights are NaN and the training loop stops on the NaN loss).
        i = jnp.minimum(jnp.min(jnp.where(x == m, iota, E), axis=-1, keepdims=True), E - 1)
        vals.append(m[..., 0])
        idx.append(i[..., 0])
        x = jnp.where(iota == i, -jnp.inf, x)
    return jnp.stack(vals, axis=-1), jnp.stack(idx, axis=-1)


def _group_mask(sel_TE: Float[Array, "... E"], cfg: ModelConfig) -> Float[Array, "... E"]:
    """Selection scores with all experts outside the best ``topk_group`` groups set to -inf."""
    G, M = cfg.n_group, cfg.topk_group
    if cfg.topk_method == "greedy" or M >= G:
        return sel_TE
    sel_TGe = sel_TE.reshape(*sel_TE.shape[:-1], G, -1)
    if cfg.topk_method == "noaux_tc":  # V3: a node is as good as its two best experts
        group_TG = _top2_sum(sel_TGe)
    else:  # V2 group_limited_greedy: as good as its best expert
        group_TG = jnp.max(sel_TGe, axis=-1)
    _, keep_TM = jax.lax.top_k(group_TG, M)
    keep_TG = jnp.max(jax.nn.one_hot(keep_TM, G, dtype=jnp.int8), axis=-2) > 0
    # -inf, not 0: biased sigmoid scores may be negative, and then 0 would beat them.
    return jnp.where(keep_TG[..., None], sel_TGe, -jnp.inf).reshape(sel_TE.shape)


def route(
    scores_TE: Float[Array, "... E"], bias_E: Float[Array, " E"] | None, cfg: ModelConfig
) -> tuple[Int[Array, "... K"], Float[Array, "... K"]]:
    """Chooses ``num_experts_per_tok`` experts per token and their gate weights.

    Args:
      scores_TE: affinities from ``gate_scores`` [..., E].
      bias_E: the routing bias [E] (V3's ``e_score_correction_bias``), or None.
    Returns:
      idx_TK: int32 [..., K], K distinct experts per token, best first.
      weight_TK: float32 [..., K], the unbiased scores of those experts, normalised to
        sum to one when ``norm_topk_prob``, times ``routed_scaling_factor``.
    """
    scores_TE = scores_TE.astype(jnp.float32)
    sel_TE = scores_TE
    if bias_E is not None:
        sel_TE = scores_TE + jnp.broadcast_to(bias_E.astype(jnp.float32), scores_TE.shape)
    _, idx_TK = top_k(_group_mask(sel_TE, cfg), cfg.num_experts_per_tok)
    weight_TK = jnp.take_along_axis(scores_TE, idx_TK, axis=-1)
    if cfg.norm_topk_prob:
        weight_TK = weight_TK / (jnp.sum(weight_TK, axis=-1, keepdims=True) + 1e-20)
    return idx_TK.astype(jnp.int32), weight_TK * cfg.routed_scaling_factor


def expert_load(idx_TK: Int[Array, "... K"], num_experts: int) -> Float[Array, " E"]:
    """Assignments per expert (float32 [E]); sums to the number of (token, expert) pairs."""
    ones = jnp.ones(idx_TK.size, jnp.float32)
    return jax.ops.segment_sum(ones, idx_TK.reshape(-1), num_segments=num_experts)


def sequence_balance_loss(
    scores_BTE: Float[Array, "B T E"], idx_BTK: Int[Array, "B T K"], cfg: ModelConfig
) -> Float[Array, ""]:
    """The sequence-wise balance loss of V3TR eqs. 17-20, without its weight alpha.

    Per sequence: ``f_i = N_r / (K_r T) * count_i`` (how often expert i is chosen, not
    differentiable), ``P_i = mean_t s_i,t / sum_j s_j,t``; loss ``sum_i f_i P_i``,
    averaged over the sequences. Uniform routing gives 1.
    """
    B, T, E = scores_BTE.shape
    K = idx_BTK.shape[-1]
    seq_BTK = jnp.broadcast_to(jnp.arange(B)[:, None, None], idx_BTK.shape)
    count_BE = jax.ops.segment_sum(
        jnp.ones(idx_BTK.size, jnp.float32),
        (seq_BTK * E + idx_BTK).reshape(-1),
        num_segments=B * E,
    ).reshape(B, E)
    f_BE = jax.lax.stop_gradient(count_BE) * (E / (K * T))
    s_BTE = scores_BTE.astype(jnp.float32)
    p_BE = jnp.mean(s_BTE / jnp.sum(s_BTE, axis=-1, keepdims=True), axis=1)
    return jnp.mean(jnp.sum(f_BE * p_BE, axis=-1))


def update_bias(
    bias_E: Float[Array, " E"], load_E: Float[Array, " E"], gamma: float
) -> Float[Array, " E"]:
    """Aux-loss-free balancing (V3TR 2.1.2): overloaded experts -gamma, underloaded +gamma."""
    load_E = load_E.astype(jnp.float32)
    return bias_E + gamma * jnp.sign(jnp.mean(load_E) - load_E).astype(bias_E.dtype)


def bias_balancing_run(
    scores_TE: Float[Array, "T E"], cfg: ModelConfig, gamma: float, steps: int
) -> tuple[Float[Array, "N E"], Float[Array, "N E"]]:
    """The bias update alone, on fixed scores: how aux-loss-free balancing steers the load.

    Each of ``steps`` rounds routes the same tokens with the current bias, counts the load
    and applies ``update_bias`` (the bias starts at zero). Training moves the gate too;
    freezing it isolates the bias's effect.

    Returns:
      bias_NE: the bias each round routed with [steps, E] (row 0 is zero).
      load_NE: the load it produced [steps, E].
    """

    def body(bias_E, _):
        idx_TK, _ = route(scores_TE, bias_E, cfg)
        load_E = expert_load(idx_TK, cfg.n_routed_experts)
        return update_bias(bias_E, load_E, gamma), (bias_E, load_E)

    bias0_E = jnp.zeros((cfg.n_routed_experts,), jnp.float32)
    _, (bias_NE, load_NE) = jax.lax.scan(body, bias0_E, None, length=steps)
    return bias_NE, load_NE
