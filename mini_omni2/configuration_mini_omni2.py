"""Configuration of Mini-Omni2 (and Mini-Omni: the same model with ``vision_config=None``)."""

from __future__ import annotations

import math
from dataclasses import field
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import logging

from .token_layout import LISTEN_CODEC, LISTEN_FEATURES, LISTEN_INPUTS, TokenLayout, normalize_listen_rule

logger = logging.get_logger(__name__)

#: Qwen2-0.5B as used by the release (SPEC §1); ``vocab_size`` is filled in from the token layout.
QWEN2_0_5B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    head_dim=64,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    max_position_embeddings=32768,
    tie_word_embeddings=False,
    use_sliding_window=False,
)

#: Whisper-small; only the encoder is built.
WHISPER_SMALL = dict(
    d_model=768,
    encoder_layers=12,
    encoder_attention_heads=12,
    encoder_ffn_dim=3072,
    decoder_layers=12,
    decoder_attention_heads=12,
    decoder_ffn_dim=3072,
    num_mel_bins=80,
    max_source_positions=1500,
    vocab_size=51865,
    activation_function="gelu",
    scale_embedding=False,
)

#: OpenAI CLIP ViT-B/32 visual tower with its 512-wide projection.
CLIP_VIT_B_32 = dict(
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=512,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)

#: SNAC 24 kHz constructor arguments (``hubertsiuzdak/snac_24khz``).
SNAC_24KHZ = dict(
    sampling_rate=24000,
    encoder_dim=48,
    encoder_rates=[2, 4, 8, 8],
    latent_dim=None,
    decoder_dim=1024,
    decoder_rates=[8, 8, 4, 2],
    attn_window_size=None,
    codebook_size=4096,
    codebook_dim=8,
    vq_strides=[4, 2, 1],
    noise=True,
    depthwise=True,
)


def codec_frame_samples(codec_config: dict) -> int:
    """Samples of one codec frame (one decoding step): the encoder's total stride times the coarsest VQ stride."""
    return int(math.prod(codec_config["encoder_rates"])) * int(codec_config["vq_strides"][0])


#: (extension) The listening row's audio features (docs/duplex.md): causal log-mel columns of each codec frame of the
#: incoming audio (at the codec's rate), ``context_frames`` frames stacked into one vector for the listening adapter.
LISTEN_FEATURES_DEFAULT = dict(
    num_mel_bins=64,
    n_fft=1024,
    hop_length=256,
    f_min=0.0,
    f_max=8000.0,
    context_frames=1,
    running_mean_seconds=2.0,
)

#: (extension) The listening adapter on those features: ``"mlp"``, a LLaMA-MLP like the other adapters, over the
#: flattened vector; ``"conv"``, three 3x3 convolutions over the frame's (columns, mel bins) image before a linear
#: layer, so that a pattern learned at one pitch or formant height is recognised at another; ``"gru"``, a recurrent
#: adapter whose state carries the frames heard so far from one step of the listening row to the next (docs/duplex.md).
LISTEN_ADAPTERS = ("mlp", "conv", "gru")


class MiniOmni2Config(PreTrainedConfig):
    r"""
    Composite configuration of [`MiniOmni2ForConditionalGeneration`].

    Args:
        text_config (`Qwen2Config` or `dict`): the language model; its `vocab_size` is derived from the token layout.
        audio_config (`WhisperConfig` or `dict`): the speech encoder (only the encoder is built).
        vision_config (`CLIPVisionConfig`, `dict` or `None`): the image encoder; `None` gives a Mini-Omni model.
        codec_config (`dict` or `None`): keyword arguments of `snac.SNAC`; `None` builds no codec (no waveforms).
        text_vocab_size (`int`): tokenizer ids plus the text specials (152,000).
        num_text_special_tokens (`int`): text specials after the tokenizer ids (64).
        audio_codebook_size (`int`): codec codes per layer (4,096).
        audio_vocab_size (`int`): ids per audio layer, codes plus specials (4,160).
        num_audio_layers (`int`): parallel audio streams (7).
        num_image_tokens (`int`): CLIP tokens per image (50).
        adapter_intermediate_size (`int`): width of the LLaMA-MLP adapters (4,864).
        listen_input (`str`): (extension) what the duplex listening row hears: `"codec"` (the codec's tokens of the
            incoming audio, the paper's way; no extra weights) or `"features"` (log-mel frames through a
            `listen_projector` adapter). See docs/duplex.md.
        listen_feature_config (`dict`): the log-mel front end of `listen_input="features"`.
        listen_adapter (`str`): (extension) the `listen_projector` of `listen_input="features"`: `"mlp"` (a LLaMA-MLP
            of width `adapter_intermediate_size` over the frame's flattened features) or `"conv"` (convolutions over
            its columns x mel bins, `listen_conv_channels` wide, then a linear layer) or `"gru"` (a small MLP per frame,
            then a GRU of `listen_gru_layers` layers, `listen_gru_size` wide, over the row's frames in order, then a
            linear layer; its state goes from one step of the listening row to the next). See docs/duplex.md.
        listen_conv_channels (`int`): channels of the `"conv"` listening adapter (16).
        listen_gru_size (`int`): width of the `"gru"` listening adapter (128).
        listen_gru_layers (`int`): layers of the `"gru"` listening adapter (2).
        listen_rule (`dict` or `None`): (extension) when this model's listening row commits to `irq`:
            `{"threshold": t, "min_frames": m}` (P(irq) >= t on m consecutive frames), the rule chosen on validation
            clips when the row was trained; sessions and the server use it unless told otherwise. `None`: the
            argmax (0.5 on one frame). See docs/duplex.md.

    Example:

    ```python
    >>> from mini_omni2 import MiniOmni2Config
    >>> config = MiniOmni2Config()  # the released Mini-Omni2 sizes
    >>> config.total_vocab_size
    181120
    ```
    """

    model_type = "mini_omni2"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2", init_kwargs=QWEN2_0_5B),
        "audio_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper", init_kwargs=WHISPER_SMALL),
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_vision_model", init_kwargs=CLIP_VIT_B_32, optional=True
        ),
    }

    text_config: dict | PreTrainedConfig | None = None
    audio_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = field(default_factory=lambda: dict(CLIP_VIT_B_32))
    codec_config: dict | None = field(default_factory=lambda: dict(SNAC_24KHZ))
    text_vocab_size: int = 152000
    num_text_special_tokens: int = 64
    audio_codebook_size: int = 4096
    audio_vocab_size: int = 4160
    num_audio_layers: int = 7
    num_image_tokens: int = 50
    adapter_intermediate_size: int = 4864
    listen_input: str = LISTEN_CODEC
    listen_feature_config: dict | None = field(default_factory=lambda: dict(LISTEN_FEATURES_DEFAULT))
    listen_rule: dict | None = None
    listen_adapter: str = "mlp"
    listen_conv_channels: int = 16
    listen_gru_size: int = 128
    listen_gru_layers: int = 2
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self._check_fields()

    def _check_fields(self) -> None:
        """Every check of the fields together (also run again after keyword overrides: :meth:`from_dict`)."""
        layout = self.token_layout  # validates the sizes
        derived = layout.total_vocab_size
        given = getattr(self.text_config, "vocab_size", None)
        if given not in (None, derived):
            logger.info(f"text_config.vocab_size {given} replaced by the token layout's {derived}")
        self.text_config.vocab_size = derived
        if self.codec_config is not None and self.codec_config.get("codebook_size", 4096) != self.audio_codebook_size:
            raise ValueError(
                f"codec_config.codebook_size ({self.codec_config.get('codebook_size')}) must equal "
                f"audio_codebook_size ({self.audio_codebook_size})"
            )
        if self.codec_config is not None and len(self.codec_config.get("vq_strides", [4, 2, 1])) != 3:
            raise ValueError("the codec must have the 3 SNAC levels that the 7 audio layers map onto")
        self._check_listen()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """transformers sets keyword overrides (``from_pretrained(folder, listen_input="features")``) as attributes
        after the config is built and checked: check the fields again, so a bad override is refused at load like a
        bad value in ``config.json``."""
        out = super().from_dict(config_dict, **kwargs)
        (out[0] if isinstance(out, tuple) else out)._check_fields()
        return out

    def _check_listen(self) -> None:
        if self.listen_input not in LISTEN_INPUTS:
            raise ValueError(f"listen_input must be one of {LISTEN_INPUTS}, got {self.listen_input!r}")
        if self.listen_adapter not in LISTEN_ADAPTERS:
            raise ValueError(f"listen_adapter must be one of {LISTEN_ADAPTERS}, got {self.listen_adapter!r}")
        for name in ("listen_conv_channels", "listen_gru_size", "listen_gru_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.listen_feature_config = {**LISTEN_FEATURES_DEFAULT, **(self.listen_feature_config or {})}
        unknown = set(self.listen_feature_config) - set(LISTEN_FEATURES_DEFAULT)
        if unknown:
            raise ValueError(f"unknown listen_feature_config keys {sorted(unknown)}; known: {sorted(LISTEN_FEATURES_DEFAULT)}")
        features = self.listen_feature_config
        if self.listen_frame_samples % features["hop_length"] or features["n_fft"] < features["hop_length"]:
            raise ValueError(
                f"listen_feature_config: hop_length ({features['hop_length']}) must divide the frame "
                f"({self.listen_frame_samples} samples) and be <= n_fft ({features['n_fft']})"
            )
        if not 0 <= features["f_min"] < features["f_max"] <= self.listen_sampling_rate / 2:
            raise ValueError(f"listen_feature_config: need 0 <= f_min < f_max <= {self.listen_sampling_rate / 2}")
        if features["context_frames"] < 1 or features["num_mel_bins"] < 1:
            raise ValueError("listen_feature_config: context_frames and num_mel_bins must be >= 1")
        if self.listen_input == LISTEN_CODEC and self.codec_config is None:
            logger.info("listen_input='codec' needs a codec to encode the incoming audio; this config builds none")
        self.listen_rule = normalize_listen_rule(self.listen_rule)

    @property
    def token_layout(self) -> TokenLayout:
        """The ids, templates and delay rules of this model's vocabulary."""
        return TokenLayout.of(self)

    @property
    def total_vocab_size(self) -> int:
        """Rows of the embedding table and LM head: text vocab + audio vocab x layers (181,120)."""
        return self.token_layout.total_vocab_size

    @property
    def audio_feature_dim(self) -> int:
        """Width of the Whisper encoder frames that enter the audio adapter (768)."""
        return self.audio_config.d_model

    @property
    def vision_feature_dim(self) -> int | None:
        """Width of the projected CLIP tokens that enter the vision adapter (512); None without vision."""
        return None if self.vision_config is None else self.vision_config.projection_dim

    @property
    def has_vision(self) -> bool:
        return self.vision_config is not None

    @property
    def listen_sampling_rate(self) -> int:
        """Rate of the incoming audio the listening row hears: the codec's (24 kHz), also for feature input."""
        return int((self.codec_config or SNAC_24KHZ)["sampling_rate"])

    @property
    def listen_frame_samples(self) -> int:
        """Samples of one listening frame = one codec frame = one decoding step (2,048 at 24 kHz, 85.3 ms)."""
        return codec_frame_samples(self.codec_config or SNAC_24KHZ)

    @property
    def listen_frame_seconds(self) -> float:
        """Duration of one listening frame (85.3 ms): how the listening row's frames map to time."""
        return self.listen_frame_samples / self.listen_sampling_rate

    @property
    def listen_feature_dim(self) -> int | None:
        """Width of one frame's feature vector entering the listening adapter; None for codec input."""
        shape = self.listen_feature_shape
        return None if shape is None else math.prod(shape)

    @property
    def listen_feature_shape(self) -> tuple[int, int] | None:
        """One frame's features as (columns, mel bins): the log-mel columns of ``context_frames`` frames, oldest
        first, as the vector lays them out; None for codec input."""
        if self.listen_input != LISTEN_FEATURES:
            return None
        features = self.listen_feature_config
        columns = self.listen_frame_samples // features["hop_length"]
        return columns * features["context_frames"], features["num_mel_bins"]

    @property
    def max_audio_frames(self) -> int:
        """Encoder frames available per request (1,500 = 30 s)."""
        return self.audio_config.max_source_positions


__all__ = ["MiniOmni2Config"]
