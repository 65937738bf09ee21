"""Local permutation: (token, expert) assignments into expert order on one device, and back.

Sort the T*K assignments by expert (stable, so each expert sees its tokens in order),
then lay them out for the expert compute in one of two ways:
- ``permute_sorted``: rows sorted by expert plus group sizes, the input of a grouped GEMM
  (``jax.lax.ragged_dot`` on GPU, our C++ kernel ``cpu_kernels.grouped_gemm`` on CPU);
- ``permute``: dense capacity slots ``x[E, C, D]``, so the experts are one batched
  einsum that reads every expert's weights exactly once, for platforms without a fast
  grouped GEMM (XLA:CPU's ``ragged_dot`` is far slower and slows down with the group
  count, README "Measured figures"; gathering weights per row block costs traffic that
  grows with the block count).
  Assignments beyond an expert's C slots are *spilled*, not dropped: the handle lists
  them as blocks of b rows of one expert each, and ``experts.py`` runs a loop over the
  blocks actually used. C is sized from the static shapes so that balanced routing
  spills little; skewed routing stays exact, only slower.
Both return a handle (``Dispatch``) that combine reuses, as DeepEP's dispatch does.
An expert id equal to the number of experts means "no expert": such an assignment gets
no slot and no row of output (the expert-parallel exchange pads with it, ``dispatch.py``).
Sizes are static, so a handle describes the worst case and the used part is read from its
counts.

Shape letters: T tokens, K experts per token, A = T K assignments, E experts, C capacity
slots per expert, D hidden, P = A + b sorted positions (b: spill-block padding), N spill
blocks (not nope dim), R rows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


@dataclasses.dataclass(frozen=True)
class SlotSizes:
    """Static sizes of the slot layout.

    capacity: dense slots per expert, C (at most T: an expert gets each token once).
    spill_block: rows per spill block, b.
    """

    capacity: int
    spill_block: int = 16

    @classmethod
    def for_shapes(
        cls,
        tokens: int,
        k: int,
        experts: int,
        *,
        slack_sigmas: float = 2.0,
        multiple: int = 8,
        spill_block: int = 16,
        max_capacity: int | None = None,
    ) -> SlotSizes:
        """C = mean load + ``slack_sigmas`` x sqrt(mean load), rounded up, capped at
        ``max_capacity`` (default T: an expert gets each row once).

        The square root is the spread of a balanced (binomial) load: relative slack is
        large for many small experts and small for few large ones, so both spill little.
        """
        mean = tokens * k / experts
        c = math.ceil((mean + slack_sigmas * math.sqrt(mean)) / multiple) * multiple
        cap = tokens if max_capacity is None else max_capacity
        return cls(capacity=max(1, min(c, cap)), spill_block=spill_block)


class Dispatch(NamedTuple):
    """What permute learned about one routing; combine and the spill loop reuse it.

    A = T*K assignments, numbered ``t*K + k``; N = static bound on the spill blocks.
    Static sizes are array shapes: E, C = ``src_EC.shape``, K = ``slot_TK.shape[1]``,
    b = ``order_P.shape[0] - A``.
    """

    order_P: Int[Array, " P"]  # assignment ids by expert, + b zeros
    pos_TK: Int[Array, "T K"]  # position of each assignment in that order
    counts_E: Int[Array, " E"]  # assignments per expert
    starts_E: Int[Array, " E"]  # first sorted position of each expert
    src_EC: Int[Array, "E C"]  # token in each dense slot; T for an empty slot
    slot_TK: Int[Array, "T K"]  # e*C + rank of each assignment; E*C when spilled
    block_expert_N: Int[Array, " N"]  # expert of each spill block
    block_start_N: Int[Array, " N"]  # first sorted position of each spill block
    block_end_N: Int[Array, " N"]  # end of its expert's rows
    num_blocks: Int[Array, ""]  # spill blocks in use (the loop's trip count)

    @property
    def spill_block(self) -> int:
        return self.order_P.shape[0] - self.pos_TK.size


def sort_assignments(idx_TK: Int[Array, "T K"], num_experts: int, sizes: SlotSizes) -> Dispatch:
    """Sorts the assignments by expert and derives the slot and spill-block tables."""
    T, K = idx_TK.shape
    A, C, b = T * K, sizes.capacity, sizes.spill_block
    e_A = idx_TK.reshape(A).astype(jnp.int32)
    order_A = jnp.argsort(e_A, stable=True).astype(jnp.int32)
    pos_A = jnp.zeros(A, jnp.int32).at[order_A].set(jnp.arange(A, dtype=jnp.int32))
    counts_E = jnp.bincount(e_A, length=num_experts).astype(jnp.int32)
    starts_E = jnp.cumsum(counts_E) - counts_E
    rank_A = pos_A - starts_E[jnp.minimum(e_A, num_experts - 1)]
    slotted_A = (rank_A < C) & (e_A < num_experts)  # "no expert" ids sort last, get no slot
    slot_A = jnp.where(slotted_A, e_A * C + rank_A, num_experts * C)
    c_C = jnp.arange(C, dtype=jnp.int32)
    in_EC = c_C[None, :] < counts_E[:, None]
    sorted_EC = jnp.minimum(starts_E[:, None] + c_C[None, :], A - 1)
    src_EC = jnp.where(in_EC, order_A[sorted_EC] // K, T)
    blocks = _spill_blocks(counts_E, starts_E, T, K, C, b)
    order_P = jnp.concatenate([order_A, jnp.zeros(b, jnp.int32)])
    return Dispatch(
        order_P, pos_A.reshape(T, K), counts_E, starts_E, src_EC, slot_A.reshape(T, K), *blocks
    )


def _spill_blocks(counts_E, starts_E, T: int, K: int, C: int, b: int):
    """Blocks of b rows covering each expert's assignments beyond its C slots.

    Fewer than A/b + E blocks whatever the routing (even with repeated experts per token);
    the table is that long, and the loop runs only the ``num_blocks`` in use.
    """
    E, A = counts_E.shape[0], T * K
    n = 0 if C >= A else A // b + E + 1
    nb_E = (jnp.maximum(counts_E - C, 0) + b - 1) // b
    end_E = jnp.cumsum(nb_E)
    j_N = jnp.arange(n, dtype=jnp.int32)
    e_N = jnp.minimum(jnp.searchsorted(end_E, j_N, side="right"), E - 1).astype(jnp.int32)
    start_N = starts_E[e_N] + C + (j_N - (end_E - nb_E)[e_N]) * b
    stop_N = starts_E[e_N] + counts_E[e_N]
    used = end_E[-1] if n else jnp.zeros((), jnp.int32)
    return e_N, start_N.astype(jnp.int32), stop_N.astype(jnp.int32), used.astype(jnp.int32)


def permute(
    x_TD: Float[Array, "T D"],
    idx_TK: Int[Array, "T K"],
    num_experts: int,
    sizes: SlotSizes | None = None,
) -> tuple[Float[Array, "E C D"], Dispatch]:
    """Gathers each token into the dense slots of its experts (empty slots are zero).

    Returns:
      x_ECD: [E, C, D] rows of expert e in its slots, in token order.
      handle: the ``Dispatch`` that ``unpermute`` and the spill loop reuse.
    """
    T, K = idx_TK.shape
    sizes = sizes or SlotSizes.for_shapes(T, K, num_experts)
    d = sort_assignments(idx_TK, num_experts, sizes)
    return gather_slots(x_TD, d), d


def gather_slots(x_TD: Float[Array, "T D"], d: Dispatch) -> Float[Array, "E C D"]:
    return jnp.take(x_TD, d.src_EC, axis=0, mode="fill", fill_value=0)


def unpermute(
    y_ECD: Float[Array, "E C D"], weight_TK: Float[Array, "T K"], d: Dispatch
) -> Float[Array, "T D"]:
    """Sum over each token's slotted assignments of gate weight x expert output (float32).

    Spilled assignments contribute nothing here; the spill loop adds them.
    """
    E, C, D = y_ECD.shape
    return weighted_rows(y_ECD.reshape(E * C, D), d.slot_TK, weight_TK)


def weighted_rows(
    y_RD: Float[Array, "R D"], row_TK: Int[Array, "T K"], weight_TK: Float[Array, "T K"]
) -> Float[Array, "T D"]:
    """sum_k weight[t, k] * y[row[t, k]] (0 for an out-of-range row), in float32.

    One [T, D] gather per k, each fused with its multiply-add: on XLA:CPU about 10x
    faster than gathering [T, K, D] at once and reducing it.
    """
    y_TD = jnp.zeros((row_TK.shape[0], y_RD.shape[1]), jnp.float32)
    for k in range(row_TK.shape[1]):
        rows = jnp.take(y_RD, row_TK[:, k], axis=0, mode="fill", fill_value=0)
        y_TD = y_TD + weight_TK[:, k, None].astype(jnp.float32) * rows.astype(jnp.float32)
    return y_TD


def permute_sorted(x_TD: Float[Array, "T D"], d: Dispatch) -> Float[Array, "A D"]:
    """Rows sorted by expert (group sizes ``d.counts_E``): the grouped-GEMM layout."""
    A = d.pos_TK.size
    return x_TD[d.order_P[:A] // d.pos_TK.shape[1]]


def unpermute_sorted(
    y_AD: Float[Array, "A D"], weight_TK: Float[Array, "T K"], d: Dispatch
) -> Float[Array, "T D"]:
    """Inverse of ``permute_sorted``, weighted by the gates and summed per token (float32)."""
    A = d.pos_TK.size
    return _unpermute_sorted(y_AD, weight_TK, d.order_P[:A], d.pos_TK)


@jax.custom_vjp
def _unpermute_sorted(y_AD, weight_TK, order_A, pos_TK):
    return weighted_rows(y_AD, pos_TK, weight_TK)


def _unpermute_sorted_fwd(y_AD, weight_TK, order_A, pos_TK):
    return weighted_rows(y_AD, pos_TK, weight_TK), (y_AD, weight_TK, order_A, pos_TK)


def _unpermute_sorted_bwd(res, dy_TD):
    """Row a of y came from exactly one assignment (order[a] = t K + k), so its cotangent
    is a gather, weight[t, k] dy[t], not the scatter-add autodiff writes (slow on CPU)."""
    y_AD, weight_TK, order_A, pos_TK = res
    K = pos_TK.shape[1]
    dy_TD = dy_TD.astype(jnp.float32)
    w_A = weight_TK.reshape(-1).astype(jnp.float32)[order_A]
    dy_AD = (w_A[:, None] * dy_TD[order_A // K]).astype(y_AD.dtype)
    dweight_TK = jnp.stack(
        [jnp.sum(dy_TD * y_AD[pos_TK[:, k]].astype(jnp.float32), axis=-1) for k in range(K)],
        axis=-1,
    ).astype(weight_TK.dtype)
    return dy_AD, dweight_TK, None, None


_unpermute_sorted.defvjp(_unpermute_sorted_fwd, _unpermute_sorted_bwd)


# ------------------------------------------------------------------------ send buffers


def send_slots(to_XP: Array, C: int):
    """Rows of the [P, C] send buffer: item x's copy for peer p is the r-th such copy in
    item order, kept if r < C.

    Returns: row_XP (p C + r, or P C when not sent), src_PC (the item in each row, X when
    empty), ok_XP (sent).
    """
    X, P = to_XP.shape
    rank_XP = jnp.cumsum(to_XP, axis=0, dtype=jnp.int32) - 1
    ok_XP = to_XP & (rank_XP < C)
    row_XP = jnp.where(ok_XP, jnp.arange(P, dtype=jnp.int32)[None, :] * C + rank_XP, P * C)
    item_XP = jnp.broadcast_to(jnp.arange(X, dtype=jnp.int32)[:, None], (X, P))
    src = (
        jnp.full((P * C,), X, jnp.int32)
        .at[row_XP.reshape(-1)]
        .set(item_XP.reshape(-1), mode="drop")
    )
    return row_XP, src.reshape(P, C), ok_XP


def blank_others(idx_XK, weight_XK, src_PC, span: int):
    """Ids and weights of each send row's item, kept (as ids mod ``span``) only for the
    experts that live on the row's peer p (id // span == p); others get id ``span`` and
    weight 0."""
    P = src_PC.shape[0]
    idx_PCK = jnp.take(idx_XK, src_PC, axis=0, mode="fill", fill_value=P * span)
    w_PCK = jnp.take(weight_XK, src_PC, axis=0, mode="fill", fill_value=0)
    here_PCK = idx_PCK // span == jnp.arange(P)[:, None, None]
    return jnp.where(here_PCK, idx_PCK % span, span), jnp.where(here_PCK, w_PCK, 0)
