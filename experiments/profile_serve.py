"""Where a serving step's time goes: ``python -m experiments.profile_serve --checkpoint DIR``.

In one process, on a request (or ``--batch`` requests) prefilled with a held-out prompt,
it times the engine's compiled programs with ``block_until_ready``: the plain decode step
at batch 1 and ``--batch``, the speculative step at batch 1, and their parts (the main
model over 1 and 2 positions, the MTP module, the vocab head, one MoE layer and one
attention layer), interleaved over ``--repeats`` rounds, medians. A part that writes the
cache donates its own copy of the pool, as the programs do (else each call copies the
pool). Each part is its own small program with its own dispatch cost, so parts need not
add up to a step: for where a step's time goes, trace it (``jax.profiler``). It also
times whole ``Engine.step`` calls (the compiled call plus the host work around it) and
counts compilations. Figures under load on a shared machine: read the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m experiments.profile_serve", description=__doc__)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", default="small")
    src.add_argument("--checkpoint", metavar="RUN_DIR")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=200)
    return ap.parse_args(argv)


def _timed(fn, args, repeats: int):
    """Median seconds of ``fn(*args)`` (already compiled)."""
    import jax

    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return ts


def _engine(model, batch, prompt_len, speculative, prompts):
    from deepseek_jax.infer.engine import Engine
    from deepseek_jax.infer.sampling import SamplingParams

    pages = (-(-(prompt_len + 1800 + 1) // 16)) * batch + 1
    eng = Engine(model, num_pages=pages, max_batch=batch,
                 prefill_chunk=prompt_len, speculative=speculative)  # fmt: skip
    for p in prompts[:batch]:
        eng.submit(p, SamplingParams(max_tokens=1800))
    while len(eng.running) < batch:
        eng.step()
    return eng


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from deepseek_jax.infer import programs
    from deepseek_jax.infer.engine import _fit
    from experiments.bench_serve import held_out_tokens, make_prompts
    from experiments.generate import load_model

    args.hf, args.step, args.dtype, args.seed = None, None, "float32", 0
    model = load_model(args)
    cfg = model.cfg
    tokens = held_out_tokens(args.checkpoint) if args.checkpoint else None
    prompts = make_prompts(tokens, cfg.vocab_size, args.batch, args.prompt_len,
                           np.random.default_rng(1))  # fmt: skip
    e1 = _engine(model, 1, args.prompt_len, False, prompts)
    eB = _engine(model, args.batch, args.prompt_len, False, prompts)
    es = _engine(model, 1, args.prompt_len, True, prompts)

    def arrays(eng, width):
        reqs = eng.running
        B = _fit(eng.batch_buckets, len(reqs))
        for r in reqs:
            r.lens_needed = r.lens + width
        table = eng._table(reqs, B)
        pad = B - len(reqs)
        tok = np.asarray([r.pending for r in reqs] + [0] * pad, np.int32)
        lens = np.asarray([r.lens for r in reqs] + [0] * pad, np.int32)
        return tok, lens, table, eng._sampling(reqs, B)

    g, st = e1.decode.graphdef, e1.decode.state
    t1, l1, tb1, s1 = arrays(e1, 2)
    tB, lB, tbB, sB = arrays(eB, 1)
    dec = nnx.merge(g, st)
    D = cfg.hidden_size
    from deepseek_jax.infer.paged import _block, mla_paged

    def donating(pool):
        """A part ``fn(state, caches, *a) -> (out, caches)`` on its own copy of ``pool``,
        donated as the engine's programs donate theirs (else each cache write copies the
        whole pool)."""

        def wrap(fn):
            jf, box = jax.jit(fn, donate_argnums=(1,)), [jax.tree.map(jnp.copy, pool)]

            def run(state, *a):
                out, box[0] = jf(state, box[0], *a)
                return out

            return run

        return wrap

    def fwd(state, caches, ids, lens, table):
        logits, h, caches = nnx.merge(g, state).forward(ids, caches, table, lens)
        return (logits, h), caches

    def body(state, caches, ids, lens, table):  # the main model without the head
        d = nnx.merge(g, state)
        x, new = d.embed_tokens(ids), []
        for layer, c in zip(d.layers, caches, strict=False):
            x, c = _block(layer, x, c, table, lens, cfg, d.attention)
            new.append(c)
        return d.norm(x), new + list(caches[len(new) :])

    @jax.jit
    def head(state, h):
        return nnx.merge(g, state).head(h)

    def draft(state, caches, h, nxt, lens, table):
        return nnx.merge(g, state).draft(h, nxt, caches, table, lens)

    def draft_kept(state, caches, h, nxt, lens, table):
        keep = jnp.ones(lens.shape, jnp.int32)
        return nnx.merge(g, state).draft(h, nxt, caches, table, lens, keep)

    @jax.jit
    def moe(state, x):  # one MoE layer's FFN (router, routed and shared experts)
        layer = next(m for m in nnx.merge(g, state).layers if m.is_moe)
        return layer.mlp(x)[0]

    def attn(state, caches, x, lens, table):  # one layer's paged attention, cache write
        d = nnx.merge(g, state)
        w, i = d.layers[-1].self_attn.weights(), len(d.layers) - 1
        y, c = mla_paged(w, x, caches[i], table, lens, cfg, d.attention)
        return y, [*caches[:i], c, *caches[i + 1 :]]

    on1, onB = donating(e1.decode.caches), donating(eB.decode.caches)

    @jax.jit
    def samp(logits, s, lens):
        return programs.sample(logits, s, lens)

    h1 = jnp.zeros((1, 1, D), jnp.float32)
    h2 = jnp.zeros((1, 2, D), jnp.float32)
    ids1, ids2 = t1[:, None], np.stack([t1, t1], 1)
    logitsV = jnp.zeros((1, cfg.vocab_size), jnp.float32)
    q = np.zeros((1, cfg.vocab_size), np.float32)
    q[0, 0] = 1.0

    rnd = lambda *shape: jax.random.normal(jax.random.key(0), shape)  # noqa: E731
    Bn = len(tB)
    parts = {
        "main body T=1": (on1(body), (st, ids1, l1, tb1)),
        "main body T=2": (on1(body), (st, ids2, l1, tb1)),
        "main fwd T=1 (body+head)": (on1(fwd), (st, ids1, l1, tb1)),
        "main fwd T=2 (body+head)": (on1(fwd), (st, ids2, l1, tb1)),
        "head T=1": (head, (st, h1)),
        "head T=2": (head, (st, h2)),
        "MTP draft T=1 (block+head)": (on1(draft), (st, h1, ids1, l1, tb1)),
        "MTP draft T=2 (block+head)": (on1(draft), (st, h2, ids2, l1, tb1)),
        "MTP draft T=2, kept position": (on1(draft_kept), (st, h2, ids2, l1, tb1)),
        "sample B=1": (samp, (logitsV, s1, l1)),
        "MoE layer T=1": (moe, (st, rnd(1, 1, D))),
        "MoE layer T=2": (moe, (st, rnd(1, 2, D))),
        f"MoE layer B={args.batch}": (moe, (st, rnd(Bn, 1, D))),
        "attention layer T=1": (on1(attn), (st, rnd(1, 1, D), l1, tb1)),
        "attention layer T=2": (on1(attn), (st, rnd(1, 2, D), l1, tb1)),
        f"attention layer B={args.batch}": (onB(attn), (st, rnd(Bn, 1, D), lB, tbB)),
        f"main body B={args.batch}": (onB(body), (st, tB[:, None], lB, tbB)),
        f"head B={args.batch}": (head, (st, jnp.zeros((len(tB), 1, D), jnp.float32))),
        f"sample B={args.batch}": (samp, (jnp.zeros((len(tB), cfg.vocab_size)), sB, lB)),
    }

    def plain1():
        out = e1._decode(st, e1.decode.caches, t1, l1, tb1, s1)
        e1.decode.caches = out[1]
        return out[0]

    def plainB():
        out = eB._decode(st, eB.decode.caches, tB, lB, tbB, sB)
        eB.decode.caches = out[1]
        return out[0]

    def spec1():
        out = es._spec(st, es.decode.caches, t1, t1, q, l1, tb1, s1)
        es.decode.caches = out[-1]
        return out[0]

    progs = {"plain step B=1": plain1, f"plain step B={args.batch}": plainB,
             "spec step B=1": spec1}  # fmt: skip
    for fn in progs.values():
        jax.block_until_ready(fn())
    for fn, a in parts.values():
        jax.block_until_ready(fn(*a))
    times = {k: [] for k in [*progs, *parts, "engine.step B=1", f"engine.step B={args.batch}",
                             "engine.step spec B=1"]}  # fmt: skip
    for eng in (e1, eB, es):
        eng.step()
    before = {id(e): sum(e.compilations.values()) for e in (e1, eB, es)}
    for _ in range(args.repeats):  # interleaved: the machine's load drifts
        for k, fn in progs.items():
            times[k] += _timed(fn, (), 1)
        for k, (fn, a) in parts.items():
            times[k] += _timed(fn, a, 1)
        for k, eng in (("engine.step B=1", e1), (f"engine.step B={args.batch}", eB),
                       ("engine.step spec B=1", es)):  # fmt: skip
            t0 = time.perf_counter()
            eng.step()
            times[k].append(time.perf_counter() - t0)
    recompiles = sum(sum(e.compilations.values()) - before[id(e)] for e in (e1, eB, es))
    base = statistics.median(times["plain step B=1"])
    print(f"medians of {args.repeats} interleaved rounds (under load), ms and in plain B=1 steps")
    for k, ts in times.items():
        m = statistics.median(ts)
        print(f"  {k:<32} {1e3 * m:8.3f} ms  {m / base:6.2f}")
    acc = es.stats["accepted"] / max(es.stats["drafted"], 1)
    print(f"compilations during the timed steps: {recompiles}; spec acceptance {acc:.1%}")
    del dec
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
