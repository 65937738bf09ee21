"""The serving engine's page pool, recorded step by step as requests come and go.

Continuous batching (``engine.py``) admits a request when the pool can book its worst case
(prompt + max_tokens + 1 tokens), takes pages from the free list only as its tokens reach
the cache (one prefill chunk, then one decode token, per step), and returns them when the
request retires. ``trace_pages`` drives an ``Engine`` through a schedule of arrivals and
snapshots the pool after every step: which request holds each page, how many pages are
booked but not yet taken, how many requests wait. It only reads the engine.

Shape letters: S engine steps, N pages, R requests (not key positions, nope dim, rope dim).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from deepseek_jax.infer.engine import Engine, Request
from deepseek_jax.infer.paged import TRASH_PAGE, PageAllocator
from deepseek_jax.infer.sampling import SamplingParams

FREE, TRASH = -1, -2  # owner ids of a free page and of the trash page


@dataclasses.dataclass(frozen=True)
class Arrival:
    """A request submitted just before engine step ``step`` (greedy, no stop tokens, so it
    generates exactly ``max_tokens``)."""

    step: int
    prompt: tuple[int, ...]
    max_tokens: int


@dataclasses.dataclass(frozen=True)
class PageTrace:
    """The pool after each step S (``owner_SN[s, n]``: the index in ``requests`` of the
    request holding page n, FREE or TRASH), each request's tokens in the cache, the pages
    booked but not yet taken, and the requests waiting for admission."""

    owner_SN: np.ndarray
    tokens_SR: np.ndarray
    booked_S: np.ndarray
    waiting_S: np.ndarray
    requests: list[Request]  # in arrival order: the engine's own, finished

    @property
    def in_use_S(self) -> np.ndarray:
        return (self.owner_SN >= 0).sum(axis=1)

    @property
    def free_S(self) -> np.ndarray:
        return (self.owner_SN == FREE).sum(axis=1)

    def pages_SR(self) -> np.ndarray:
        """[steps, requests] pages each request holds after each step."""
        R = len(self.requests)
        return np.stack([np.bincount(o[o >= 0], minlength=R) for o in self.owner_SN])


def pool_owners(alloc: PageAllocator, labels: dict[int, int]) -> np.ndarray:
    """[N] the label (``labels``: request id -> a label >= 0) of the request holding each
    page, FREE or TRASH; ``labels`` names every request that holds pages.

    Raises RuntimeError when two requests hold one page or the counts disagree with the
    allocator's (a bookkeeping bug)."""
    owner_N = np.full(alloc.num_pages, FREE, np.int64)
    owner_N[TRASH_PAGE] = TRASH
    for rid, label in labels.items():
        for page in alloc.grow(rid, 0):  # grows nothing: its page list as it stands
            if owner_N[page] != FREE:
                raise RuntimeError(f"page {page} held twice (label {label}, {owner_N[page]})")
            owner_N[page] = label
    if (owner_N >= 0).sum() != alloc.in_use:
        raise RuntimeError(
            f"{(owner_N >= 0).sum()} pages held by the active requests, "
            f"the allocator counts {alloc.in_use}"
        )
    return owner_N


def trace_pages(engine: Engine, arrivals: list[Arrival], max_steps: int = 10_000) -> PageTrace:
    """Runs ``engine`` (idle, its pool empty) until every arrival has finished, submitting
    each at its step, and records the pool after every step.

    Raises ValueError on an engine that already has work, or one that has not finished after
    ``max_steps`` steps (a request that can never be admitted)."""
    if engine.has_work() or engine.alloc.in_use:
        raise ValueError("trace_pages: the engine must be idle with an empty page pool")
    pending = sorted(arrivals, key=lambda a: a.step)
    requests: list[Request] = []
    index: dict[int, int] = {}  # engine rid -> position in requests
    owners, tokens, booked, waiting = [], [], [], []
    step = 0
    while pending or engine.has_work():
        if step >= max_steps:
            raise ValueError(f"trace_pages: not done after max_steps={max_steps} steps")
        while pending and pending[0].step <= step:
            a = pending.pop(0)
            req = engine.submit(list(a.prompt), SamplingParams(max_tokens=a.max_tokens))
            index[req.rid] = len(requests)
            requests.append(req)
        engine.step()
        active = (*engine.prefilling, *engine.running)
        alloc = engine.alloc
        owners.append(pool_owners(alloc, {r.rid: index[r.rid] for r in active}))
        tokens.append([r.lens if r in active else 0 for r in requests])
        booked.append(alloc.capacity - alloc.in_use - alloc.unbooked)
        waiting.append(engine.queue_depth)
        step += 1
    R = len(requests)  # earlier rows padded: requests not yet submitted hold nothing
    tokens_SR = np.asarray([t + [0] * (R - len(t)) for t in tokens], np.int64)
    return PageTrace(np.stack(owners), tokens_SR, np.asarray(booked), np.asarray(waiting), requests)
