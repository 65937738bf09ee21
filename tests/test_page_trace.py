"""The page pool recorded step by step (infer/page_trace.py): the owners read from a real
allocator, and a real engine driven through staggered arrivals, where pages are taken only
as tokens reach the cache, every page is free or held by one request, and all come back."""

import numpy as np
import pytest
from flax import nnx

from deepseek_jax.infer.engine import Engine
from deepseek_jax.infer.page_trace import FREE, TRASH, Arrival, pool_owners, trace_pages
from deepseek_jax.infer.paged import PageAllocator
from deepseek_jax.infer.sampling import SamplingParams
from deepseek_jax.model import Transformer
from deepseek_jax.presets import get_preset

# One MoE layer, no MTP: the cheapest model the engine serves.
CFG = get_preset(
    "tiny", ["num_hidden_layers=1", "first_k_dense_replace=0", "num_nextn_predict_layers=0"]
)
PAGE = 4


def test_pool_owners_follow_the_allocator():
    alloc = PageAllocator(num_pages=8, page_size=PAGE)
    assert alloc.reserve("a", 10) and alloc.reserve("b", 6)
    alloc.grow("a", 7)  # 2 pages: 1, 2
    alloc.grow("b", 5)  # 2 pages: 3, 4
    owners = pool_owners(alloc, {"a": 0, "b": 1})
    assert owners.tolist() == [TRASH, 0, 0, 1, 1, FREE, FREE, FREE]
    alloc.free("a")
    assert alloc.reserve("c", 8)
    alloc.grow("c", 8)  # the pages "a" returned, lowest id first
    assert pool_owners(alloc, {"b": 1, "c": 2}).tolist() == [TRASH, 2, 2, 1, 1, FREE, FREE, FREE]
    with pytest.raises(RuntimeError, match="2 pages held by the active requests.*counts 4"):
        pool_owners(alloc, {"c": 2})  # "b" holds pages but is not named


@pytest.mark.slow  # ~15 CPU-s; make test runs trace_pages in mla_memory.ipynb (same checks)
def test_trace_of_staggered_requests():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    engine = Engine(
        model, page_size=PAGE, num_pages=13, max_batch=3, prefill_chunk=8,
        batch_buckets=(4,), page_buckets=(8,),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    plan = [(0, 13, 6), (0, 3, 9), (2, 9, 4), (4, 20, 5), (5, 2, 3)]  # step, prompt, new
    arrivals = [
        Arrival(s, tuple(rng.integers(0, CFG.vocab_size, n).tolist()), m) for s, n, m in plan
    ]
    tr = trace_pages(engine, arrivals)
    assert [len(r.output) for r in tr.requests] == [m for _, _, m in plan]
    assert all(r.finish_reason == "length" for r in tr.requests)
    capacity = engine.alloc.capacity
    assert (tr.owner_SN[:, 0] == TRASH).all()
    np.testing.assert_array_equal(tr.in_use_S + tr.free_S, capacity)
    # pages are taken only as tokens reach the cache
    np.testing.assert_array_equal(tr.pages_SR(), -(-tr.tokens_SR // PAGE))
    assert (tr.in_use_S + tr.booked_S <= capacity).all()
    for r, (step, _, _) in enumerate(plan):
        assert not (tr.owner_SN[:step] == r).any()  # nothing before it arrived
    # the pool is full enough that a request waited, and freed pages were handed out again
    assert tr.waiting_S.max() > 0
    held_by = [set(tr.owner_SN[:, n]) - {FREE} for n in range(1, engine.alloc.num_pages)]
    assert max(len(h) for h in held_by) > 1
    assert tr.in_use_S[-1] == 0 and tr.booked_S[-1] == 0 and not engine.has_work()
    assert engine.compilations == {"prefill": 1, "decode": 1}

    engine.submit([1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="must be idle"):
        trace_pages(engine, arrivals)
