"""Parameter and KV-cache calculators against REFERENCE.md, from abstract init."""

import json

import pytest

from deepseek_jax.build import abstract_model
from deepseek_jax.codesign.kv_cache import gqa_kv_bytes_per_token, mla_kv_bytes_per_token
from deepseek_jax.codesign.params import abstract_report
from deepseek_jax.presets import PRESETS, get_preset

# REFERENCE.md per-component counts for DeepSeek-V3.
MLA, EXPERT, GATE, EMB = 187_105_280, 44_040_192, 1_835_008, 926_679_040
DENSE = 3 * 7168 * 18432


def test_v3_param_counts():
    rep = abstract_report(get_preset("v3-671b"))
    assert rep.total_params == 61 * MLA + 3 * DENSE + 58 * (257 * EXPERT + GATE) + 2 * EMB
    assert rep.activated_params == pytest.approx(
        61 * MLA + 3 * DENSE + 58 * (9 * EXPERT + GATE) + 2 * EMB
    )
    assert rep.mtp_params == MLA + 257 * EXPERT + GATE + 2 * 7168 * 7168
    assert round(rep.total_params / 1e9, 2) == 671.03
    assert round(rep.activated_params / 1e9, 2) == 37.55
    assert round(rep.mtp_params / 1e9, 2) == 11.61


def test_v2_param_counts():
    rep = abstract_report(get_preset("v2-236b"))
    assert round(rep.total_params / 1e9, 2) == 235.74
    assert round(rep.activated_params / 1e9, 2) == 21.38
    assert rep.mtp_params == 0


def test_kv_cache_bytes():
    assert mla_kv_bytes_per_token(get_preset("v3-671b")) == 70_272
    assert gqa_kv_bytes_per_token(8, 128, 80) == 327_680
    assert gqa_kv_bytes_per_token(8, 128, 126) == 516_096


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_abstract_state(name):
    m = abstract_model(get_preset(name))
    assert m.lm_head.shape == (get_preset(name).hidden_size, get_preset(name).vocab_size)


def test_params_cli_last_line_is_json(capsys):
    from experiments.params import main

    main(["--preset", "v3-671b"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    d = json.loads(last)
    assert d["kv_cache_bytes_per_token"] == 70_272
    assert set(d) >= {"total_params", "activated_params", "mtp_params", "kv_cache_bytes_per_token"}
