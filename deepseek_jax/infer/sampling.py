"""Per-request sampling inside one batch, and the speculative-sampling acceptance rule.

Each row has its own temperature (0: greedy), top-k (0: all), top-p and seed. A row's
random draws depend only on its seed and the position of the token drawn, never on its
batch neighbours, so a request gives the same tokens alone or in any batch.

Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): a draft token d drawn
from q is kept with probability min(1, p(d) / q(d)); otherwise the token is drawn from
max(0, p - q) renormalised. The kept token is then distributed as p exactly. Under greedy
rows both p and q are one-hot, which makes the rule "keep d iff d = argmax p".

Shape letters: B rows (requests), V vocab.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

import deepseek_jax.sharding as sharding


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's sampling: greedy when ``temperature`` is 0."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        checks = (
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0: all tokens)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
        )
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSampling:
    """SamplingParams of a batch's rows as arrays (padding rows: greedy)."""

    temperature_B: Float[Array, " B"]
    top_k_B: Int[Array, " B"]
    top_p_B: Float[Array, " B"]
    seed_B: Int[Array, " B"]


def argmax(x_BV: Float[Array, "B V"]) -> Int[Array, " B"]:
    """``jnp.argmax(x_BV, -1)`` (the first maximum; the first NaN where there is one) as
    a max, a compare and a min: XLA:CPU runs argmax's (value, index) reduction scalar,
    at 16 rows of a 4096 vocabulary 3.5x slower than these vectorised reductions
    (``tests/test_engine.py`` checks it against ``jnp.argmax``)."""
    m_B1 = jnp.max(x_BV, axis=-1, keepdims=True)  # NaN where the row holds one
    iota_BV = jax.lax.broadcasted_iota(jnp.int32, x_BV.shape, 1)
    hit_BV = (x_BV == m_B1) | jnp.isnan(x_BV)
    return jnp.min(jnp.where(hit_BV, iota_BV, x_BV.shape[-1]), axis=-1).astype(jnp.int32)


def distribution(logits_BV: Float[Array, "B V"], s: RowSampling) -> Float[Array, "B V"]:
    """The distribution each row samples from: softmax(logits / T) cut to its top-k and
    nucleus, renormalised; one-hot at the argmax for greedy rows.

    The vocabulary sort that top-k / top-p need is the costliest op of a CPU decode step at
    batch 16 (a fifth of it), so it runs only when some sampled row asks for a cut
    (``lax.cond``); an all-greedy batch takes the one-hots alone."""
    logits_BV = _replicated(logits_BV.astype(jnp.float32))
    greedy_B = s.temperature_B <= 0
    onehot_BV = jax.nn.one_hot(argmax(logits_BV), logits_BV.shape[-1])
    cut_B = ~greedy_B & ((s.top_k_B > 0) | (s.top_p_B < 1.0))
    branch = jnp.where(jnp.all(greedy_B), 0, jnp.where(jnp.any(cut_B), 2, 1))
    plain = lambda x: _tempered(x, s, cut=False)  # noqa: E731
    cut = lambda x: _tempered(x, s, cut=True)  # noqa: E731
    probs_BV = jax.lax.switch(branch, (lambda x: onehot_BV, plain, cut), logits_BV)
    return jnp.where(greedy_B[:, None], onehot_BV, probs_BV)


def _tempered(logits_BV: Float[Array, "B V"], s: RowSampling, *, cut: bool) -> Array:
    """softmax(logits / T), cut to each row's top-k and nucleus when ``cut`` (a row without
    a cut keeps all tokens either way)."""
    z_BV = logits_BV / jnp.where(s.temperature_B <= 0, 1.0, s.temperature_B)[:, None]
    plain_BV = jax.nn.softmax(z_BV, axis=-1)
    if not cut:
        return plain_BV
    V = logits_BV.shape[-1]
    desc_BV = -jnp.sort(-z_BV, axis=-1)
    k_B = jnp.where(s.top_k_B > 0, jnp.minimum(s.top_k_B, V), V)
    kth_B1 = jnp.take_along_axis(desc_BV, k_B[:, None] - 1, axis=-1)
    probs_desc_BV = jax.nn.softmax(jnp.where(desc_BV < kth_B1, -jnp.inf, desc_BV), axis=-1)
    keep_BV = jnp.cumsum(probs_desc_BV, axis=-1) - probs_desc_BV < s.top_p_B[:, None]
    cut_B1 = jnp.min(jnp.where(keep_BV, desc_BV, jnp.inf), axis=-1, keepdims=True)
    cut_B1 = jnp.maximum(cut_B1, kth_B1)
    cut_BV = jax.nn.softmax(jnp.where(z_BV < cut_B1, -jnp.inf, z_BV), axis=-1)
    uncut_B = (s.top_k_B <= 0) & (s.top_p_B >= 1.0)  # the same figures in any batch
    return jnp.where(uncut_B[:, None], plain_BV, cut_BV)


def _replicated(x_BV: Array) -> Array:
    """Rows of a batch-sharded program meet their (replicated) per-row keys and settings."""
    return sharding.constrain(x_BV, (None, None))


def row_keys(s: RowSampling, pos_B: Int[Array, " B"], stream: int) -> Array:
    """A key per row from its seed, the drawn token's position and a stream id."""
    keys = jax.vmap(jax.random.key)(s.seed_B)
    keys = jax.vmap(jax.random.fold_in)(keys, pos_B)
    return jax.vmap(lambda k: jax.random.fold_in(k, stream))(keys)


def draw(probs_BV: Float[Array, "B V"], keys) -> Int[Array, " B"]:
    """One token per row from ``probs_BV`` (argmax where it is one-hot)."""
    logp_BV = jnp.log(probs_BV)
    return jax.vmap(jax.random.categorical)(keys, logp_BV).astype(jnp.int32)


def sample(
    logits_BV: Float[Array, "B V"], s: RowSampling, pos_B: Int[Array, " B"], stream: int = 0
) -> tuple[Int[Array, " B"], Float[Array, "B V"]]:
    """(token, the distribution it was drawn from) per row; greedy rows take the argmax.
    An all-greedy batch skips the random draws (``lax.cond``)."""
    logits_BV = _replicated(logits_BV)
    probs_BV = distribution(logits_BV, s)
    greedy_tok_B = argmax(logits_BV)
    tok_B = jax.lax.cond(
        jnp.all(s.temperature_B <= 0),
        lambda p: greedy_tok_B,
        lambda p: draw(p, row_keys(s, pos_B, stream)),
        probs_BV,
    )
    return jnp.where(s.temperature_B <= 0, greedy_tok_B, tok_B), probs_BV


def verify(
    draft_B: Int[Array, " B"],
    q_BV: Float[Array, "B V"],
    p_BV: Float[Array, "B V"],
    s: RowSampling,
    pos_B: Int[Array, " B"],
) -> tuple[Array, Int[Array, " B"]]:
    """Speculative acceptance of ``draft_B`` (drawn from ``q_BV``) against the target
    ``p_BV``. Returns (accepted [B] bool, the token at this position [B]: the draft when
    accepted, else a draw from the residual max(0, p - q))."""
    u_B = jax.vmap(jax.random.uniform)(row_keys(s, pos_B, 1))
    p_d = jnp.take_along_axis(p_BV, draft_B[:, None], axis=-1)[:, 0]
    q_d = jnp.take_along_axis(q_BV, draft_B[:, None], axis=-1)[:, 0]
    accepted_B = u_B * q_d < p_d  # u < p/q without dividing by a zero q
    resid_BV = jnp.maximum(p_BV - q_BV, 0.0)
    mass_B1 = resid_BV.sum(-1, keepdims=True)
    resid_BV = jnp.where(mass_B1 > 0, resid_BV / jnp.where(mass_B1 > 0, mass_B1, 1.0), p_BV)
    greedy_B = s.temperature_B <= 0
    other_B = jax.lax.cond(  # an all-greedy batch draws nothing
        jnp.all(greedy_B),
        lambda r: jnp.zeros(draft_B.shape, jnp.int32),
        lambda r: draw(r, row_keys(s, pos_B, 2)),
        resid_BV,
    )
    other_B = jnp.where(greedy_B, argmax(p_BV), other_B)
    return accepted_B, jnp.where(accepted_B, draft_B, other_B)
