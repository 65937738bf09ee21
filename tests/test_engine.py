"""Continuous batching engine: equals dense generation, speculative greedy == plain,
nothing recompiles in steady state, per-request sampling, stops, cancels, a full cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.infer.engine import Engine
from deepseek_jax.infer.generate import Generator
from deepseek_jax.infer.sampling import (
    RowSampling,
    SamplingParams,
    argmax,
    distribution,
    sample,
    verify,
)
from deepseek_jax.model import Transformer
from deepseek_jax.presets import get_preset

CFG = get_preset("tiny")
# One bucket each: every engine compiles one prefill and one decode program.
SHAPES = dict(page_size=8, num_pages=17, max_batch=4, prefill_chunk=8)
BUCKETS = dict(batch_buckets=(4,), page_buckets=(4,))


@pytest.fixture(scope="module")
def model():
    """tiny, with the output head on 3 tokens only (the others' columns zero and these
    scaled up): random weights then give an MTP draft that is right often enough to
    exercise both accepted and rejected drafts (6 of 34 here)."""
    m = Transformer(CFG, rngs=nnx.Rngs(3))
    keep = jnp.zeros((CFG.vocab_size,), bool).at[jnp.asarray([3, 17, 40])].set(True)
    m.lm_head[...] = jnp.where(keep[None, :], 8.0 * m.lm_head[...], 0.0)
    return m


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return rng.integers(0, CFG.vocab_size, (3, 11)).astype(np.int32)


@pytest.fixture(scope="module")
def reference(model, prompts):
    return Generator(model)(prompts, 14).tokens


@pytest.fixture(scope="module")
def plain(model):
    return Engine(model, **SHAPES, **BUCKETS)


@pytest.fixture(scope="module")
def spec(model):
    return Engine(model, **SHAPES, **BUCKETS, speculative=True)


def _staggered(engine, prompts, max_tokens=(14, 9, 14)):
    """Request 0 alone for two steps, then 1 and 2 join; 1 leaves early."""
    reqs = [engine.submit(prompts[0].tolist(), SamplingParams(max_tokens=max_tokens[0]))]
    engine.step()
    engine.step()
    for p, n in zip(prompts[1:], max_tokens[1:], strict=True):
        reqs.append(engine.submit(p.tolist(), SamplingParams(max_tokens=n)))
    engine.run_until_done()
    return reqs


def test_engine_equals_dense_generation_and_compiles_once(plain, prompts, reference):
    reqs = _staggered(plain, prompts)
    for r, ref, n in zip(reqs, reference, (14, 9, 14), strict=True):
        assert r.output == ref[:n].tolist() and r.finish_reason == "length"
    assert plain.alloc.in_use == 0 and plain.alloc.unbooked == plain.alloc.capacity
    compiled = dict(plain.compilations)
    assert compiled == {"prefill": 1, "decode": 1}
    _staggered(plain, prompts[::-1], (5, 14, 3))  # other joins and leaves: same programs
    assert dict(plain.compilations) == compiled


def test_speculative_greedy_identical_to_plain(spec, prompts, reference):
    reqs = _staggered(spec, prompts)
    for r, ref, n in zip(reqs, reference, (14, 9, 14), strict=True):
        assert r.output == ref[:n].tolist()
    drafted, accepted = spec.stats["drafted"], spec.stats["accepted"]
    assert 0 < accepted < drafted  # both the two-token and the roll-back path ran
    assert spec.stats["decode_steps"] < sum(len(r.output) for r in reqs) - len(reqs)
    # every token but each request's first (the prefill's) came from a timed decode step
    assert spec.stats["decode_tokens"] == sum(len(r.output) for r in reqs) - len(reqs)
    assert spec.stats["decode_seconds"] > 0
    assert spec.alloc.in_use == 0


def test_prefill_rows_carry_several_requests_chunks(spec, prompts, reference):
    """One prefill program carries request 0's final chunk beside 1 and 2's first ones
    (different lengths and offsets), with MTP drafts: the same greedy tokens. (The spec
    engine of the test above, its prefill widened to one bucket of 4 rows: only that
    program compiles.)"""
    eng = spec
    eng.prefill_rows, eng.prefill_row_buckets = 4, (4,)
    compiled = eng.compilations["prefill"]
    reqs = [eng.submit(prompts[0].tolist(), SamplingParams(max_tokens=14))]
    eng.step()
    reqs += [eng.submit(p.tolist(), SamplingParams(max_tokens=14)) for p in prompts[1:]]
    eng.step()
    assert eng.running == reqs[:1] and [r.prefilled for r in reqs] == [11, 8, 8]
    eng.run_until_done()
    for r, ref in zip(reqs, reference, strict=True):
        assert r.output == ref.tolist()
    assert eng.alloc.in_use == 0 and eng.compilations["prefill"] == compiled + 1


def test_per_request_sampling_independent_of_batch(plain, prompts):
    hot = SamplingParams(max_tokens=8, temperature=1.0, top_k=4, top_p=0.9, seed=7)
    alone = plain.submit(prompts[0].tolist(), hot)
    plain.run_until_done()
    batch = [
        plain.submit(prompts[1].tolist(), SamplingParams(max_tokens=8, temperature=2.0, seed=1)),
        plain.submit(prompts[0].tolist(), hot),
        plain.submit(prompts[0].tolist(), SamplingParams(**{**hot.__dict__, "seed": 8})),
    ]
    plain.run_until_done()
    assert batch[1].output == alone.output  # same seed, other neighbours
    assert batch[2].output != alone.output  # another seed


def test_stop_tokens_cancel_and_full_cache(plain, prompts, reference):
    stop_at = int(reference[0][4])
    r = plain.submit(prompts[0].tolist(), SamplingParams(max_tokens=14, stop_token_ids=(stop_at,)))
    plain.run_until_done()
    assert r.finish_reason == "stop" and stop_at not in r.output
    assert r.output == reference[0][: reference[0].tolist().index(stop_at)].tolist()

    # 16 usable pages of 8 tokens; each request books ceil((11 + 14 + 1) / 8) = 4.
    seen = []
    reqs = [
        plain.submit(p.tolist(), SamplingParams(max_tokens=14), lambda q, t, f: seen.append(f))
        for p in np.concatenate([prompts, prompts])
    ]
    plain.step()
    assert plain.active == 4 and len(plain.waiting) == 2  # the pool is booked out: they queue
    plain.step()
    plain.cancel(reqs[0])
    plain.step()
    assert reqs[0].finish_reason == "abort" and len(plain.waiting) == 1  # its pages went on
    plain.run_until_done()
    assert all(r.done for r in reqs) and plain.alloc.in_use == 0 and seen.count("abort") == 1
    for r, ref in zip(reqs[1:], [*reference[1:], *reference], strict=True):
        assert r.output == ref.tolist()


def test_bad_requests_are_named(plain):
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="prompt"):
        plain.submit([], SamplingParams())
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\)"):
        plain.submit([1, 256], SamplingParams())
    with pytest.raises(ValueError, match="context"):
        plain.submit([1] * 10, SamplingParams(max_tokens=CFG.max_position_embeddings))
    with pytest.raises(ValueError, match="cache pages"):
        plain.submit([1] * 10, SamplingParams(max_tokens=40))


def test_speculative_sampling_keeps_the_target_distribution():
    """Drafts drawn from q, kept by the acceptance rule, corrected from max(0, p - q): the
    emitted token is distributed as p."""
    p = jnp.asarray([0.5, 0.3, 0.15, 0.05])
    q = jnp.asarray([0.1, 0.2, 0.3, 0.4])
    n = 20_000
    s = RowSampling(
        jnp.ones((n,)), jnp.zeros((n,), jnp.int32), jnp.ones((n,)), jnp.arange(n, dtype=jnp.int32)
    )
    draft = jax.random.categorical(jax.random.key(0), jnp.log(q), shape=(n,)).astype(jnp.int32)
    pos = jnp.zeros((n,), jnp.int32)
    accepted, tok = jax.jit(verify)(
        draft, jnp.broadcast_to(q, (n, 4)), jnp.broadcast_to(p, (n, 4)), s, pos
    )
    freq = np.bincount(np.asarray(tok), minlength=4) / n
    np.testing.assert_allclose(freq, p, atol=0.012)
    expected_accept = float(jnp.minimum(p, q).sum())  # P(accept) = sum min(p, q)
    assert abs(float(accepted.mean()) - expected_accept) < 0.012
    greedy = RowSampling(
        jnp.zeros((1,)), jnp.zeros((1,), jnp.int32), jnp.ones((1,)), jnp.zeros((1,), jnp.int32)
    )
    logits = jnp.log(p)[None]
    assert np.asarray(distribution(logits, greedy)).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    top2 = RowSampling(
        jnp.ones((1,)), jnp.full((1,), 2), jnp.ones((1,)), jnp.zeros((1,), jnp.int32)
    )
    np.testing.assert_allclose(distribution(logits, top2)[0], [0.625, 0.375, 0, 0], atol=1e-6)
    nucleus = RowSampling(
        jnp.ones((1,)), jnp.zeros((1,), jnp.int32), jnp.full((1,), 0.7), jnp.zeros((1,), jnp.int32)
    )
    np.testing.assert_allclose(distribution(logits, nucleus)[0], [0.625, 0.375, 0, 0], atol=1e-6)


def test_sampling_fast_paths_equal_the_full_path():
    """Greedy-only, uncut and top-k / top-p batches take different branches (the sort and
    the draws run only when needed): each row samples the same alone as in a mixed batch."""
    logits = jax.random.normal(jax.random.key(1), (4, 64)) * 3
    s = RowSampling(
        jnp.asarray([0.0, 0.7, 1.0, 1.3]),
        jnp.asarray([0, 0, 5, 0], jnp.int32),
        jnp.asarray([1.0, 1.0, 1.0, 0.8]),
        jnp.asarray([1, 2, 3, 4], jnp.int32),
    )
    pos = jnp.arange(4, dtype=jnp.int32) + 9
    fn = jax.jit(sample)
    tok, probs = fn(logits, s, pos)
    for i in range(4):
        row = jax.tree.map(lambda a, i=i: a[i : i + 1], s)
        t, p = fn(logits[i : i + 1], row, pos[i : i + 1])
        assert int(t[0]) == int(tok[i])
        np.testing.assert_allclose(p[0], probs[i], rtol=1e-6, atol=1e-7)
    assert int(tok[0]) == int(jnp.argmax(logits[0]))
    assert int((probs[2] > 0).sum()) == 5 and float(probs[1].min()) > 0
    draft = jnp.asarray([int(jnp.argmax(logits[0])), 0], jnp.int32)  # right, then wrong
    greedy = jax.tree.map(lambda a: jnp.stack([a[0], a[0]]), s)
    p2 = jnp.stack([probs[0], probs[0]])
    accepted, y = jax.jit(verify)(draft, jax.nn.one_hot(draft, 64), p2, greedy, pos[:2])
    assert accepted.tolist() == [True, False] and y.tolist() == [int(draft[0])] * 2


def test_vectorised_argmax_equals_jnp_argmax():
    """The first maximum, ties and NaN included (a NaN row: its first NaN, as jnp's)."""
    x = jnp.round(jax.random.normal(jax.random.key(2), (6, 4096)) * 2)  # many ties
    x = x.at[1].set(-jnp.inf).at[2, 7].set(jnp.nan).at[2, 9].set(jnp.nan)
    x = x.at[3].set(0.0).at[3, :5].set(-0.0).at[4, 4095].set(99.0)
    assert (jax.jit(argmax)(x) == jnp.argmax(x, axis=-1)).all()
    assert jax.jit(argmax)(x).tolist()[1:5] == [0, 7, 0, 4095]
