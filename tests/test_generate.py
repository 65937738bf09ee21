"""Generation: unrolled == scanned decode == full forward, sampling rules, the two scripts."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.infer.generate import Generator, UnrolledDecoder, _pick
from deepseek_jax.model import Transformer
from deepseek_jax.presets import get_preset
from tests.layouts import spec

CFG = get_preset("tiny")
HF = os.path.join(os.path.dirname(__file__), "fixtures", "hf")


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, rngs=nnx.Rngs(3))


def test_unrolled_decode_equals_scanned_and_forward(model):
    ids = jax.random.randint(jax.random.key(0), (2, 12), 0, CFG.vocab_size)
    full = nnx.jit(lambda m, x: m(x).logits_BTV)(model, ids)

    def stepwise(dec):  # prefill 8 tokens, then one at a time
        cache = dec.init_cache(2, 12)
        out, cache = dec.decode(ids[:, :8], cache, jnp.int32(0))
        outs = [out]
        for t in range(8, 12):
            out, cache = dec.decode(ids[:, t : t + 1], cache, jnp.int32(t))
            outs.append(out)
        return jnp.concatenate(outs, axis=1)

    unrolled = nnx.jit(stepwise)(UnrolledDecoder(model))
    scanned = nnx.jit(stepwise)(model)
    np.testing.assert_allclose(unrolled, scanned, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(unrolled, full, atol=1e-4, rtol=1e-4)


def test_generator_unrolled_and_scanned_agree(model):
    prompt = np.asarray(jax.random.randint(jax.random.key(1), (2, 6), 0, CFG.vocab_size))
    a = Generator(model, unroll=True)(prompt, 10)
    b = Generator(model, unroll=False)(prompt, 10)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.tokens.shape == (2, 10) and a.tokens.dtype == np.int32
    per_layer = (CFG.kv_lora_rank + CFG.qk_rope_head_dim) * 4  # float32 latent + rope key
    assert a.cache_bytes_per_token == CFG.num_hidden_layers * per_layer
    rates = a.rates(6)
    assert rates["prefill_tokens_per_s"] > 0 and rates["decode_tokens_per_s"] > 0
    assert a.compile_s > 0 and Generator(model).compile(2, 6, 10) > 0


def test_sampling_rules():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 256))
    keys = jax.random.split(jax.random.key(0), 1)[0]
    greedy = _pick(logits, keys, 0.0, 0, 1.0)
    assert (greedy == 0).all()
    assert (_pick(logits, keys, 1.0, 1, 1.0) == 0).all()  # top-1 is greedy
    assert (_pick(logits, keys, 1.0, 0, 0.4) == 0).all()  # nucleus 0.4 keeps only the best
    p = np.asarray(_pick(logits, keys, 1.0, 0, 0.7))  # 0.5 + 0.3 >= 0.7: two tokens
    assert set(p.tolist()) == {0, 1}
    k2 = np.asarray(_pick(logits, keys, 1.0, 2, 1.0))
    assert set(k2.tolist()) == {0, 1}


def test_bad_generation_arguments(model):
    with pytest.raises(ValueError, match="top_p"):
        Generator(model, top_p=0.0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Generator(model)(np.zeros((1, 8), np.int32), CFG.max_position_embeddings)
    with pytest.raises(ValueError, match="new_tokens"):
        Generator(model)(np.zeros((1, 8), np.int32), 0)


def test_generate_script(capsys):
    from experiments.generate import main

    g = np.load(os.path.join(HF, "v3_yarn", "golden.npz"))
    ids = ",".join(str(i) for i in g["prompt_ids"][0])
    assert (
        main(["--hf", os.path.join(HF, "v3_yarn"), "--prompt-ids", ids, "--max-new-tokens", "32"])
        == 0
    )
    out = capsys.readouterr().out
    assert f"new ids (32): {g['generated'][0].tolist()}" in out  # transformers' greedy tokens
    assert "decode" in out and "tokens/s" in out and "bytes/token" in out
    assert (
        main(
            [
                "--preset",
                "tiny",
                "--prompt",
                "hi",
                "--max-new-tokens",
                "3",
                "--temperature",
                "0.8",
                "--top-p",
                "0.9",
            ]
        )
        == 0
    )
    assert main(["--hf", "/nonexistent", "--prompt", "x"]) == 2


def test_bench_generate_script(capsys):
    from experiments.bench_generate import main

    argv = ["--preset", "tiny", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1"]
    assert main([*argv, "attention_backend=xla"]) == 0
    out = capsys.readouterr().out
    last = json.loads(out.strip().splitlines()[-1])
    assert set(last) == {
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "cache_bytes_per_token",
        "overrides",
        "machine",
    }
    assert last["cache_bytes_per_token"] == 3 * (16 + 8) * 4
    assert last["overrides"] == ["attention_backend=xla"]
    machine = last["machine"]
    assert machine["vector_isa"] in out and machine["cpu"] in out  # printed, not only saved
    assert machine["backends"]  # the MoE's choice at least, each printed with its reason
    assert all(f"backend {k}: {v}" in out for k, v in machine["backends"].items())


@pytest.mark.parametrize("devices", [1, 8])
def test_generate_on_a_mesh_with_one_prompt_per_shard(model, devices):
    """What the training job's closing sample does: one prompt row per data-parallel shard,
    batch-sharded over the mesh (with one device, a sharded axis of size 1)."""
    from jax.sharding import NamedSharding

    from deepseek_jax.infer.generate import generate
    from deepseek_jax.mesh import make_mesh

    mesh = make_mesh(1, 1, devices=jax.devices()[:1]) if devices == 1 else make_mesh(2, 4)
    ids = np.full((devices, 3), 5, np.int32)
    with jax.set_mesh(mesh):
        ids = jax.device_put(ids, NamedSharding(mesh, spec("batch")))
        out = generate(model, ids, 4, temperature=0.0, seed=0)
    assert out.shape == (devices, 4)
    same = np.broadcast_to(np.asarray(out[:1]), out.shape)
    np.testing.assert_array_equal(out, same)  # one prompt, one greedy text on every shard
