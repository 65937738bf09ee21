"""The FP8 recipe (fp8.py, fp8_vjp.py): quantisation, the GEMM reference, FP8 linears."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import fp8, fp8_gemm, fp8_quant
from deepseek_jax.presets import get_preset
from tests.numerics import rel_err

E4M3_EPS = 2.0**-4  # half an ulp of a 3-bit mantissa, relative
SUB_ULP = 2.0**-10  # half the E4M3FN subnormal spacing 2^-9, in units of the scale


def _normal(seed, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _within_e4m3(x, dq, s_full):
    bound = np.maximum(E4M3_EPS * np.abs(x), SUB_ULP * s_full) * (1 + 1e-6)
    assert np.all(np.abs(np.asarray(dq) - np.asarray(x)) <= bound)


# ---------------------------------------------------------------------------- quantisation


@pytest.mark.parametrize("shape,axis", [((5, 300), -1), ((3, 130, 7), 1), ((256, 64), 0)])
@pytest.mark.parametrize("pow2", [False, True])
def test_tile_round_trip_within_e4m3(shape, axis, pow2):
    x = _normal(0, shape) * jnp.exp(_normal(1, shape, 2.0))  # a wide dynamic range
    q, s = jax.jit(fp8_quant.quantize_tiles, static_argnames=("axis", "pow2"))(
        x, axis=axis, pow2=pow2
    )
    assert q.dtype == fp8_quant.E4M3 and q.shape == x.shape and s.dtype == jnp.float32
    n = shape[axis]
    assert s.shape[axis] == -(-n // 128)
    dq = jax.jit(fp8_quant.dequantize_tiles, static_argnames="axis")(q, s, axis=axis)
    s_full = jnp.moveaxis(jnp.repeat(jnp.moveaxis(s, axis, -1), 128, -1)[..., :n], -1, axis)
    _within_e4m3(x, dq, s_full)
    assert float(jnp.max(jnp.abs(q.astype(jnp.float32)))) <= 448.0
    if pow2:
        assert np.all(np.log2(np.asarray(s)) == np.round(np.log2(np.asarray(s))))


def test_partial_tile_has_its_own_scale_and_zero_tiles_stay_finite():
    x = jnp.concatenate(
        [jnp.full((2, 128), 1000.0), jnp.full((2, 5), 0.5), jnp.zeros((2, 0))], axis=1
    )
    x = x.at[1].set(0.0)
    q, s = fp8_quant.quantize_tiles(x)
    np.testing.assert_allclose(s[0], [1000.0 / 448, 0.5 / 448], rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(fp8_quant.dequantize_tiles(q, s))))
    assert np.all(np.asarray(q[1].astype(jnp.float32)) == 0)


def test_every_fp8_quantiser_is_the_one_primitive():
    """The dispatch payload (reference and kernel body), LogFMT's FP8 baseline and the
    official weight format quantise exactly like ``fp8_quant`` on the policy's edge cases:
    an all-zero tile, a tile below the max-abs floor, a partial tile, values at the clip."""
    from deepseek_jax.interop import fp8_weights
    from deepseek_jax.logfmt import fp8_quantize_1x128
    from pallas_kernels import dispatch as kd

    x = _normal(7, (6, 256)) * jnp.exp(_normal(8, (6, 1), 3.0))
    x = x.at[1].set(0.0).at[2, :128].set(1e-33).at[3, 5].set(448.0 * 1.0000001)
    q, s = fp8_quant.quantize_tiles(x)
    codes = lambda q: np.asarray(q.astype(jnp.float32))  # noqa: E731
    for q2, s2 in (
        kd.quantize_rows(x),
        kd.permute_quantize(x, jnp.arange(6), interpret=True),
    ):
        np.testing.assert_array_equal(codes(q2), codes(q))
        np.testing.assert_array_equal(np.asarray(s2), np.asarray(s))
    np.testing.assert_array_equal(
        np.asarray(fp8_quantize_1x128(x)), np.asarray(fp8_quant.dequantize_tiles(q, s))
    )
    w = np.asarray(x[:, :200]).T  # [200, 6]: partial blocks on both axes
    qb, sb = fp8_quant.quantize_blocks(jnp.asarray(w))
    qw, sw = fp8_weights.quantize_blocks(w)
    np.testing.assert_array_equal(qw.astype(np.float32), codes(qb))
    np.testing.assert_array_equal(sw, np.asarray(sb))
    assert np.all(codes(q)[1] == 0) and np.all(np.isfinite(np.asarray(s)))


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (2, 130, 260)])
def test_block_round_trip_within_e4m3(shape):
    w = _normal(2, shape, 0.02)
    q, s = fp8_quant.quantize_blocks(w)
    assert s.shape == (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
    dq = fp8_quant.dequantize_blocks(q, s)
    s_full = jnp.repeat(jnp.repeat(s, 128, -2), 128, -1)[..., : shape[-2], : shape[-1]]
    _within_e4m3(w, dq, s_full)
    # One quantised copy serves W and W^T: block quantisation commutes with transposition.
    qt, st = fp8_quant.quantize_blocks(jnp.swapaxes(w, -1, -2))
    np.testing.assert_array_equal(
        np.asarray(jnp.swapaxes(qt, -1, -2).astype(jnp.float32)), np.asarray(q.astype(jnp.float32))
    )
    np.testing.assert_array_equal(np.asarray(jnp.swapaxes(st, -1, -2)), np.asarray(s))


def test_fine_grained_tiles_beat_per_tensor_on_outliers():
    x = _normal(3, (256, 512)).at[::37, ::61].multiply(1000.0)  # a few huge outliers
    q, s = fp8_quant.quantize_tensor(x)
    err_tensor = rel_err(q.astype(jnp.float32) * s, x)
    err_tiles = rel_err(fp8_quant.dequantize_tiles(*fp8_quant.quantize_tiles(x)), x)
    assert err_tiles < err_tensor / 2


# ---------------------------------------------------------------------------- GEMM reference


@pytest.mark.parametrize("M,N,K", [(64, 96, 512), (33, 130, 300)])
def test_gemm_reference_equals_float64_on_dequantised_inputs(M, N, K):
    a8, sa = fp8_quant.quantize_tiles(_normal(4, (M, K), 3.0))
    b8, sb = fp8_quant.quantize_tiles(_normal(5, (N, K), 0.1))
    ref64 = (
        np.asarray(fp8_quant.dequantize_tiles(a8, sa), np.float64)
        @ np.asarray(fp8_quant.dequantize_tiles(b8, sb), np.float64).T
    )
    out = jax.jit(fp8_gemm.scaled_matmul_reference)(a8, sa, b8, sb)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref64, rtol=2e-5, atol=1e-6 * np.abs(ref64).max())
    xla = jax.jit(fp8_gemm.scaled_matmul)(a8, sa, b8, sb)
    np.testing.assert_allclose(np.asarray(xla), np.asarray(out), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- FP8 linear


@jax.jit
def _dequantised_operands(x, w, dy):
    """Exactly the FP8 operands the recipe feeds its three GEMMs (fp8.py design note)."""

    def dq_tiles(a, axis):
        return fp8_quant.dequantize_tiles(*fp8_quant.quantize_tiles(a, axis=axis), axis=axis)

    w_dq = fp8_quant.dequantize_blocks(*fp8_quant.quantize_blocks(w))
    return dq_tiles(x, -1), dq_tiles(dy, -1), w_dq, dq_tiles(x, 0), dq_tiles(dy, 0)


@jax.jit
def _linear_and_vjp(x, w, dy):
    y, vjp = jax.vjp(lambda x, w: fp8.fp8_linear(x, w), x, w)
    y32, vjp32 = jax.vjp(lambda x, w: x @ w, x, w)
    return (y, *vjp(dy)), (y32, *vjp32(dy))


def test_fp8_linear_fprop_dgrad_wgrad():
    M, K, N = 200, 300, 136  # no dimension a multiple of 128
    x, w, dy = _normal(6, (M, K)), _normal(7, (K, N), 0.05), _normal(8, (M, N), 1e-3)
    got, f32 = _linear_and_vjp(x, w, dy)
    x_k, dy_n, w_dq, x_t, dy_t = (
        np.asarray(a, np.float64) for a in _dequantised_operands(x, w, dy)
    )
    # Fprop x(1x128) W(128x128); Dgrad dy(1x128 along N) W^T; Wgrad x, dy re-tiled 128x1.
    exact = (x_k @ w_dq, dy_n @ w_dq.T, x_t.T @ dy_t)
    for g, want in zip(got, exact, strict=True):
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    # Against a float32 linear on the unquantised values: within FP8 precision.
    for g, want in zip(got, f32, strict=True):
        assert rel_err(g, want) < 0.05


def test_fp8_linear_keeps_dtypes_and_leading_axes():
    x = _normal(9, (2, 3, 130)).astype(jnp.bfloat16)
    w = _normal(10, (130, 40), 0.05)
    y, vjp = jax.vjp(jax.jit(lambda x, w: fp8.fp8_linear(x, w)), x, w)
    dx, dw = vjp(jnp.ones_like(y))
    assert (y.shape, y.dtype, dx.dtype, dw.dtype) == (
        (2, 3, 40),
        jnp.bfloat16,
        jnp.bfloat16,
        jnp.float32,
    )
    assert rel_err(y.astype(jnp.float32), x.astype(jnp.float32) @ w) < 0.05


def test_pallas_backend_equals_xla_backend():
    x, w = _normal(11, (130, 256)), _normal(12, (256, 136), 0.05)

    def f(b):
        return jax.jit(
            jax.value_and_grad(lambda x, w: jnp.sum(fp8.fp8_linear(x, w, backend=b) ** 2), (0, 1))
        )(x, w)

    (vx, gx), (vp, gp) = f("xla"), f("pallas")
    np.testing.assert_allclose(vp, vx, rtol=1e-5)
    for a, b in zip(gp, gx, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------- experts


# Same FP8 operands, different FP32 summation order: an intermediate (the SwiGLU hidden)
# sitting on an E4M3 rounding boundary may flip by one ulp; orientation bugs give ~1e-1.
FLIPS = 5e-3


def _expert_weights(E, D, F, seed=13):
    return (
        _normal(seed, (E, D, F), 0.05),
        _normal(seed + 1, (E, D, F), 0.05),
        _normal(seed + 2, (E, F, D), 0.05),
    )


def test_expert_ffn_is_each_experts_fp8_swiglu():
    E, C, D, F = 3, 40, 128, 96
    x, ws = _normal(16, (E, C, D)), _expert_weights(E, D, F)

    def f(x, *ws):
        return jnp.sum(fp8.fp8_expert_ffn(x, *ws) ** 2)

    def g(x, *ws):
        return sum(jnp.sum(fp8.fp8_swiglu(x[e], *(w[e] for w in ws)) ** 2) for e in range(E))

    for a, b in zip(
        jax.jit(jax.grad(f, (0, 1, 2, 3)))(x, *ws),
        jax.jit(jax.grad(g, (0, 1, 2, 3)))(x, *ws),
        strict=True,
    ):
        assert rel_err(a, b) < FLIPS


def test_grouped_ffn_matches_per_expert_fp8():
    sizes = (0, 130, 5, 121)  # an empty expert, one over a block, ragged edges
    E, D, F = len(sizes), 128, 64
    A = sum(sizes)
    x, ws = _normal(19, (A, D)), _expert_weights(E, D, F, seed=20)
    gs = jnp.array(sizes, jnp.int32)
    bounds = np.cumsum((0, *sizes))

    def per_expert(x, *ws):
        return jnp.concatenate(
            [fp8.fp8_swiglu(x[bounds[e] : bounds[e + 1]], *(w[e] for w in ws)) for e in range(E)]
        )

    grouped = lambda x, *ws: fp8.fp8_grouped_ffn(x, gs, *ws)  # noqa: E731
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
    value_grad = lambda f: jax.jit(jax.value_and_grad(loss(f), (0, 1, 2, 3)))  # noqa: E731
    (vg, gg), (vp, gp) = value_grad(grouped)(x, *ws), value_grad(per_expert)(x, *ws)
    assert abs(float(vg - vp)) < FLIPS * abs(float(vp))
    assert rel_err(jax.jit(grouped)(x, *ws), jax.jit(per_expert)(x, *ws)) < FLIPS
    for a, b in zip(gg, gp, strict=True):
        assert rel_err(a, b) < FLIPS


# ---------------------------------------------------------------------------- the model


def test_config_switch_puts_the_large_linears_in_fp8():
    from flax import nnx

    from deepseek_jax.model import Transformer

    ids = jnp.arange(32, dtype=jnp.int32).reshape(2, 16) % 256
    logits = lambda m: m(ids).logits_BTV  # noqa: E731
    outs = {}
    for flag in (False, True):
        model = Transformer(get_preset("tiny", [f"fp8={flag}"]), rngs=nnx.Rngs(0))
        outs[flag] = (nnx.jit(logits)(model), str(jax.make_jaxpr(logits)(model)))
    assert "f8_e4m3fn" not in outs[False][1] and "f8_e4m3fn" in outs[True][1]
    # The router sees FP8-perturbed inputs and may pick other experts for a few tokens.
    assert rel_err(outs[True][0], outs[False][0]) < 0.15


def test_fp8_training_steps_lower_the_loss():
    import optax
    from flax import nnx

    from deepseek_jax.model import Transformer

    cfg = get_preset("tiny", ["fp8=true", "dtype=bfloat16", "num_nextn_predict_layers=0"])
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    ids = jax.random.randint(jax.random.key(0), (4, 33), 0, 64)  # a learnable batch

    @nnx.jit
    def step(model, opt):
        def loss_fn(model):
            logits = model(ids[:, :-1]).logits_BTV.astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(6)]
    assert losses[-1] < losses[0] - 0.5, losses


def test_parity_script_flags_a_run_that_leaves_its_partner():
    """Same batches, so per-step noise is shared: only a run that ends above its partner
    (or goes non-finite) is flagged, however noisy both curves are."""
    from experiments.fp8_parity import diverged

    noise = [0.6 * np.sin(1.7 * i) for i in range(150)]  # batch difficulty, shared
    healthy = [8.0 * 0.98**i + 3.0 + e for i, e in enumerate(noise)]
    twin = [c * 1.004 for c in healthy]  # FP8's expected 0.4 % above
    blown = healthy[:100] + [c + 1.5 for c in healthy[100:]]
    assert not diverged(healthy, twin) and not diverged(twin, healthy)
    assert diverged(blown, healthy) and not diverged(healthy, blown)
    assert diverged(healthy[:50] + [float("nan")], healthy)


@pytest.mark.slow
def test_short_fp8_training_run_lowers_the_loss(tmp_path):
    """Through the trainer on the 8-device test mesh (Explicit sharding)."""
    from experiments.fp8_parity import train_ce

    r = train_ce("tiny", ["fp8=true"], steps=8, batch=8, seq=32, seed=0, out=tmp_path)
    assert r["last10_ce"] < r["first_ce"] - 0.3 and r["eval_ce"] < r["first_ce"]


@pytest.mark.parametrize("backend", ["einsum", "ragged_dot"])
def test_routed_experts_run_in_fp8_and_match_per_expert_fp8(backend):
    """Slots, spill blocks and the grouped path all give each expert's FP8 SwiGLU.

    Fprop and Dgrad tile each row 1x128, so any row layout quantises alike (only the FP32
    summation order differs). Wgrad tiles run over tokens (128x1): the layout changes
    which rows share a scale, so there we ask for FP8 tolerance, and not float32.
    """
    from deepseek_jax.moe import experts
    from deepseek_jax.moe.permute import SlotSizes

    T, K, E, D, F = 64, 3, 4, 128, 96
    x = _normal(30, (T, D))
    ws = _expert_weights(E, D, F, seed=31)
    idx = jax.random.randint(jax.random.key(32), (T, K), 0, E)
    w = jax.nn.softmax(_normal(33, (T, K)), axis=-1)
    sizes = SlotSizes(capacity=24, spill_block=8)  # mean load 48: most rows spill

    def loss(f):
        return lambda x, w, *ws: jnp.sum(jnp.sin(f(x, idx, w, *ws)))

    ours = lambda *a: experts.routed_ffn(*a, backend=backend, sizes=sizes, fp8="xla")  # noqa: E731
    ref = lambda *a: experts.routed_ffn_reference(*a, fp8="xla")  # noqa: E731
    f32 = lambda *a: experts.routed_ffn_reference(*a)  # noqa: E731
    grads = {
        name: jax.jit(jax.value_and_grad(loss(f), tuple(range(5))))(x, w, *ws)
        for name, f in (("ours", ours), ("ref", ref), ("f32", f32))
    }
    y = {name: jax.jit(f)(x, idx, w, *ws) for name, f in (("ours", ours), ("ref", ref))}
    assert "f8_e4m3fn" in str(jax.make_jaxpr(ours)(x, idx, w, *ws))
    assert rel_err(y["ours"], y["ref"]) < 1e-5
    (_, g_ours), (_, g_ref), (_, g_f32) = grads["ours"], grads["ref"], grads["f32"]
    for a in (0, 1):  # Dgrad and the gate weights: per-token tiles, layout-independent
        assert rel_err(g_ours[a], g_ref[a]) < 1e-5
    for a in (2, 3, 4):  # Wgrad: FP8 (not the float32 gradient), within FP8 tolerance
        assert rel_err(g_ours[a], g_ref[a]) < 0.1
        assert rel_err(g_ours[a], g_f32[a]) > 1e-3


def test_moe_layer_in_fp8_is_shared_plus_routed_fp8_experts():
    from flax import nnx

    from deepseek_jax.layers import MLP
    from deepseek_jax.moe import experts
    from deepseek_jax.moe.layer import MoE, _router

    cfg = get_preset("tiny", ["fp8=true"])
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    assert isinstance(moe.shared_experts, MLP) and moe.shared_experts.fp8 == "xla"
    x_BTD = _normal(40, (2, 16, cfg.hidden_size))
    y_BTD, _ = moe(x_BTD)
    x_TD = x_BTD.reshape(-1, cfg.hidden_size)
    idx, w, _, _ = _router(x_TD, moe.gate[...], moe.e_score_correction_bias[...], cfg, 2)
    ws = (moe.w_gate[...], moe.w_up[...], moe.w_down[...])
    want = experts.routed_ffn_reference(x_TD, idx, w, *ws, fp8="xla") + moe.shared_experts(x_TD)
    assert rel_err(y_BTD.reshape(want.shape), want) < 1e-4  # FP32 summation order only
