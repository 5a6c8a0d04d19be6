"""Config: the released config.json form, the transformers-native form, the round trip, presets, overrides."""

import json

import pytest
import transformers

from molmo2_jax.config import (
    ConfigError,
    Molmo2Config,
    apply_overrides,
    from_dict,
    from_hf_config,
    load_preset,
    to_dict,
    to_hf_config,
)

# The released Molmo2-4B config.json (the keys our loader reads; values from the published file).
RELEASED_4B = {
    "model_type": "molmo2", "architectures": ["Molmo2ForConditionalGeneration"],
    "adapter_config": {"head_dim": 72, "hidden_act": "silu", "hidden_size": 1152, "intermediate_size": 9728,
                       "model_type": "molmo2", "num_attention_heads": 16, "num_key_value_heads": 16,
                       "pooling_attention_mask": True, "text_hidden_size": 2560, "vit_layers": [-3, -9]},
    "text_config": {"additional_vocab_size": 128, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2560,
                    "intermediate_size": 9728, "layer_norm_eps": 1e-06, "max_position_embeddings": 36864,
                    "model_type": "molmo2_text", "norm_after": False, "num_attention_heads": 32,
                    "num_hidden_layers": 36, "num_key_value_heads": 8, "qk_norm_type": "qwen3", "qkv_bias": False,
                    "rope_scaling": None, "rope_scaling_layers": None, "rope_theta": 5000000.0,
                    "use_qk_norm": True, "vocab_size": 151936},
    "vit_config": {"head_dim": 72, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152,
                   "image_default_input_size": [378, 378], "image_num_pos": 729, "image_patch_size": 14,
                   "intermediate_size": 4304, "layer_norm_eps": 1e-06, "model_type": "molmo2",
                   "num_attention_heads": 16, "num_hidden_layers": 27, "num_key_value_heads": 16},
    "frame_end_token_id": 151944, "frame_start_token_id": 151943, "image_col_id": 151939,
    "image_end_token_id": 151937, "image_high_res_id": 151938, "image_low_res_id": 151942,
    "image_patch_id": 151938, "image_start_token_id": 151936, "low_res_image_start_token_id": 151940,
}
YARN = {"rope_type": "yarn", "factor": 8.0, "attention_factor": 1.2079441541679836, "beta_fast": 32,
        "beta_slow": 1, "original_max_position_embeddings": 8192}


def test_released_config_trims_the_vit_and_normalises_feature_layers():
    config = from_hf_config(RELEASED_4B)
    assert config.vision.num_layers == 25 and config.adapter.vit_layers == (24, 18)
    assert config.text.rope_theta == 5e6 and config.text.rope_scaling is None
    assert (config.tokens.image_patch, config.tokens.image_col, config.tokens.frame_end) == (151938, 151939, 151944)
    assert config.tokens.video_prompt == 151945  # follows the fixed order of the ten Molmo2 tokens


def test_released_config_matches_the_preset():
    assert to_dict(from_hf_config(RELEASED_4B).text) == to_dict(load_preset("molmo2-4b").text)
    assert from_hf_config(RELEASED_4B).vision == load_preset("molmo2-4b").vision


def test_olmo_yarn_config_round_trips_through_the_released_form():
    hf = json.loads(json.dumps(RELEASED_4B))
    hf["text_config"].update(qk_norm_type="olmo", norm_after=True, rope_scaling=YARN, rope_theta=500000.0,
                             rope_scaling_layers=[i for i in range(36) if i % 4 != 3], num_key_value_heads=32)
    config = from_hf_config(hf)
    assert config.text.rope_scaling.factor == 8.0 and config.text.layer_uses_scaled_rope(0)
    assert not config.text.layer_uses_scaled_rope(3)
    assert from_hf_config(to_hf_config(config)) == config


def test_reference_reads_our_released_form_like_we_do():
    """transformers' own Molmo2Config parses what to_hf_config writes into the same architecture."""
    hf = json.loads(json.dumps(RELEASED_4B))
    hf["text_config"].update(rope_scaling=YARN, rope_scaling_layers=[0, 1, 2])
    ours = from_hf_config(hf)
    ref = transformers.Molmo2Config(**to_hf_config(ours))
    assert ref.vision_config.num_hidden_layers == ours.vision.num_layers
    assert list(ref.adapter_config.vision_feature_layer) == list(ours.adapter.vit_layers)
    assert ref.text_config.rope_parameters["rope_type"] == "yarn"
    assert list(ref.text_config.rope_scaling_layers) == [0, 1, 2]
    assert ref.image_patch_id == ours.tokens.image_patch


def test_native_config_from_save_pretrained(tmp_path):
    from ref_model import tiny_config

    tiny_config("olmo3").save_pretrained(tmp_path)
    config = from_hf_config(tmp_path / "config.json")
    assert config.adapter.vit_layers == (4, 2) and config.vision.num_layers == 5
    assert config.text.qk_norm_type == "olmo" and config.text.rope_scaling_layers == (0, 2)
    assert config.text.rope_scaling.attention_factor == pytest.approx(1.2079441541679836)


@pytest.mark.parametrize("change, message", [
    (("text_config", "qk_norm_type", "layer"), "unknown qk_norm_type 'layer'"),
    (("text_config", "use_qk_norm", False), "use_qk_norm is false"),
    (("text_config", "num_key_value_heads", 5), "not a multiple of num_kv_heads"),
])
def test_bad_configs_fail_with_a_clear_message(change, message):
    hf = json.loads(json.dumps(RELEASED_4B))
    section, key, value = change
    hf[section][key] = value
    with pytest.raises(ConfigError, match=message):
        from_hf_config(hf)
    with pytest.raises(ConfigError, match="not a Molmo2 config"):
        from_hf_config({"model_type": "llama"})


def test_unknown_keys_list_the_valid_ones_and_overrides_parse_numbers():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['hiden_size'\] in text\..*'hidden_size'"):
        from_dict(Molmo2Config, {"text": {"hiden_size": 3}})
    data = apply_overrides({}, ["train.lr=3e-4", "mesh.fsdp=-1", "run_dir=runs/x"])
    assert data == {"train": {"lr": 3e-4}, "mesh": {"fsdp": -1}, "run_dir": "runs/x"}


def _set_keys_agree(ref: dict, back: dict, where: str) -> None:
    """Every key the reference config sets has the same value after the round trip (dicts: the keys it sets)."""
    for key, value in ref.items():
        if value is None or key in ("transformers_version", "architectures", "dtype") or str(key).endswith("_config"):
            continue
        got = back.get(key)
        if isinstance(value, dict):
            _set_keys_agree(value, got, f"{where}.{key}")
        else:
            assert got == value, f"{where}.{key}: {value!r} became {got!r}"


@pytest.mark.parametrize("family", ["qwen3", "olmo3"])
def test_tiny_reference_config_round_trips_hf_ours_hf(family):
    """transformers' config (native form) -> ours -> the released form -> transformers: the same architecture;
    and ours -> released form -> ours is the identity."""
    from ref_model import tiny_config

    ref = tiny_config(family)
    ours = from_hf_config(ref.to_dict())
    back = transformers.Molmo2Config(**to_hf_config(ours))
    layers = ref.vision_config.num_hidden_layers
    for section in ("text_config", "vision_config", "adapter_config"):
        expected = getattr(ref, section).to_dict()
        if section == "adapter_config":  # negative feature layers count from the last ViT block
            expected["vision_feature_layer"] = [i % layers for i in expected["vision_feature_layer"]]
        _set_keys_agree(expected, getattr(back, section).to_dict(), section)
    _set_keys_agree(ref.to_dict(), back.to_dict(), "config")
    assert from_hf_config(to_hf_config(ours)) == ours


@pytest.mark.parametrize("preset", ["molmo2-4b", "molmo2-8b", "molmo2-o-7b"])
def test_released_presets_round_trip(preset):
    """A preset's released form reads back as the preset, writes back as the same config.json, and transformers
    reads it into the preset's architecture."""
    ours = load_preset(preset)
    hf = to_hf_config(ours)
    assert from_hf_config(hf) == ours
    assert to_hf_config(from_hf_config(json.loads(json.dumps(hf)))) == hf
    ref = transformers.Molmo2Config(**hf)
    text = ours.text
    assert (ref.text_config.num_hidden_layers, ref.text_config.hidden_size, ref.text_config.num_key_value_heads,
            ref.text_config.qk_norm_type, ref.text_config.norm_after) == (
        text.num_layers, text.hidden_size, text.num_kv_heads, text.qk_norm_type, text.norm_after)
    assert ref.text_config.rope_parameters["rope_theta"] == text.rope_theta
    assert ref.vision_config.num_hidden_layers == ours.vision.num_layers
    assert list(ref.adapter_config.vision_feature_layer) == list(ours.adapter.vit_layers)
