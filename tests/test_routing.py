"""Gate properties and numerics against the step-by-step numpy gate."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.moe import routing
from deepseek_jax.presets import get_preset
from tests.reference.moe_reference import balance_loss_reference, gate_reference

V3 = get_preset(
    "small", ["n_routed_experts=32", "n_group=8", "topk_group=3", "num_experts_per_tok=6"]
)
V2 = dataclasses.replace(
    V3,
    scoring_func="softmax",
    topk_method="group_limited_greedy",
    norm_topk_prob=False,
    routed_scaling_factor=16.0,
)
V2_LITE = dataclasses.replace(
    V2, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0
)


def _logits(T=64, E=32, seed=0, scale=2.0):
    return scale * jax.random.normal(jax.random.key(seed), (T, E), jnp.float32)


def _bias(E=32, seed=1, scale=0.3):
    return scale * jax.random.normal(jax.random.key(seed), (E,), jnp.float32)


def test_k_distinct_experts_within_topk_groups():
    cfg = V3
    idx, weight = routing.route(routing.gate_scores(_logits(), cfg), _bias(), cfg)
    idx = np.asarray(idx)
    assert idx.dtype == np.int32 and weight.dtype == jnp.float32
    assert idx.shape == (64, cfg.num_experts_per_tok)
    assert all(len(set(row)) == cfg.num_experts_per_tok for row in idx)
    groups = idx // cfg.experts_per_group
    assert max(len(set(row)) for row in groups) <= cfg.topk_group


def test_weights_sum_to_scaling_factor():
    cfg = V3
    _, weight = routing.route(routing.gate_scores(_logits(), cfg), _bias(), cfg)
    np.testing.assert_allclose(np.sum(weight, -1), cfg.routed_scaling_factor, rtol=1e-6)


def test_bias_changes_choice_not_weights():
    cfg = V3
    scores = routing.gate_scores(_logits(), cfg)
    idx0, _ = routing.route(scores, None, cfg)
    favoured = jnp.zeros(32).at[jnp.array([4, 5, 6])].set(10.0)  # all in group 1
    idx, weight = routing.route(scores, favoured, cfg)
    assert not np.array_equal(idx0, idx)
    assert all(set(row[:3]) == {4, 5, 6} for row in np.asarray(idx))
    chosen = np.take_along_axis(np.asarray(scores), np.asarray(idx), -1)
    expect = chosen / chosen.sum(-1, keepdims=True) * cfg.routed_scaling_factor
    np.testing.assert_allclose(weight, expect, rtol=1e-6)


@pytest.mark.parametrize("cfg", [V3, V2, V2_LITE], ids=["v3", "v2", "v2-lite"])
def test_route_matches_numpy_gate(cfg):
    logits, bias = _logits(), _bias() if cfg.has_routing_bias else None
    idx, weight = routing.route(routing.gate_scores(logits, cfg), bias, cfg)
    ref_idx, ref_weight, ref_scores = gate_reference(np.asarray(logits), bias, cfg)
    np.testing.assert_allclose(routing.gate_scores(logits, cfg), ref_scores, rtol=1e-6)
    np.testing.assert_array_equal(np.sort(idx, -1), np.sort(ref_idx, -1))
    order = np.argsort(idx, -1)
    np.testing.assert_allclose(
        np.take_along_axis(np.asarray(weight), order, -1),
        np.take_along_axis(ref_weight, np.argsort(ref_idx, -1), -1),
        rtol=1e-5,
    )


def test_v2_softmax_gate_is_unnormalised_and_scaled():
    cfg = V2
    scores = routing.gate_scores(_logits(), cfg)
    np.testing.assert_allclose(np.sum(scores, -1), 1.0, rtol=1e-6)
    idx, weight = routing.route(scores, None, cfg)
    chosen = np.take_along_axis(np.asarray(scores), np.asarray(idx), -1)
    np.testing.assert_allclose(weight, chosen * 16.0, rtol=1e-6)
    groups = np.asarray(idx) // cfg.experts_per_group
    assert max(len(set(row)) for row in groups) <= cfg.topk_group


def test_group_mask_with_negative_biased_scores():
    # Every biased score is negative: masking the other groups with 0 would pick them.
    cfg = V3
    scores = routing.gate_scores(_logits(), cfg)
    bias = jnp.full((32,), -5.0) + _bias()
    idx, _ = routing.route(scores, bias, cfg)
    ref_idx, _, _ = gate_reference(np.asarray(_logits()), bias, cfg)
    np.testing.assert_array_equal(np.sort(idx, -1), np.sort(ref_idx, -1))
    groups = np.asarray(idx) // cfg.experts_per_group
    assert max(len(set(row)) for row in groups) <= cfg.topk_group


def test_group_score_ties_count_twice():
    x = jnp.array([[[1.0, 3.0, 3.0, 2.0], [0.5, 0.1, 0.4, 0.2]]])
    np.testing.assert_allclose(routing._top2_sum(x), [[6.0, 0.9]])


def test_expert_load():
    idx = jax.random.randint(jax.random.key(0), (50, 4), 0, 16)
    load = routing.expert_load(idx, 16)
    assert load.dtype == jnp.float32 and float(load.sum()) == 200
    np.testing.assert_array_equal(load, np.bincount(np.asarray(idx).ravel(), minlength=16))


def test_update_bias_signs():
    bias = jnp.zeros(4)
    new = routing.update_bias(bias, jnp.array([10.0, 2.0, 4.0, 0.0]), 0.001)  # mean 4
    np.testing.assert_allclose(new, [-0.001, 0.001, 0.0, 0.001])


def test_balance_loss_matches_numpy_and_is_one_when_uniform():
    cfg = V3
    scores = routing.gate_scores(_logits(T=48), cfg).reshape(3, 16, 32)
    idx, _ = routing.route(scores, None, cfg)
    loss = routing.sequence_balance_loss(scores, idx, cfg)
    np.testing.assert_allclose(
        loss, balance_loss_reference(scores, np.asarray(idx), cfg), rtol=1e-5
    )
    uniform = jnp.full((1, 8, 32), 0.5)
    round_robin = (jnp.arange(8 * 6).reshape(1, 8, 6) % 32).astype(jnp.int32)
    np.testing.assert_allclose(
        routing.sequence_balance_loss(uniform, round_robin, cfg), 1.0, rtol=1e-6
    )
    grad = jax.grad(lambda s: routing.sequence_balance_loss(s, idx, cfg))(scores)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("k", [1, 4, 8])
def test_top_k_is_a_stable_top_k_with_ties_and_masked_groups(k):
    """Values equal ``lax.top_k``'s; ties go to the lowest index (a stable sort), which
    XLA:CPU's own top_k does not promise in practice."""
    x = jnp.round(jax.random.normal(jax.random.key(k), (64, 32)) * 2) / 2  # many ties
    x = x.at[:, 8:16].set(-jnp.inf).at[3].set(0.5)  # a masked group, an all-tied row
    vals, idx = routing.top_k(x, k)
    np.testing.assert_array_equal(vals, jax.lax.top_k(x, k)[0])
    np.testing.assert_array_equal(idx, np.argsort(-np.asarray(x), axis=-1, kind="stable")[:, :k])
