"""Hugging Face interop: golden logits from transformers, round trips, FP8, layouts, errors.

The golden values come from ``tests/fixtures/make_hf_fixtures.py`` (run with torch and
transformers in a separate virtualenv); this suite needs neither.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import deepseek_jax
from deepseek_jax.infer.generate import generate
from deepseek_jax.interop import fp8_weights, hf_names
from deepseek_jax.interop.pretrained import CheckpointMismatchError
from deepseek_jax.interop.safetensors_io import (
    CheckpointFormatError,
    SafetensorsReader,
    TensorSpec,
    save_sharded,
)
from deepseek_jax.mesh import make_mesh
from tests.layouts import spec
from tests.test_train import QUICK

HF = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
FIXTURES = ["v3_group", "v3_yarn", "v2_softmax", "v3_fp8"]
TOL = 1e-4


def _golden(name):
    return dict(np.load(os.path.join(HF, name, "golden.npz")))


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = deepseek_jax.from_pretrained(os.path.join(HF, name))
        return cache[name]

    return get


def _forward(model, ids, positions=None):
    return nnx.jit(lambda m, i, p: m(i, p))(model, jnp.asarray(ids), positions)


def _state(model):
    return jax.device_get(nnx.to_pure_dict(nnx.state(model)))


# ------------------------------------------------------------------------ golden parity


@pytest.mark.parametrize("name", FIXTURES)
def test_logits_match_transformers(models, name):
    g, model = _golden(name), models(name)
    out = _forward(model, g["input_ids"])
    diff = np.abs(np.asarray(out.logits_BTV) - g["logits"]).max()
    assert diff <= TOL, f"{name}: max |logits - transformers| = {diff:.3g}"
    if "mtp_logits" in g:  # transformers' MtpModel on the same weights
        assert model.cfg.num_nextn_predict_layers == 1
        mdiff = np.abs(np.asarray(out.mtp_logits_KBTV) - g["mtp_logits"]).max()
        assert mdiff <= TOL, f"{name}: max |MTP logits - transformers| = {mdiff:.3g}"
    if "logits_offset" in g:  # YaRN at positions beyond original_max_position_embeddings
        ids = g["input_ids"]
        pos = jnp.broadcast_to(jnp.arange(ids.shape[1]) + 5000, ids.shape)
        odiff = np.abs(np.asarray(_forward(model, ids, pos).logits_BTV) - g["logits_offset"]).max()
        assert odiff <= TOL, f"{name}: max |logits at 5000+ - transformers| = {odiff:.3g}"


@pytest.mark.parametrize("name", FIXTURES)
def test_greedy_generation_matches_transformers(models, name):
    g = _golden(name)
    out = generate(models(name), jnp.asarray(g["prompt_ids"]), g["generated"].shape[1])
    np.testing.assert_array_equal(np.asarray(out), g["generated"])


def test_configs_read_as_released():
    cfg = deepseek_jax.from_pretrained(os.path.join(HF, "v2_softmax")).cfg
    assert (cfg.scoring_func, cfg.topk_method, cfg.q_lora_rank) == (
        "softmax",
        "group_limited_greedy",
        None,
    )
    assert not cfg.has_routing_bias and cfg.num_nextn_predict_layers == 0
    fp8 = json.load(open(os.path.join(HF, "v3_fp8", "config.json")))
    assert fp8["quantization_config"]["weight_block_size"] == [128, 128]
    assert "rope_scaling" in fp8 and "rope_parameters" not in fp8  # the official spelling


# ------------------------------------------------------------------------ FP8


def test_fp8_fixture_is_block_quantised_and_dequantises(models):
    reader = SafetensorsReader(os.path.join(HF, "v3_fp8"))
    name = "model.layers.0.mlp.gate_proj.weight"  # [320, 192]: partial blocks on both axes
    assert reader.info(name).dtype == np.dtype(ml_dtypes.float8_e4m3fn)
    assert reader.info(name + "_scale_inv").shape == (3, 2)
    w = fp8_weights.dequantize_blocks(reader.read(name), reader.read(name + "_scale_inv"))
    ours = np.asarray(models("v3_fp8").dense_layers.mlp.gate_proj[0])
    np.testing.assert_array_equal(ours, w.T)


def test_dequantize_blocks_partial_edges():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(300, 129)).astype(np.float32)
    q, s = fp8_weights.quantize_blocks(w)
    assert q.dtype == np.dtype(ml_dtypes.float8_e4m3fn) and s.shape == (3, 2)
    d = fp8_weights.dequantize_blocks(q, s)
    naive = np.empty_like(d)
    for i in range(300):
        for j in range(129):
            naive[i, j] = np.float32(q[i, j]) * s[i // 128, j // 128]
    np.testing.assert_array_equal(d, naive)
    assert np.abs(d - w).max() <= np.abs(w).max() * 2**-3  # e4m3: 3 mantissa bits


# ------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("name", ["v3_group", "v2_softmax", "v3_fp8"])
def test_export_import_round_trips_exactly(models, tmp_path, name):
    model = models(name)
    files = deepseek_jax.save_pretrained(model, tmp_path, max_shard_size=200_000)
    assert len(files) > 1 and os.path.exists(tmp_path / "model.safetensors.index.json")
    again = deepseek_jax.from_pretrained(tmp_path)
    assert again.cfg == model.cfg
    jax.tree.map(np.testing.assert_array_equal, _state(again), _state(model))


def test_export_layout_is_the_released_one(models, tmp_path):
    """Names and shapes equal the transformers-written fixture's (plus the MTP layer)."""
    deepseek_jax.save_pretrained(models("v3_group"), tmp_path)
    ours = SafetensorsReader(tmp_path)
    ref = SafetensorsReader(os.path.join(HF, "v3_group"))
    assert ours.names() == ref.names()
    for n in ref.names():
        assert ours.info(n).shape == ref.info(n).shape, n
        np.testing.assert_array_equal(ours.read(n), ref.read(n).astype(np.float32), err_msg=n)
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["rope_interleave"]


def test_bfloat16_export(models, tmp_path):
    model = models("v3_yarn")  # stored in bfloat16: the export is exact too
    deepseek_jax.save_pretrained(model, tmp_path, dtype="bfloat16")
    reader = SafetensorsReader(tmp_path)
    assert reader.info("lm_head.weight").dtype == np.dtype(ml_dtypes.bfloat16)
    assert reader.info("model.layers.1.mlp.gate.e_score_correction_bias").dtype == np.float32
    jax.tree.map(
        np.testing.assert_array_equal, _state(deepseek_jax.from_pretrained(tmp_path)), _state(model)
    )


def test_fused_and_per_expert_layouts_load_the_same(models, tmp_path):
    """v3_yarn was written by transformers in its fused layout; re-split it per expert."""
    src = os.path.join(HF, "v3_yarn")
    assert "model.layers.1.mlp.experts.gate_up_proj" in SafetensorsReader(src)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    for key in [k for k in tensors if k.endswith("experts.gate_up_proj")]:
        prefix = key[: -len("gate_up_proj")]
        gu, down = tensors.pop(key), tensors.pop(prefix + "down_proj")
        F = gu.shape[1] // 2
        for e in range(gu.shape[0]):
            tensors[f"{prefix}{e}.gate_proj.weight"] = gu[e, :F]
            tensors[f"{prefix}{e}.up_proj.weight"] = gu[e, F:]
            tensors[f"{prefix}{e}.down_proj.weight"] = down[e]
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(os.path.join(src, "config.json"), tmp_path)
    jax.tree.map(
        np.testing.assert_array_equal,
        _state(deepseek_jax.from_pretrained(tmp_path)),
        _state(models("v3_yarn")),
    )


def test_half_split_rope_layout(models, tmp_path):
    """rope_interleave=false: rope channels stored half-split, reordered on import."""
    src = os.path.join(HF, "v3_yarn")
    tensors = load_file(os.path.join(src, "model.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    R, N, C = cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["kv_lora_rank"]
    H = cfg["num_attention_heads"]

    def split(w_out_in, rows):  # interleaved pairs -> halves, on the given output rows
        w = w_out_in.copy()
        r = w[rows]
        w[rows] = np.concatenate([r[0::2], r[1::2]])
        return w

    for k in list(tensors):
        if k.endswith("q_b_proj.weight"):
            for h in range(H):
                lo = h * (N + R) + N
                tensors[k] = split(tensors[k], slice(lo, lo + R))
        elif k.endswith("kv_a_proj_with_mqa.weight"):
            tensors[k] = split(tensors[k], slice(C, C + R))
    save_file(tensors, tmp_path / "model.safetensors")
    json.dump(dict(cfg, rope_interleave=False), open(tmp_path / "config.json", "w"))
    loaded = deepseek_jax.from_pretrained(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, _state(loaded), _state(models("v3_yarn")))


# ------------------------------------------------------------------------ streaming


def test_sharded_load_reads_each_tensor_once(models, monkeypatch):
    """Born sharded on a (node=2, gpu=4) mesh, each tensor read once, same values."""
    reads = []
    real = SafetensorsReader.read
    monkeypatch.setattr(SafetensorsReader, "read", lambda self, n: reads.append(n) or real(self, n))
    model = deepseek_jax.from_pretrained(os.path.join(HF, "v3_group"), mesh=make_mesh(2, 4))
    assert reads and len(reads) == len(set(reads)), "a tensor was read twice"
    w = model.moe_layers.mlp.w_gate[...]
    assert w.sharding.spec == spec(None, "expert", None, None)
    assert {s.data.shape for s in w.addressable_shards} == {(2, 1, 64, 32)}
    jax.tree.map(np.testing.assert_array_equal, _state(model), _state(models("v3_group")))


def test_safetensors_io_interoperates_with_the_library(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "a": rng.normal(size=(3, 5)).astype(np.float32),
        "b": np.arange(7, dtype=np.int64),
        "c": rng.normal(size=(4,)).astype(ml_dtypes.bfloat16),
    }
    specs = [TensorSpec(k, v.dtype, v.shape) for k, v in arrays.items()]
    save_sharded(str(tmp_path), specs, arrays.__getitem__)
    lib = load_file(tmp_path / "model.safetensors")
    np.testing.assert_array_equal(lib["a"], arrays["a"])
    np.testing.assert_array_equal(lib["b"], arrays["b"])
    save_file({"x": arrays["a"]}, tmp_path / "model.safetensors")
    np.testing.assert_array_equal(SafetensorsReader(tmp_path).read("x"), arrays["a"])


# ------------------------------------------------------------------------ errors


def _copy(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(os.path.join(HF, name), dst)
    return dst


def test_pickle_only_directory_is_refused(tmp_path):
    shutil.copy(os.path.join(HF, "v3_yarn", "config.json"), tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointFormatError, match="pickle.*safetensors only"):
        deepseek_jax.from_pretrained(tmp_path)


def test_missing_files_are_named(tmp_path):
    d = _copy("v3_group", tmp_path)
    os.remove(d / "model-00003-of-00007.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00003-of-00007.safetensors"):
        deepseek_jax.from_pretrained(d)
    os.remove(d / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        deepseek_jax.from_pretrained(d)
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        deepseek_jax.from_pretrained(tmp_path / "nowhere")


def test_bad_shape_names_the_tensor(tmp_path):
    d = _copy("v3_yarn", tmp_path)
    tensors = load_file(d / "model.safetensors")
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    tensors[name] = tensors[name][:-1]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(
        CheckpointMismatchError, match=rf"{name}: expected shape \[128, 32\], found \[127, 32\]"
    ):
        deepseek_jax.from_pretrained(d)


def test_missing_tensor_is_named(tmp_path):
    d = _copy("v3_yarn", tmp_path)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.gate.e_score_correction_bias"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(
        CheckpointMismatchError,
        match="missing tensor model.layers.1.mlp.gate.e_score_correction_bias",
    ):
        deepseek_jax.from_pretrained(d)


def test_unknown_architecture_is_named(tmp_path):
    d = _copy("v3_yarn", tmp_path)
    cfg = json.load(open(d / "config.json"))
    json.dump(
        dict(cfg, architectures=["LlamaForCausalLM"], model_type="llama"),
        open(d / "config.json", "w"),
    )
    with pytest.raises(ValueError, match="unsupported architecture.*LlamaForCausalLM"):
        deepseek_jax.from_pretrained(d)


def _our_hf_names(cfg, fused: set[str] = frozenset()) -> list[str]:
    """The HF tensor names our leaves map to (per expert unless the name is in ``fused``)."""
    from deepseek_jax.build import abstract_model
    from deepseek_jax.interop.pretrained import _leaves

    out = []
    for path, _ in _leaves(nnx.state(abstract_model(cfg))):
        m = hf_names.leaf_map(path, cfg)
        for i in range(len(m.prefixes)):
            f = m.kind == "expert" and m.names(i, 0, fused=True)[0] in fused
            out += m.names(i, cfg.n_routed_experts, fused=f)
    for k in range(cfg.num_nextn_predict_layers):
        out += list(hf_names.mtp_extra_names(cfg, k))
    return out


@pytest.mark.parametrize("name", FIXTURES)
def test_every_leaf_has_the_name_transformers_gives_it(name):
    from deepseek_jax.interop.hf_config import config_from_hf

    d = os.path.join(HF, name)
    theirs = {n for n in SafetensorsReader(d).names() if not n.endswith("_scale_inv")}
    ours = _our_hf_names(config_from_hf(d), fused=theirs)
    assert set(ours) == theirs
    shared = {n for n in ours if ours.count(n) > 1}  # a fused gate_up serves w_gate and w_up
    assert all(n.endswith(".mlp.experts.gate_up_proj") for n in shared), shared


@pytest.mark.parametrize("preset", ["v2-236b", "v3-671b"])
def test_every_leaf_of_a_preset_has_its_own_name(preset):
    from deepseek_jax.presets import get_preset

    cfg = get_preset(preset)
    names = _our_hf_names(cfg)
    assert len(names) == len(set(names))
    layers = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
    assert layers == set(range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers))
    per_expert = 3 * cfg.n_routed_experts * cfg.num_moe_layers
    assert sum(".mlp.experts." in n for n in names) == per_expert + 3 * cfg.n_routed_experts * (
        cfg.num_nextn_predict_layers
    )


# ------------------------------------------------------------------------ Orbax runs


def test_convert_to_training_run_and_back(models, tmp_path, capsys):
    from experiments.convert import main

    run, out = tmp_path / "run", tmp_path / "hf"
    assert main(["hf-to-run", os.path.join(HF, "v3_fp8"), str(run)]) == 0
    assert (run / "checkpoints" / "0").exists()
    assert main(["hf-to-run", os.path.join(HF, "v3_fp8"), str(run)]) == 2  # never overwrites
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main(["run-to-hf", str(run), str(out)]) == 0
    jax.tree.map(
        np.testing.assert_array_equal,
        _state(deepseek_jax.from_pretrained(out)),
        _state(models("v3_fp8")),
    )


@pytest.mark.slow
def test_converted_model_fine_tunes_and_exports(tmp_path):
    """experiments.train resumes a converted run with its own model config."""
    from experiments.convert import main as convert
    from experiments.train import main as train

    run, out = tmp_path / "run", tmp_path / "hf"
    data = tmp_path / "data.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    assert convert(["hf-to-run", os.path.join(HF, "v3_group"), str(run)]) == 0
    assert train([*QUICK, "--out", str(run), "--steps", "2", "--data", str(data)]) == 0
    assert convert(["run-to-hf", str(run), str(out)]) == 0
    tuned = deepseek_jax.from_pretrained(out)
    before = deepseek_jax.from_pretrained(os.path.join(HF, "v3_group"))
    assert tuned.cfg == before.cfg
    assert not np.array_equal(np.asarray(tuned.lm_head[...]), np.asarray(before.lm_head[...]))
