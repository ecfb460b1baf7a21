"""Config presets and params.json parsing against the sizes Meta and Hugging Face publish for the real models."""

import json

import pytest

from llama_jax.config import ConfigError, LlamaConfig, RopeScaling, preset

# Meta's params.json files as shipped with the downloads (Llama 2 says vocab_size -1: the tokenizer decides).
META_PARAMS = {
    "llama2-7b": {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
                  "vocab_size": -1},
    "llama2-70b": {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
                   "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1},
    "llama3-8b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                  "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0},
    "llama3.1-405b": {"dim": 16384, "n_layers": 126, "n_heads": 128, "n_kv_heads": 8, "vocab_size": 128256,
                      "ffn_dim_multiplier": 1.2, "multiple_of": 4096, "norm_eps": 1e-05, "rope_theta": 500000.0,
                      "use_scaled_rope": True},
    "llama3.2-1b": {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                    "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
                    "use_scaled_rope": True},
}

# intermediate_size in Hugging Face's published config.json for each model.
HF_INTERMEDIATE_SIZE = {
    "llama2-7b": 11008, "llama2-13b": 13824, "llama2-70b": 28672, "llama3-8b": 14336, "llama3-70b": 28672,
    "llama3.1-8b": 14336, "llama3.1-70b": 28672, "llama3.1-405b": 53248, "llama3.2-1b": 8192, "llama3.2-3b": 8192,
}
# Published parameter counts (billions, as the model names round them).
PUBLISHED_BILLIONS = {"llama2-7b": 6.74, "llama2-13b": 13.0, "llama2-70b": 69.0, "llama3-8b": 8.03,
                      "llama3.1-405b": 405.9, "llama3.2-1b": 1.24, "llama3.2-3b": 3.21}


@pytest.mark.parametrize("name", sorted(HF_INTERMEDIATE_SIZE))
def test_preset_hidden_dim_matches_published(name):
    assert preset(name).hidden_dim == HF_INTERMEDIATE_SIZE[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_preset_parameter_count_matches_published(name):
    assert preset(name).num_params() / 1e9 == pytest.approx(PUBLISHED_BILLIONS[name], rel=0.01)


@pytest.mark.parametrize("name", sorted(META_PARAMS))
def test_from_params_json_equals_preset(tmp_path, name):
    path = tmp_path / "params.json"
    path.write_text(json.dumps(META_PARAMS[name]))
    vocab = 32000 if META_PARAMS[name]["vocab_size"] == -1 else None
    config = LlamaConfig.from_params_json(path, vocab_size=vocab, max_seq_len=preset(name).max_seq_len)
    expected = preset(name)
    if name == "llama3.2-1b":  # params.json says nothing about tying; the converter decides from the tensors
        expected = expected.replace(tie_embeddings=False)
    assert config == expected


def test_rope_scaling_factor_comes_from_family(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps(META_PARAMS["llama3.2-1b"]))
    assert LlamaConfig.from_params_json(path).rope_scaling == RopeScaling(factor=32.0)
    assert LlamaConfig.from_params_json(path, family="llama3.1").rope_scaling == RopeScaling(factor=8.0)
    custom = RopeScaling(factor=16.0, original_max_seq_len=4096)
    assert LlamaConfig.from_params_json(path, rope_scaling=custom).rope_scaling == custom
    path.write_text(json.dumps(META_PARAMS["llama3.1-405b"]))
    assert LlamaConfig.from_params_json(path).rope_scaling == RopeScaling(factor=8.0)
    with pytest.raises(ConfigError, match="unknown model family"):
        LlamaConfig.from_params_json(path, family="llama4")


def test_json_round_trip(tmp_path):
    config = preset("llama3.2-3b", dtype="bfloat16")
    config.save_json(tmp_path / "c.json")
    assert LlamaConfig.load_json(tmp_path / "c.json") == config


def test_config_json_of_earlier_versions_loads(tmp_path):
    # Model and run folders written before packed weights left the config carry "packed_weights": false.
    config = preset("llama3.2-1b")
    (tmp_path / "c.json").write_text(json.dumps({**config.to_dict(), "packed_weights": False}))
    assert LlamaConfig.load_json(tmp_path / "c.json") == config
    assert "packed_weights" not in config.to_dict()


@pytest.mark.parametrize("fields, message", [
    (dict(dim=100, n_heads=3), "n_heads=3 must divide dim=100"),
    (dict(dim=64, n_heads=4, n_kv_heads=3), "n_kv_heads=3 must divide n_heads=4"),
    (dict(dim=60, n_heads=4), "head_dim=15 must be even"),
    (dict(dtype="int8"), "dtype='int8'"),
    (dict(remat_policy="sometimes"), "remat_policy='sometimes'"),
])
def test_bad_config_is_a_clear_error(fields, message):
    with pytest.raises(ConfigError, match=message):
        LlamaConfig(**fields)


def test_bad_params_json_is_a_clear_error(tmp_path):
    path = tmp_path / "params.json"
    with pytest.raises(ConfigError, match="params.json: file not found"):
        LlamaConfig.from_params_json(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LlamaConfig.from_params_json(path)
    path.write_text(json.dumps(META_PARAMS["llama2-7b"]))
    with pytest.raises(ConfigError, match="vocab_size is -1"):
        LlamaConfig.from_params_json(path)
    path.write_text(json.dumps({"dim": 64}))
    with pytest.raises(ConfigError, match="lacks"):
        LlamaConfig.from_params_json(path)
