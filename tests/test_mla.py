"""MLA: the absorbed latent-cache decode equals the naive path; causality; sharding."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax import sharding
from deepseek_jax.mesh import make_mesh
from deepseek_jax.mla import MLA, LatentCache, mla_absorbed, mla_naive
from deepseek_jax.presets import get_preset
from tests.numerics import max_rel_err

CFGS = {
    "yarn": get_preset("tiny"),
    "no_yarn": get_preset("tiny", ["rope_scaling=none"]),
    "no_q_lora": get_preset("tiny", ["q_lora_rank=none"]),
}
B, L = 2, 20
RTOL = 1e-5  # max abs error relative to max abs value, float32


def _random_weights(cfg, seed=0):
    """Module-initialised names/shapes; values ~ 1/sqrt(fan_in) so scores are O(1)."""
    w = MLA(cfg, rngs=nnx.Rngs(seed)).weights()
    keys = jax.random.split(jax.random.key(seed + 1), len(w))
    out = {}
    for k, (name, v) in zip(keys, sorted(w.items()), strict=True):
        noise = jax.random.normal(k, v.shape, jnp.float32)
        out[name] = 1.0 + 0.1 * noise if name.endswith("layernorm") else noise / np.sqrt(v.shape[0])
    return out


def _inputs(cfg, batch=B, length=L, seed=2):
    x = jax.random.normal(jax.random.key(seed), (batch, length, cfg.hidden_size))
    offsets = jnp.arange(batch)[:, None] * 7  # rows start at different positions
    return x, jnp.arange(length)[None, :] + offsets


naive = jax.jit(mla_naive, static_argnames="cfg")
absorbed = jax.jit(mla_absorbed, static_argnames="cfg")


def _decode_all(w, x, pos, cfg, prompt):
    """Prefill ``prompt`` tokens into the cache, then decode the rest one token at a time."""
    cache = LatentCache.init(x.shape[0], x.shape[1], cfg)
    y, cache = absorbed(w, x[:, :prompt], pos[:, :prompt], cache, jnp.int32(0), cfg=cfg)
    ys = [y]
    for t in range(prompt, x.shape[1]):
        y, cache = absorbed(w, x[:, t : t + 1], pos[:, t : t + 1], cache, jnp.int32(t), cfg=cfg)
        ys.append(y)
    return jnp.concatenate(ys, axis=1), cache


@pytest.mark.parametrize("name", sorted(CFGS))
@pytest.mark.parametrize("prompt", [1, 5, 17])
def test_absorbed_decode_equals_naive(name, prompt):
    cfg = CFGS[name]
    w = _random_weights(cfg)
    x, pos = _inputs(cfg)
    want = naive(w, x, pos, cfg=cfg)
    got, _ = _decode_all(w, x, pos, cfg, prompt)
    chex.assert_shape(got, (B, L, cfg.hidden_size))
    per_position = [max_rel_err(got[:, t], want[:, t]) for t in range(L)]
    assert max(per_position) < RTOL, per_position


@pytest.mark.parametrize("name", ["yarn", "no_q_lora"])
def test_token_by_token_equals_prefill(name):
    cfg = CFGS[name]
    w = _random_weights(cfg, seed=3)
    x, pos = _inputs(cfg, seed=4)
    y_prefill, c_prefill = _decode_all(w, x, pos, cfg, prompt=L)
    y_steps, c_steps = _decode_all(w, x, pos, cfg, prompt=1)
    assert max_rel_err(y_steps, y_prefill) < RTOL
    chex.assert_trees_all_close(c_steps, c_prefill, atol=1e-6, rtol=1e-6)


def test_cache_holds_latent_and_rope_key_only():
    cfg = CFGS["yarn"]
    cache = LatentCache.init(3, 11, cfg, jnp.bfloat16)
    chex.assert_shape(cache.ckv_BSC, (3, 11, cfg.kv_lora_rank))
    chex.assert_shape(cache.krope_BSR, (3, 11, cfg.qk_rope_head_dim))
    assert cache.max_len == 11 and cache.ckv_BSC.dtype == jnp.bfloat16
    assert len(jax.tree.leaves(cache)) == 2


def _grad_wrt_x(f, x, t):
    return jax.grad(lambda x: f(x)[:, t].sum())(x)


@pytest.mark.parametrize("path", ["naive", "absorbed"])
def test_causality_through_gradients(path):
    cfg = CFGS["yarn"]
    w = _random_weights(cfg)
    x, pos = _inputs(cfg, length=10)
    if path == "naive":
        f = lambda x: mla_naive(w, x, pos, cfg)  # noqa: E731
    else:
        cache = LatentCache.init(B, 12, cfg)
        f = lambda x: mla_absorbed(w, x, pos, cache, 0, cfg)[0]  # noqa: E731
    t = 4
    g = _grad_wrt_x(f, x, t)
    assert np.all(np.asarray(g[:, t + 1 :]) == 0.0)
    assert np.all(np.abs(np.asarray(g[:, : t + 1])).sum(-1) > 0)


def test_module_parameters():
    cfg = CFGS["yarn"]
    m = MLA(cfg, rngs=nnx.Rngs(0))
    H, N, R, O = 4, 16, 8, 16
    want = {
        "q_a_proj": ((64, 32), ("embed", "q_lora")),
        "q_a_layernorm": ((32,), ("q_lora",)),
        "q_b_proj": ((32, H, N + R), ("q_lora", "heads", "head_dim")),
        "kv_a_proj_with_mqa": ((64, 16 + R), ("embed", "kv_lora")),
        "kv_a_layernorm": ((16,), ("kv_lora",)),
        "kv_b_proj": ((16, H, N + O), ("kv_lora", "heads", "head_dim")),
        "o_proj": ((H, O, 64), ("heads", "head_dim", "embed")),
    }
    got = {n: (v.shape, sharding.variable_names(getattr(m, n))) for n, v in m.weights().items()}
    assert got == want
    assert all(v.dtype == jnp.float32 for v in m.weights().values())
    m2 = MLA(CFGS["no_q_lora"], rngs=nnx.Rngs(0))
    assert m2.weights()["q_proj"].shape == (64, H, N + R) and not hasattr(m2, "q_a_proj")


class ModulePathsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_call_and_decode_agree(self):
        cfg = CFGS["yarn"]
        m = MLA(cfg, rngs=nnx.Rngs(5))
        x, pos = _inputs(cfg, length=6)
        cache = LatentCache.init(B, 8, cfg)
        call = self.variant(lambda x, pos: m(x, pos))
        decode = self.variant(lambda x, pos, cache, i: m.decode(x, pos, cache, i))
        y = call(x, pos)
        y_dec, cache = decode(x[:, :4], pos[:, :4], cache, 0)
        y_last, _ = decode(x[:, 4:], pos[:, 4:], cache, 4)
        assert max_rel_err(jnp.concatenate([y_dec, y_last], 1), y) < RTOL


def test_bfloat16_compute():
    cfg = get_preset("tiny", ["dtype=bfloat16"])
    w = _random_weights(cfg)
    x, pos = _inputs(cfg, length=6)
    y = mla_naive(w, x, pos, cfg)
    y_dec, _ = mla_absorbed(w, x, pos, LatentCache.init(B, 6, cfg, jnp.bfloat16), 0, cfg)
    assert y.dtype == y_dec.dtype == jnp.bfloat16
    assert max_rel_err(y_dec, y) < 3e-2


def test_batch_sharded_equals_unsharded():
    cfg = CFGS["yarn"]
    w = _random_weights(cfg)
    x, pos = _inputs(cfg, batch=8, length=6)
    want = naive(w, x, pos, cfg=cfg)
    mesh = make_mesh(2, 4)
    with jax.set_mesh(mesh):
        batch = lambda a: jax.reshard(a, sharding.spec(("batch",) + (None,) * (a.ndim - 1)))  # noqa: E731
        xs, ps = batch(x), batch(pos)
        y = jax.jit(functools.partial(mla_naive, cfg=cfg))(w, xs, ps)
        cache = LatentCache.init(8, 6, cfg)
        y_dec, cache = jax.jit(functools.partial(mla_absorbed, cfg=cfg))(w, xs, ps, cache, 0)
        spec = sharding.spec(("batch", None, None))
    assert y.sharding.spec == spec and y_dec.sharding.spec == spec
    assert cache.ckv_BSC.sharding.spec == spec
    assert max_rel_err(y, want) < RTOL and max_rel_err(y_dec, want) < RTOL


@pytest.mark.parametrize("backend", ["xla", "cpu_kernel"])
def test_causal_attention_equals_one_masked_softmax(backend):
    """The causal core must equal the textbook masked softmax over the whole T x T square,
    in value and in gradient, on each backend: XLA's einsums in CAUSAL_QUERY_BLOCKS query
    blocks (T = 256), and our fused CPU kernel."""
    from cpu_kernels import attention as cpu_attention
    from deepseek_jax import causal_attention, mla

    if backend == "cpu_kernel" and not cpu_attention.available():
        pytest.skip("the C++ attention kernel does not build here")
    B, T, H, N, R, O = 2, 256, 3, 16, 8, 16
    cfg = get_preset("tiny", ["dtype=float32", f"attention_backend={backend}"])
    ks = jax.random.split(jax.random.key(7), 5)
    args = (
        jax.random.normal(ks[0], (B, T, H, N)),
        jax.random.normal(ks[1], (B, T, H, R)),
        jax.random.normal(ks[2], (B, T, H, N)),
        jax.random.normal(ks[3], (B, T, R)),
        jax.random.normal(ks[4], (B, T, H, O)),
    )

    def textbook(qn, qr, kn, kr, v):
        s = jnp.einsum("bthn,bshn->bhts", qn, kn) + jnp.einsum("bthr,bsr->bhts", qr, kr)
        s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s * mla.softmax_scale(cfg), -jnp.inf)
        return jnp.einsum("bhts,bsho->btho", jax.nn.softmax(s, axis=-1), v)

    ours = functools.partial(causal_attention.causal_attend, cfg=cfg)
    assert causal_attention.resolve_attention_backend(cfg, (B, T, H, N, R, O)) == backend
    assert T % causal_attention.CAUSAL_QUERY_BLOCKS == 0 and T >= 256  # XLA's blocked path runs
    np.testing.assert_allclose(ours(*args), textbook(*args), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
    grads = [jax.grad(loss(f), tuple(range(5)))(*args) for f in (ours, textbook)]
    for g_ours, g_ref in zip(*grads, strict=True):
        np.testing.assert_allclose(g_ours, g_ref, rtol=1e-4, atol=1e-4)
