"""ModelConfig.from_hf: the official and the transformers spellings, and clear errors."""

from __future__ import annotations

import json

import pytest

from flashport.config import CSA, HASH_MOE, HCA, SWA, TOPK_MOE, ModelConfig
from flashport.errors import ConfigError

OFFICIAL = {
    "vocab_size": 129280, "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64,
    "num_key_value_heads": 1, "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8,
    "o_lora_rank": 1024, "sliding_window": 128, "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
    "num_hash_layers": 3, "compress_rope_theta": 160000, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                     "beta_fast": 32, "beta_slow": 1},
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "n_routed_experts": 256,
    "num_experts_per_tok": 6, "moe_intermediate_size": 2048, "routed_scaling_factor": 1.5,
    "expert_dtype": "fp4", "eos_token_id": 1, "bos_token_id": 0,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                            "weight_block_size": [128, 128], "activation_scheme": "dynamic"},
}


def test_official_v4_flash_config():
    cfg = ModelConfig.from_hf(OFFICIAL)
    assert cfg.layer_types[:4] == (SWA, SWA, CSA, HCA) and cfg.layer_types[-1] == CSA
    assert cfg.layer_types.count(CSA) == 21 and cfg.layer_types.count(HCA) == 20
    assert cfg.mlp_layer_types[:4] == (HASH_MOE, HASH_MOE, HASH_MOE, TOPK_MOE)
    assert cfg.fp8_block_size == (128, 128) and cfg.expert_dtype == "fp4"
    assert cfg == ModelConfig()  # the defaults are V4-Flash


def test_transformers_spelling_gives_the_same_config():
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV4Config(**{k: v for k, v in OFFICIAL.items() if k != "quantization_config"})
    d = json.loads(hf.to_json_string())
    assert "layer_types" in d and "compress_ratios" not in d
    cfg = ModelConfig.from_hf(d)
    expected = ModelConfig.from_hf({**OFFICIAL, "quantization_config": None})
    assert cfg == expected


def test_round_trip_through_official_dict():
    cfg = ModelConfig().with_num_layers(5)
    assert ModelConfig.from_hf(cfg.to_official_dict()) == cfg


@pytest.mark.parametrize("patch, field", [
    ({"compress_ratios": [0, 0, 5] + [4] * 41}, "compress_ratios[2]"),
    ({"compress_ratios": [0, 0]}, "compress_ratios"),
    ({"layer_types": ["sliding_attention", "bogus"] + ["sliding_attention"] * 41}, "layer_types[1]"),
    ({"o_groups": 7}, "o_groups"),
    ({"qk_rope_head_dim": 1024}, "qk_rope_head_dim"),
    ({"num_key_value_heads": 8}, "num_key_value_heads"),
    ({"hidden_size": "big"}, "hidden_size"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quant_method"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling"),
    ({"eos_token_id": "end"}, "eos_token_id"),
])
def test_bad_fields_name_the_field(patch, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        ModelConfig.from_hf({**OFFICIAL, **patch})


def test_no_schedule_is_an_error():
    raw = {k: v for k, v in OFFICIAL.items() if k != "compress_ratios"}
    with pytest.raises(ConfigError, match="compress_ratios"):
        ModelConfig.from_hf(raw)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json: not found"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**OFFICIAL, "o_groups": 7}))
    with pytest.raises(ConfigError, match=r"config.json: field 'o_groups'"):
        ModelConfig.from_hf(tmp_path)


def test_with_num_layers():
    cfg = ModelConfig().with_num_layers(20)
    assert cfg.num_hidden_layers == 20 and len(cfg.layer_types) == 20
    with pytest.raises(ConfigError, match="num_layers"):
        ModelConfig().with_num_layers(44)
