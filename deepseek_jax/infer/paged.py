"""The paged latent cache and the model's forward pass through it.

Each cached token holds ``kv_lora_rank + qk_rope_head_dim`` values per layer (V2 2.1.2),
so a page of P tokens is ``P x (C + R)`` values per layer. One pool of N pages serves every
request: page ``n`` holds the same P positions in every layer's array (and in the MTP
layer's), so one page table per request, ``table_BM`` (M page slots), addresses all of
them. Page 0 is never handed out: page-table padding points there, so writes of padded
rows and padded tokens land in it and reads from it are masked.

A request's token at position ``pos`` lives in page ``table[b, pos // P]``, slot
``pos % P``. ``lens_B`` is how many tokens each row already holds; the T new tokens of a
call go to positions ``lens_B + t``. Rolling back (a rejected speculative token) is just a
smaller ``lens``: the stale entry is overwritten before any query can see it, since a
query at position p sees only slots <= p and position p is written by the call that
queries it.

``PagedDecoder`` is ``UnrolledDecoder``'s layer loop with ``mla_paged`` for attention
(the same einsums, so over the same keys it gives the same logits as the dense cache),
plus the first MTP module for drafting.

Shape letters: B requests, T new positions, S cached positions, D hidden, H heads, C
kv_lora_rank, R rope dim, N nope head dim (``wuk_CHN``) or pages (``ckv_NPC``), P positions
per page, M page slots per request, O v head dim, V vocab.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

import deepseek_jax.backends as backends
import deepseek_jax.sharding as sharding
from deepseek_jax.attention_core import latent_attention
from deepseek_jax.config import ModelConfig
from deepseek_jax.infer.generate import UnrolledDecoder
from deepseek_jax.layers import matmul
from deepseek_jax.layers.rope import rope_cos_sin, softmax_scale
from deepseek_jax.mla import _cast, _out_proj, mla_latent_kv, mla_queries
from deepseek_jax.model import Transformer
from pallas_kernels.mla_decode import mla_decode

TRASH_PAGE = 0


class PageAllocator:
    """Host-side free list of the pool's pages and each request's page list.

    ``reserve`` books pages for a request's worst case (prompt + max new tokens) without
    taking them, so a running request never finds the pool empty; ``grow`` takes pages from
    the free list only as its tokens arrive, and ``free`` returns them and the booking.
    """

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2 or page_size < 1:
            raise ValueError(
                f"num_pages must be >= 2 and page_size >= 1, got {num_pages}, {page_size}"
            )
        self.num_pages, self.page_size = num_pages, page_size
        self._free = list(range(num_pages - 1, TRASH_PAGE, -1))  # pop() gives low ids first
        self._pages: dict[object, list[int]] = {}
        self._booked: dict[object, int] = {}

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    @property
    def capacity(self) -> int:
        """Pages a request can ever use (all but the trash page)."""
        return self.num_pages - 1

    @property
    def in_use(self) -> int:
        return sum(len(p) for p in self._pages.values())

    @property
    def unbooked(self) -> int:
        """Pages neither in use nor promised to a running request."""
        promised = sum(b - len(self._pages[r]) for r, b in self._booked.items())
        return len(self._free) - promised

    def reserve(self, rid, tokens: int) -> bool:
        """Books enough pages for ``tokens``; False (nothing booked) when they are not there."""
        need = self.pages_for(tokens)
        if rid in self._booked:
            raise ValueError(f"request {rid!r} already holds a reservation")
        if need > self.unbooked:
            return False
        self._booked[rid], self._pages[rid] = need, []
        return True

    def grow(self, rid, tokens: int) -> list[int]:
        """Ensures ``rid`` has pages for ``tokens`` tokens; returns its page list."""
        pages, need = self._pages[rid], self.pages_for(tokens)
        if need > self._booked[rid]:
            raise ValueError(f"request {rid!r}: {tokens} tokens exceed its reservation")
        while len(pages) < need:
            pages.append(self._free.pop())
        return pages

    def free(self, rid) -> None:
        self._free.extend(reversed(self._pages.pop(rid, [])))
        self._booked.pop(rid, None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedLayer:
    """One layer's share of the page pool: [N pages, P slots, C] latents, [N, P, R] keys."""

    ckv_NPC: Float[Array, "N P C"]
    krope_NPR: Float[Array, "N P R"]

    @classmethod
    def init(cls, num_pages: int, page_size: int, cfg: ModelConfig, dtype) -> PagedLayer:
        return cls(
            jnp.zeros((num_pages, page_size, cfg.kv_lora_rank), dtype),
            jnp.zeros((num_pages, page_size, cfg.qk_rope_head_dim), dtype),
        )

    @property
    def page_size(self) -> int:
        return self.ckv_NPC.shape[1]

    def write(
        self,
        ckv_BTC: Float[Array, "B T C"],
        krope_BTR: Float[Array, "B T R"],
        table_BM: Int[Array, "B M"],
        lens_B: Int[Array, " B"],
    ) -> PagedLayer:
        """Stores row b's T new entries at positions ``lens_B[b] + t`` through its table."""
        page_BT, slot_BT = page_slots(table_BM, lens_B, ckv_BTC.shape[1], self.page_size)

        def put(buf, new):  # the pool is replicated on a mesh; the rows may be batch-sharded
            new = sharding.constrain(new.astype(buf.dtype), (None, None, None))
            return buf.at[page_BT, slot_BT].set(new)

        return PagedLayer(put(self.ckv_NPC, ckv_BTC), put(self.krope_NPR, krope_BTR))

    def gather(self, table_BM: Int[Array, "B M"]) -> tuple[Array, Array]:
        """Row b's pages in order: ([B, M P, C], [B, M P, R])."""
        B, M = table_BM.shape
        ckv = self.ckv_NPC[table_BM].reshape(B, M * self.page_size, -1)
        krope = self.krope_NPR[table_BM].reshape(B, M * self.page_size, -1)
        return (
            sharding.constrain(ckv, ("batch", "seq", "kv_lora")),
            sharding.constrain(krope, ("batch", "seq", "head_dim")),
        )


def take_at(a_BT: Array, keep_B: Int[Array, " B"]) -> Array:
    """Row b's entry ``keep_B[b]`` along axis 1, kept as a length-1 axis."""
    idx = keep_B.reshape((-1,) + (1,) * (a_BT.ndim - 1))
    return jnp.take_along_axis(a_BT, idx, axis=1)


def page_slots(table_BM, lens_B, T: int, page_size: int):
    """(page, slot) of positions ``lens_B + t``; past the table's width: the trash page."""
    pos_BT = lens_B[:, None] + jnp.arange(T)[None, :]
    idx_BT = pos_BT // page_size
    M = table_BM.shape[1]
    page_BT = jnp.take_along_axis(table_BM, jnp.minimum(idx_BT, M - 1), axis=1)
    return jnp.where(idx_BT < M, page_BT, TRASH_PAGE), pos_BT % page_size


def mla_paged(
    w,
    x_BTD: Float[Array, "B T D"],
    cache: PagedLayer,
    table_BM: Int[Array, "B M"],
    lens_B: Int[Array, " B"],
    cfg: ModelConfig,
    attention: str = "xla",
    keep_B: Int[Array, " B"] | None = None,
) -> tuple[Float[Array, "B T D"], PagedLayer]:
    """``mla_absorbed`` through a page table: row b's token t sits at ``lens_B[b] + t`` and
    sees that row's positions up to its own. ``attention="pallas"``: one-token queries run
    the Pallas decode kernel (``pallas_kernels/mla_decode.py``; interpret mode off GPU),
    outside a multi-device mesh. ``keep_B``: all T positions enter the cache, but only
    position ``keep_B[b]`` queries (y is [B, 1, D]): what a draft needs at one position.
    Returns (y_BTD, the cache with T new entries)."""
    dt = jnp.dtype(cfg.run.dtype)
    x_BTD = x_BTD.astype(dt)
    positions_BT = lens_B[:, None] + jnp.arange(x_BTD.shape[1])[None, :]
    cos_BTR, sin_BTR = rope_cos_sin(positions_BT, cfg)
    wuk_CHN, wuv_CHO = jnp.split(_cast(w, "kv_b_proj", dt), [cfg.qk_nope_head_dim], axis=-1)
    with jax.named_scope("mla_cache_write"):
        cache = cache.write(*mla_latent_kv(w, x_BTD, cos_BTR, sin_BTR, cfg), table_BM, lens_B)
        # The pool is written in place; without the barrier XLA:CPU fuses a one-row write
        # (a dynamic-update-slice) into the gather below, which then reads the old pool,
        # so it copies the whole pool first: per layer and step, O(pool), not O(tokens).
        cache = jax.lax.optimization_barrier(cache)
    if keep_B is not None:
        x_BTD, positions_BT, cos_BTR, sin_BTR = (
            take_at(a, keep_B) for a in (x_BTD, positions_BT, cos_BTR, sin_BTR)
        )
    with jax.named_scope("mla_q"):
        qnope_BTHN, qrope_BTHR = mla_queries(w, x_BTD, cos_BTR, sin_BTR, cfg)
        qlat_BTHC = jnp.einsum("bthn,chn->bthc", qnope_BTHN, wuk_CHN)  # absorb W_uk
    mesh = jax.sharding.get_abstract_mesh()
    one_device = mesh.empty or mesh.size == 1  # the kernel is not partitioned over a mesh
    if attention == "pallas" and x_BTD.shape[1] == 1 and one_device:
        with jax.named_scope("mla_decode_kernel"):
            scale = softmax_scale(cfg)
            olat_BHC = mla_decode(
                qlat_BTHC[:, 0] * scale, qrope_BTHR[:, 0] * scale, cache.ckv_NPC,
                cache.krope_NPR, table_BM, positions_BT[:, 0] + 1,
                interpret=backends.pallas_interpret(None),
            )  # fmt: skip
            olat_BTHC = olat_BHC[:, None].astype(dt)
    else:
        with jax.named_scope("mla_attend_latent"):
            ckv_BSC, krope_BSR = (a.astype(dt) for a in cache.gather(table_BM))
            # the same einsums as ``mla_absorbed``: query (b, t) sees keys s <= positions[b, t]
            visible_BTS = jnp.arange(ckv_BSC.shape[1])[None, None, :] <= positions_BT[:, :, None]
            olat_BTHC = latent_attention(
                qlat_BTHC, qrope_BTHR, ckv_BSC, krope_BSR, visible_BTS, softmax_scale(cfg)
            )
    with jax.named_scope("mla_out"):
        out_BTHO = jnp.einsum("bthc,cho->btho", olat_BTHC, wuv_CHO)  # absorb W_uv
        return _out_proj(w, out_BTHO, cfg), cache


def _block(block, x_BTD, cache: PagedLayer, table_BM, lens_B, cfg, attention, keep_B=None):
    """``Block.decode`` with paged attention (forward only: ``programs.py`` builds the
    programs that trace it with ``backends.forward_only``). ``keep_B``: every position's
    cache entry, the output at ``keep_B`` only ([B, 1, D])."""
    x_in = block.input_layernorm(x_BTD)
    w = block.self_attn.weights()
    a_BTD, cache = mla_paged(w, x_in, cache, table_BM, lens_B, cfg, attention, keep_B)
    x_BTD = (x_BTD if keep_B is None else take_at(x_BTD, keep_B)) + a_BTD
    h_BTD = block.post_attention_layernorm(x_BTD)
    h_BTD = block.mlp(h_BTD)[0] if block.is_moe else block.mlp(h_BTD)
    return x_BTD + h_BTD.astype(x_BTD.dtype), cache


class PagedDecoder(nnx.Module):
    """The model's layers unrolled over per-layer weights, attending through page tables.

    Caches: one ``PagedLayer`` per main layer, then one for the MTP module (when the model
    has one).
    """

    def __init__(self, model: Transformer, attention: str = "auto"):
        """attention: ``auto`` (the Pallas kernel on GPU, else XLA einsums), ``xla``,
        ``pallas`` (interpret mode off GPU: slow, for tests)."""
        if attention not in ("auto", "xla", "pallas"):
            raise ValueError(f"attention: unknown {attention!r}; choose auto, xla or pallas")
        if attention == "auto":
            attention = backends.pallas_kernel("paged_attention", "auto")
        self.attention = attention
        dec = UnrolledDecoder(model)
        self.cfg, self.dtype = dec.cfg, dec.dtype
        self.embed_tokens, self.norm, self.lm_head = dec.embed_tokens, dec.norm, dec.lm_head
        self.layers = dec.layers
        self.mtp = model.mtp[0] if len(model.mtp) else None

    @property
    def num_cache_layers(self) -> int:
        return len(self.layers) + (self.mtp is not None)

    def init_cache(self, num_pages: int, page_size: int) -> list[PagedLayer]:
        return [
            PagedLayer.init(num_pages, page_size, self.cfg, self.dtype)
            for _ in range(self.num_cache_layers)
        ]

    def head(self, h_BTD: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        w_DV = self.lm_head[...].astype(self.dtype)
        return jnp.einsum("btd,dv->btv", h_BTD, w_DV, preferred_element_type=jnp.float32)

    def forward(
        self,
        ids_BT: Int[Array, "B T"],
        caches: list[PagedLayer],
        table_BM: Int[Array, "B M"],
        lens_B: Int[Array, " B"],
        head_at_B: Int[Array, " B"] | None = None,
    ) -> tuple[Float[Array, "B T V"], Float[Array, "B T D"], list[PagedLayer]]:
        """The main model on T new tokens per row: (logits, final-normed hidden, caches).
        ``head_at_B``: the logits at that position only ([B, 1, V]; a prefill chunk samples
        one token)."""
        x_BTD = self.embed_tokens(ids_BT)
        new = []
        for layer, c in zip(self.layers, caches, strict=False):
            x_BTD, c = _block(layer, x_BTD, c, table_BM, lens_B, self.cfg, self.attention)
            new.append(c)
        h_BTD = self.norm(x_BTD).astype(self.dtype)
        logits_BTV = self.head(h_BTD if head_at_B is None else take_at(h_BTD, head_at_B))
        return logits_BTV, h_BTD, new + list(caches[len(self.layers) :])

    def draft(
        self,
        h_BTD: Float[Array, "B T D"],
        next_ids_BT: Int[Array, "B T"],
        caches: list[PagedLayer],
        table_BM: Int[Array, "B M"],
        lens_B: Int[Array, " B"],
        keep_B: Int[Array, " B"] | None = None,
    ) -> tuple[Float[Array, "B T V"], list[PagedLayer]]:
        """MTP depth 1 (``mtp.MTPModule``) at the same positions as ``h_BTD``: its logits
        predict the token after ``next_ids_BT``. Writes the MTP layer's cache entries.
        ``keep_B``: all T positions' cache entries, but the attention, MoE and vocab head
        run only at position ``keep_B[b]`` (logits [B, 1, V]): the one draft kept."""
        m = self.mtp
        cat = jnp.concatenate([m.enorm(self.embed_tokens(next_ids_BT)), m.hnorm(h_BTD)], -1)
        x_BTD = matmul(cat.astype(self.dtype), m.eh_proj[...].astype(self.dtype))
        x_BTD, c = _block(
            m.block, x_BTD, caches[-1], table_BM, lens_B, self.cfg, self.attention, keep_B
        )
        return self.head(m.norm(x_BTD).astype(self.dtype)), [*caches[:-1], c]
