"""Naive numpy DeepSeekMoE: the gate step by step as the official code writes it, then a
python loop over the experts. Slow and obvious on purpose; float64 throughout."""

from __future__ import annotations

import numpy as np

from deepseek_jax.config import ModelConfig


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _swiglu(x, w_gate, w_up, w_down):
    return (_silu(x @ w_gate) * (x @ w_up)) @ w_down


def gate_reference(logits_TE, bias_E, cfg: ModelConfig):
    """(idx_TK, weight_TK, scores_TE) following REFERENCE.md "Gate", one token at a time."""
    logits_TE = np.asarray(logits_TE, np.float64)
    if cfg.scoring_func == "sigmoid":
        scores = 1.0 / (1.0 + np.exp(-logits_TE))
    else:
        z = np.exp(logits_TE - logits_TE.max(-1, keepdims=True))
        scores = z / z.sum(-1, keepdims=True)
    T, E = scores.shape
    G, per = cfg.n_group, E // cfg.n_group
    idx = np.zeros((T, cfg.num_experts_per_tok), np.int64)
    weight = np.zeros((T, cfg.num_experts_per_tok))
    for t in range(T):
        sel = scores[t] + (0.0 if bias_E is None else np.asarray(bias_E, np.float64))
        if cfg.topk_method != "greedy" and cfg.topk_group < G:
            groups = sel.reshape(G, per)
            if cfg.topk_method == "noaux_tc":
                group_score = np.sort(groups, axis=-1)[:, -2:].sum(-1)
            else:
                group_score = groups.max(-1)
            keep = np.argsort(-group_score, kind="stable")[: cfg.topk_group]
            masked = np.full((G, per), -np.inf)
            masked[keep] = groups[keep]
            sel = masked.reshape(E)
        chosen = np.argsort(-sel, kind="stable")[: cfg.num_experts_per_tok]
        w = scores[t, chosen]
        if cfg.norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        idx[t], weight[t] = chosen, w * cfg.routed_scaling_factor
    return idx, weight, scores


def moe_reference(x_BTD, params: dict, cfg: ModelConfig):
    """The MoE layer output for ``params`` (the module's state as numpy arrays).

    params: gate [D, E], e_score_correction_bias [E] or None, w_gate/w_up [E, D, F],
    w_down [E, F, D], shared (gate_proj, up_proj, down_proj) or None.
    """
    p = {
        k: (None if v is None else np.asarray(v, np.float64))
        if not isinstance(v, tuple)
        else tuple(np.asarray(a, np.float64) for a in v)
        for k, v in params.items()
    }
    B, T, D = x_BTD.shape
    x = np.asarray(x_BTD, np.float64).reshape(B * T, D)
    idx, weight, _ = gate_reference(x @ p["gate"], p["e_score_correction_bias"], cfg)
    y = np.zeros_like(x)
    for e in range(cfg.n_routed_experts):
        tokens, slot = np.nonzero(idx == e)
        if tokens.size:
            out = _swiglu(x[tokens], p["w_gate"][e], p["w_up"][e], p["w_down"][e])
            y[tokens] += weight[tokens, slot][:, None] * out
    if p.get("shared") is not None:
        y += _swiglu(x, *p["shared"])
    return y.reshape(B, T, D)


def balance_loss_reference(scores_BTE, idx_BTK, cfg: ModelConfig) -> float:
    """V3TR eqs. 17-20 with explicit loops; mean over sequences."""
    scores_BTE = np.asarray(scores_BTE, np.float64)
    B, T, E = scores_BTE.shape
    K = idx_BTK.shape[-1]
    losses = []
    for b in range(B):
        count = np.zeros(E)
        for t in range(T):
            for k in range(K):
                count[idx_BTK[b, t, k]] += 1
        f = E / (K * T) * count
        p = (scores_BTE[b] / scores_BTE[b].sum(-1, keepdims=True)).mean(0)
        losses.append((f * p).sum())
    return float(np.mean(losses))
