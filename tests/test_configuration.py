"""MiniOmni2Config: released defaults, derived sizes, sub-configs, Mini-Omni without vision."""

import json

import pytest
from transformers import AutoConfig, CLIPVisionConfig, Qwen2Config, WhisperConfig

from mini_omni2 import MiniOmni2Config
from mini_omni2.tiny import tiny_config


def test_released_defaults():
    config = MiniOmni2Config()
    assert isinstance(config.text_config, Qwen2Config)
    assert isinstance(config.audio_config, WhisperConfig)
    assert isinstance(config.vision_config, CLIPVisionConfig)
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (896, 24, 14, 2)
    assert (text.head_dim, text.intermediate_size, text.rms_norm_eps) == (64, 4864, 1e-6)
    assert text.rope_parameters["rope_theta"] == 1e6 and text.tie_word_embeddings is False
    assert config.audio_config.d_model == 768 and config.audio_feature_dim == 768
    assert config.vision_config.patch_size == 32 and config.vision_feature_dim == 512
    assert (config.text_vocab_size, config.audio_codebook_size, config.audio_vocab_size) == (152000, 4096, 4160)
    assert (config.num_audio_layers, config.adapter_intermediate_size) == (7, 4864)
    assert config.codec_config["codebook_size"] == 4096 and config.codec_config["vq_strides"] == [4, 2, 1]


def test_head_size_is_derived_from_the_layout():
    config = MiniOmni2Config()
    assert config.total_vocab_size == 181120 == config.text_config.vocab_size
    small = MiniOmni2Config(text_vocab_size=1000, audio_vocab_size=200, audio_codebook_size=128,
                            codec_config=dict(MiniOmni2Config().codec_config, codebook_size=128))
    assert small.text_config.vocab_size == 1000 + 7 * 200


def test_mini_omni_has_no_vision_and_round_trips(tmp_path):
    config = MiniOmni2Config(vision_config=None)
    assert config.vision_config is None and not config.has_vision and config.vision_feature_dim is None
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["vision_config"] is None
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MiniOmni2Config) and loaded.vision_config is None
    assert loaded.total_vocab_size == 181120


def test_tiny_round_trip_keeps_every_size(tmp_path):
    config = tiny_config()
    config.save_pretrained(tmp_path)
    loaded = MiniOmni2Config.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.token_layout == config.token_layout


def test_inconsistent_codec_is_refused():
    with pytest.raises(ValueError, match="codebook_size"):
        MiniOmni2Config(codec_config=dict(MiniOmni2Config().codec_config, codebook_size=1024))
    with pytest.raises(ValueError, match="audio specials"):
        MiniOmni2Config(audio_vocab_size=4097)


def test_keyword_overrides_at_load_are_checked_like_config_json(tmp_path):
    """transformers sets ``from_pretrained(folder, key=value)`` overrides after the config is built: they pass the
    same checks as the file's values, and a good one keeps the derived sizes consistent."""
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="codebook_size"):
        MiniOmni2Config.from_pretrained(tmp_path, audio_codebook_size=5)
    with pytest.raises(ValueError, match="audio specials"):
        MiniOmni2Config.from_pretrained(tmp_path, audio_vocab_size=tiny_config().audio_codebook_size + 1)
    loaded = MiniOmni2Config.from_pretrained(tmp_path, text_vocab_size=tiny_config().text_vocab_size + 64)
    assert loaded.text_config.vocab_size == loaded.token_layout.total_vocab_size == tiny_config().total_vocab_size + 64
