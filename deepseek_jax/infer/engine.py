"""Continuous batching over the paged latent cache.

The engine is a host-side scheduler around three compiled programs (``programs.py``).
Each ``step()``:
1. admits waiting requests while the batch has room and the page pool can book their
   worst case (prompt + max_tokens); the rest wait in FIFO order;
2. runs one prefill program over the next chunk (at most ``prefill_chunk`` tokens, so a
   long prompt delays the running batch by one chunk per step) of each of the oldest
   ``prefill_rows`` admitted requests; a request's last chunk samples its first token
   and it joins the running batch;
3. runs one decode step for every running request (plain: one token; speculative: the
   MTP draft is verified, one or two tokens);
4. retires requests that hit a stop token, ``max_tokens`` or a cancel, freeing pages.

Shapes come from buckets (powers of two): batch rows up to ``max_batch``, page-table
slots up to the context's pages, prefill rows up to ``prefill_rows`` and chunk lengths up
to ``prefill_chunk``; padding
rows point at the trash page. ``compilations`` counts traces per program, so a test can
check that steady state compiles nothing. Thread safety: ``submit``/``cancel`` may be
called from other threads; ``step`` runs in one thread.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable
from functools import partial

import jax
import numpy as np

import deepseek_jax.infer.programs as programs
from deepseek_jax.infer.paged import PageAllocator
from deepseek_jax.infer.sampling import RowSampling, SamplingParams
from deepseek_jax.infer.stage import Stage, hand_off
from deepseek_jax.model import Transformer

# on_update(request, new tokens, finish reason or None), called from the engine's thread.
Callback = Callable[["Request", list[int], str | None], None]


@dataclasses.dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    on_update: Callback | None = None
    rid: int = -1
    output: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "abort"
    prefilled: int = 0  # prompt tokens in the cache
    lens: int = 0  # tokens in the cache
    lens_needed: int = 0  # tokens the next program call leaves in the cache
    pending: int = 0  # last sampled token, not yet in the cache
    draft: int = 0  # MTP draft of the token after ``pending``
    q: np.ndarray | None = None  # the draft's distribution
    t_submit: float = 0.0
    token_times: list[float] = dataclasses.field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def buckets(limit: int, start: int = 1) -> tuple[int, ...]:
    """Powers of two from ``start`` up to the first one >= ``limit``."""
    out = [start]
    while out[-1] < limit:
        out.append(out[-1] * 2)
    return tuple(out)


def _page_buckets(limit: int) -> tuple[int, ...]:
    """Page-table widths: powers of two and the midpoints 3 x 2^k (1, 2, 3, 4, 6, 8, 12,
    ...) up to the first >= ``limit``. Decode attention reads every slot of the width, so
    the midpoints cut the padding read per step from up to 2x to up to 1.5x."""
    out = [1]
    while out[-1] < limit:
        b = out[-1]
        out.append(b + b // 2 if b >= 2 and b & (b - 1) == 0 else 1 << b.bit_length())
    return tuple(out)


def _fit(bucket_list: tuple[int, ...], n: int) -> int:
    return next(b for b in bucket_list if b >= n)


class Engine:
    def __init__(
        self,
        model: Transformer,
        *,
        page_size: int = 16,
        num_pages: int = 256,
        max_batch: int = 16,
        prefill_chunk: int = 64,
        speculative: bool = False,
        batch_buckets: tuple[int, ...] | None = None,
        page_buckets: tuple[int, ...] | None = None,
        prefill_mesh: jax.sharding.Mesh | None = None,
        decode_mesh: jax.sharding.Mesh | None = None,
        attention: str = "auto",
        prefill_rows: int = 1,
    ):
        """page_size, num_pages: the pool (page 0 is the trash page). max_batch: running +
        prefilling requests. prefill_chunk: prompt tokens per prefill call.
        batch_buckets / page_buckets: compiled batch rows and page-table widths (default:
        powers of two up to max_batch / the context's pages; the last must cover them).
        prefill_mesh / decode_mesh: run prefill and decode on these meshes (``stage.py``),
        e.g. prefill expert-parallel over all devices and decode over a smaller group;
        a finished prefill's pages are handed from one pool to the other.
        attention: ``PagedDecoder``'s (auto: the Pallas decode kernel on GPU).
        prefill_rows: requests whose chunks one prefill program carries (row buckets:
        powers of two). Many requests arriving together then join the decode batch
        together, after one wide program instead of one program each."""
        if prefill_rows < 1:
            raise ValueError(f"prefill_rows must be >= 1, got {prefill_rows}")
        cfg = model.cfg
        if speculative and not cfg.num_nextn_predict_layers:
            raise ValueError("speculative decoding needs an MTP module (num_nextn_predict_layers)")
        self.cfg, self.speculative = cfg, speculative
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.alloc = PageAllocator(num_pages, page_size)
        self.max_context = cfg.max_position_embeddings
        self.decode = Stage.build(model, decode_mesh, num_pages, page_size, attention)
        self.prefill = self.decode
        if prefill_mesh is not decode_mesh:
            self.prefill = Stage.build(model, prefill_mesh, num_pages, page_size, attention)
        shards = self.decode.batch_shards
        self.batch_buckets = batch_buckets or buckets(max(max_batch, shards), start=shards)
        self.page_buckets = page_buckets or _page_buckets(self.alloc.pages_for(self.max_context))
        if self.batch_buckets[-1] < max_batch:
            raise ValueError(f"batch_buckets {batch_buckets} do not reach max_batch {max_batch}")
        if any(b % shards for b in self.batch_buckets):
            raise ValueError(
                f"batch_buckets {batch_buckets}: the decode mesh needs multiples of {shards}"
            )
        self.chunk_buckets = buckets(prefill_chunk, start=min(8, prefill_chunk))
        self.prefill_rows = prefill_rows
        ps = self.prefill.batch_shards
        self.prefill_row_buckets = buckets(max(prefill_rows, ps), start=ps)
        self.compilations: collections.Counter[str] = collections.Counter()
        donate = dict(donate_argnums=(1,))
        g, pg = self.decode.graphdef, self.prefill.graphdef
        self._prefill = jax.jit(
            self._counted("prefill", partial(programs.prefill_chunk, pg, mtp=speculative)),
            **donate,
        )
        self._decode = jax.jit(self._counted("decode", partial(programs.decode_step, g)), **donate)
        self._spec = jax.jit(self._counted("spec", partial(programs.speculative_step, g)), **donate)
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefilling: list[Request] = []
        self.running: list[Request] = []
        self.stats = collections.Counter()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._inbox: list[Request] = []
        self._cancels: set[int] = set()
        self.wake = threading.Event()
        self._samp_key: tuple[int, ...] = ()
        self._samp: RowSampling | None = None

    def _counted(self, name: str, fn):
        def traced(*args):
            self.compilations[name] += 1  # runs once per trace, i.e. per compiled shape
            return fn(*args)

        return traced

    # ---------------------------------------------------------------- requests

    def validate(self, prompt: list[int], params: SamplingParams) -> None:
        """Raises ValueError naming what is wrong with a request before it is queued."""
        V = self.cfg.vocab_size
        if not prompt:
            raise ValueError("prompt: must hold at least one token")
        if min(prompt) < 0 or max(prompt) >= V:
            raise ValueError(f"prompt: token ids must be in [0, {V})")
        total = len(prompt) + params.max_tokens
        if total > self.max_context:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceed "
                f"the context ({self.max_context} tokens)"
            )
        pages = self.alloc.pages_for(total + 1)
        if pages > min(self.alloc.capacity, self.page_buckets[-1]):
            raise ValueError(
                f"prompt + max_tokens need {pages} cache pages; the cache holds "
                f"{self.alloc.capacity}, a request at most {self.page_buckets[-1]}"
            )

    def submit(
        self, prompt: list[int], params: SamplingParams, on_update: Callback | None = None
    ) -> Request:
        """Queues a request (thread-safe); raises ValueError on a bad one."""
        prompt = [int(t) for t in prompt]
        self.validate(prompt, params)
        req = Request(prompt, params, on_update, rid=next(self._ids), t_submit=time.perf_counter())
        with self._lock:
            self._inbox.append(req)
        self.wake.set()
        return req

    def cancel(self, req: Request) -> None:
        """Ends a request at the next step boundary and frees its pages (thread-safe)."""
        with self._lock:
            self._cancels.add(req.rid)
        self.wake.set()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting) + len(self._inbox)

    @property
    def active(self) -> int:
        return len(self.prefilling) + len(self.running)

    def has_work(self) -> bool:
        return bool(self._inbox or self.waiting or self.prefilling or self.running)

    # ---------------------------------------------------------------- the step

    def step(self) -> bool:
        """One scheduling round; returns False when there was nothing to do."""
        with self._lock:
            self.waiting.extend(self._inbox)
            self._inbox.clear()
            cancels, self._cancels = self._cancels, set()
        for req in [*self.waiting, *self.prefilling, *self.running]:
            if req.rid in cancels:
                self._finish(req, "abort")
        self._admit()
        if not (self.prefilling or self.running):
            return False
        if self.prefilling:
            self._prefill_chunks(self.prefilling[: self.prefill_rows])
        if self.running:
            t0, n0 = time.perf_counter(), self.stats["generated_tokens"]
            self._decode_step()
            # The decode side alone (host work included, prefill chunks not): what a decode
            # deployment of a prefill/decode split serves.
            self.stats["decode_seconds"] += time.perf_counter() - t0
            self.stats["decode_tokens"] += self.stats["generated_tokens"] - n0
        return True

    def run_until_done(self) -> None:
        while self.step():
            pass

    def _admit(self) -> None:
        while self.waiting and self.active < self.max_batch:
            req = self.waiting[0]
            if not self.alloc.reserve(req.rid, len(req.prompt) + req.params.max_tokens + 1):
                break  # the cache is full: wait for pages (FIFO, no overtaking)
            self.prefilling.append(self.waiting.popleft())

    def _table(self, reqs: list[Request], rows: int) -> np.ndarray:
        pages = [self.alloc.grow(r.rid, r.lens_needed) for r in reqs]
        M = _fit(self.page_buckets, max(len(p) for p in pages))
        table = np.zeros((rows, M), np.int32)
        for i, p in enumerate(pages):
            table[i, : len(p)] = p
        return table

    def _sampling(self, reqs: list[Request], rows: int) -> RowSampling:
        """The rows' settings, rebuilt only when the batch's requests change."""
        key = (rows, *(r.rid for r in reqs))
        if self._samp_key == key:
            return self._samp
        pad = [SamplingParams()] * (rows - len(reqs))
        ps = [r.params for r in reqs] + pad
        self._samp_key, self._samp = (
            key,
            RowSampling(  # numpy: no eager dispatches
                np.asarray([p.temperature for p in ps], np.float32),
                np.asarray([p.top_k for p in ps], np.int32),
                np.asarray([p.top_p for p in ps], np.float32),
                np.asarray([p.seed for p in ps], np.int32),
            ),
        )
        return self._samp

    def _prefill_chunks(self, reqs: list[Request]) -> None:
        starts = [r.prefilled for r in reqs]
        ns = [min(self.prefill_chunk, len(r.prompt) - s) for r, s in zip(reqs, starts, strict=True)]
        T = _fit(self.chunk_buckets, max(ns))
        R = _fit(self.prefill_row_buckets, len(reqs))  # padding rows: the trash page
        ids, nxt = np.zeros((R, T), np.int32), np.zeros((R, T), np.int32)
        last, lens = np.zeros(R, np.int32), np.zeros(R, np.int32)
        final = np.zeros(R, np.bool_)
        for i, (req, start, n) in enumerate(zip(reqs, starts, ns, strict=True)):
            ids[i, :n] = req.prompt[start : start + n]
            after = req.prompt[start + 1 : start + n + 1]
            nxt[i, : len(after)] = after
            last[i], lens[i], final[i] = n - 1, start, start + n == len(req.prompt)
            req.lens_needed = start + n
        table = self._table(reqs, R)
        stage = self.prefill
        with stage.on():
            tok, draft, q, stage.caches = self._prefill(
                stage.state, stage.caches, ids, nxt, last, lens, table,
                self._sampling(reqs, R), final,
            )  # fmt: skip
        tok, draft, q = np.asarray(tok), np.asarray(draft), np.asarray(q)
        for i, (req, start, n) in enumerate(zip(reqs, starts, ns, strict=True)):
            req.prefilled = req.lens = start + n
            self.stats["prefill_tokens"] += n
            if not final[i]:
                continue
            self.prefilling.remove(req)
            if self.prefill is not self.decode:
                hand_off(self.prefill, self.decode, table[i])
            req.pending, req.draft = int(tok[i]), int(draft[i])
            req.q = q[i] if self.speculative else None
            self.running.append(req)
            self._emit(req, [req.pending])

    def _decode_step(self) -> None:
        reqs = list(self.running)
        B = _fit(self.batch_buckets, len(reqs))
        width = 2 if self.speculative else 1
        for r in reqs:
            r.lens_needed = r.lens + width
        table = self._table(reqs, B)
        pad = B - len(reqs)
        tok = np.asarray([r.pending for r in reqs] + [0] * pad, np.int32)
        lens = np.asarray([r.lens for r in reqs] + [0] * pad, np.int32)
        samp = self._sampling(reqs, B)
        self.stats["decode_steps"] += 1
        if not self.speculative:
            with self.decode.on():
                nxt, self.decode.caches = self._decode(
                    self.decode.state, self.decode.caches, tok, lens, table, samp
                )
            for r, t in zip(reqs, np.asarray(nxt).tolist(), strict=False):
                r.lens += 1
                r.pending = t
                self._emit(r, [t])
            return
        draft = np.asarray([r.draft for r in reqs] + [0] * pad, np.int32)
        q = np.zeros((B, self.cfg.vocab_size), np.float32)
        q[: len(reqs)] = np.stack([r.q for r in reqs])
        with self.decode.on():
            out = self._spec(
                self.decode.state, self.decode.caches, tok, draft, q, lens, table, samp
            )
        y1, y2, acc, new_draft, new_q, self.decode.caches = out
        y1, y2, acc, new_draft = (np.asarray(a).tolist() for a in (y1, y2, acc, new_draft))
        new_q = np.asarray(new_q)
        for i, r in enumerate(reqs):
            self.stats["drafted"] += 1
            self.stats["accepted"] += int(acc[i])
            emitted = [y1[i], y2[i]] if acc[i] else [y1[i]]
            r.lens += len(emitted)  # a rejected draft's entry at lens + 1 is rolled back
            r.pending, r.draft, r.q = emitted[-1], new_draft[i], new_q[i]
            self._emit(r, emitted)

    def abort_all(self, reason: str = "abort") -> None:
        """Ends every request (e.g. after a failed step) and returns all pages."""
        with self._lock:
            self.waiting.extend(self._inbox)
            self._inbox.clear()
        for req in [*self.waiting, *self.prefilling, *self.running]:
            self._finish(req, reason)

    # ---------------------------------------------------------------- outputs

    def _emit(self, req: Request, tokens: list[int]) -> None:
        new, reason = [], None
        now = time.perf_counter()
        for t in tokens:
            if t in req.params.stop_token_ids:
                reason = "stop"
                break
            new.append(t)
            req.token_times.append(now)
            if len(req.output) + len(new) >= req.params.max_tokens:
                reason = "length"
                break
        req.output.extend(new)
        self.stats["generated_tokens"] += len(new)
        if reason is not None:
            self._finish(req, reason, new)
        elif req.on_update is not None:
            req.on_update(req, new, None)

    def _finish(self, req: Request, reason: str, new: list[int] | None = None) -> None:
        req.finish_reason = reason
        for group in (self.prefilling, self.running):
            if req in group:
                group.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self.alloc.free(req.rid)
        self.stats[f"finished_{reason}"] += 1
        if req.on_update is not None:
            req.on_update(req, new or [], reason)
