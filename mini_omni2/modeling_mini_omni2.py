"""Mini-Omni2 / Mini-Omni as a transformers model: Qwen2 backbone, Whisper and CLIP encoders, SNAC codec.

The backbone and encoders are transformers' own modules; this file adds only what the model has of its own:
the 8-stream embedding (SPEC §3), the LLaMA-MLP adapters, the sliced head and loss (SPEC §2, §9) and the codec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, ModelOutput
from transformers.models.clip.modeling_clip import CLIPVisionModelWithProjection
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from .configuration_mini_omni2 import MiniOmni2Config
from .duplex_mini_omni2 import MiniOmni2ListenFrontEnd
from .engine_mini_omni2 import MiniOmni2ListenState
from .generation_mini_omni2 import MiniOmni2GenerationMixin
from .token_layout import TokenLayout

IGNORE_INDEX = -100
#: The dtypes a model may be loaded in, by name; ``"auto"`` picks one for the hardware (:func:`resolve_dtype`).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def native_bfloat16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 matrix products natively: a CUDA device that supports it, or a CPU with
    AVX512_BF16 or AMX tiles (read from torch's CPU feature checks). Elsewhere bfloat16 is emulated and slower than
    float32 for the prefill's large products."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(check() for check in checks if check is not None)
    return False


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """The model dtype for ``dtype``: a torch dtype or its name, or ``"auto"``/``None``: bfloat16 where the hardware
    computes it natively (:func:`native_bfloat16`), float32 otherwise. (This is the hardware's choice, unlike
    transformers' ``dtype="auto"`` of ``from_pretrained``, which takes the checkpoint's.) The codec stays float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


#: The name transformers gives the KV cache, as a forward argument and an output field: ``cache`` from 5.24 on,
#: ``past_key_values`` before (5.24 takes the old name too, with a deprecation warning, until 5.40). The models here
#: take either name and answer in the installed transformers' own.
CACHE_NAME = "cache" if "cache" in {f.name for f in fields(BaseModelOutputWithPast)} else "past_key_values"


def _cache_field(cls: type) -> type:
    """Give an output class's cache field (declared ``cache``) the installed transformers' name (:data:`CACHE_NAME`);
    applied before ``@dataclass`` makes the fields."""
    if CACHE_NAME != "cache":
        cls.__annotations__ = {CACHE_NAME if k == "cache" else k: v for k, v in cls.__annotations__.items()}
        setattr(cls, CACHE_NAME, cls.__dict__["cache"])
        delattr(cls, "cache")
    return cls


def _given_cache(past_key_values: Cache | None, kwargs: dict) -> Cache | None:
    """The cache a forward was given, under either name (``cache`` is taken out of ``kwargs``); both is an error."""
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None:
        raise ValueError("give the cache as `cache` or as `past_key_values`, not both")
    return past_key_values if cache is None else cache


#: ``auto_map`` entries written into every saved folder, so that it loads with ``trust_remote_code=True`` alone.
AUTO_MAP = {
    "AutoConfig": "configuration_mini_omni2.MiniOmni2Config",
    "AutoModel": "modeling_mini_omni2.MiniOmni2Model",
    "AutoModelForMultimodalLM": "modeling_mini_omni2.MiniOmni2ForConditionalGeneration",
}


@dataclass
@_cache_field
class MiniOmni2ModelOutputWithPast(ModelOutput):
    """Backbone output: the last hidden state and the cache (``cache``, or ``past_key_values`` before transformers
    5.24: :data:`CACHE_NAME`)."""

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
@_cache_field
class MiniOmni2CausalLMOutputWithPast(ModelOutput):
    """Head output.

    Args:
        loss: sum of the 8 streams' mean cross-entropies (SPEC §9), when `labels` are given.
        stream_losses: the 8 per-stream losses, audio layers 1..7 then text, shape (8,).
        logits: the full head output (batch, seq, total_vocab).
        text_logits: view of the text columns (batch, seq, text_vocab).
        audio_logits: view of the audio columns, one slice per layer (batch, 7, seq, audio_vocab).
        listen_logits: (extension) the two listening-state logits (``TokenLayout.listen_states``) of the rows
            ``listen_logits_rows``, at every input column (n, seq, 2), when those rows are given (the sliced head).
        cache: the KV cache (``past_key_values`` before transformers 5.24: :data:`CACHE_NAME`).
    """

    loss: torch.FloatTensor | None = None
    stream_losses: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    text_logits: torch.FloatTensor | None = None
    audio_logits: torch.FloatTensor | None = None
    listen_logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class MiniOmni2Adapter(nn.Module):
    """LLaMA-MLP shaped adapter without bias: ``proj(silu(fc_1(x)) * fc_2(x))`` (SPEC §1)."""

    def __init__(self, in_dim: int, intermediate_size: int, out_dim: int):
        super().__init__()
        self.fc_1 = nn.Linear(in_dim, intermediate_size, bias=False)
        self.fc_2 = nn.Linear(in_dim, intermediate_size, bias=False)
        self.proj = nn.Linear(intermediate_size, out_dim, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.fc_1(features)) * self.fc_2(features))


class MiniOmni2ListenConvAdapter(nn.Module):
    """(extension, docs/duplex.md) The listening adapter of ``listen_adapter="conv"``: three 3x3 convolutions (the
    second and third with stride 2) over one frame's (columns, mel bins) image of features, then a linear layer to the
    hidden size. Shared along the mel axis, its filters hear a pattern at any pitch or formant height; the MLP adapter
    has to learn each height apart. Its layers keep torch's own (fan-in) initialisation: the library's small normal
    one leaves three stacked convolutions with almost no output."""

    def __init__(self, feature_shape: tuple[int, int], channels: int, out_dim: int):
        super().__init__()
        self.feature_shape = tuple(feature_shape)
        self.convs = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.SiLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.SiLU(),
        )
        columns, mels = (((size + 1) // 2 + 1) // 2 for size in self.feature_shape)  # two stride-2 convolutions
        self.proj = nn.Linear(channels * columns * mels, out_dim)
        for layer in (*self.convs, self.proj):
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                layer._mini_omni2_torch_init = True

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` (..., columns * mel bins), flattened as the front end lays them out -> (..., out_dim)."""
        images = features.reshape(-1, 1, *self.feature_shape)
        return self.proj(self.convs(images).flatten(1)).reshape(*features.shape[:-1], -1)


class MiniOmni2ListenRecurrentAdapter(nn.Module):
    """(extension, docs/duplex.md) The listening adapter of ``listen_adapter="gru"``: a small MLP per frame, then a
    GRU over a row's frames in order, then a linear layer to the hidden size. The language model's few layers must
    otherwise piece a spoken command together from one frame's embedding per position; the GRU hears it as it
    unfolds, at the cost of a state carried from step to step (:class:`MiniOmni2ListenState`). Torch's own
    initialisation, as for the convolutional adapter."""

    def __init__(self, feature_dim: int, width: int, layers: int, out_dim: int):
        super().__init__()
        self.fc_1 = nn.Linear(feature_dim, 2 * width)
        self.fc_2 = nn.Linear(2 * width, width)
        self.gru = nn.GRU(width, width, layers, batch_first=True)
        self.proj = nn.Linear(width, out_dim)
        for layer in (self.fc_1, self.fc_2, self.gru, self.proj):
            layer._mini_omni2_torch_init = True

    def forward(self, frames: torch.Tensor, counts: torch.Tensor, state: MiniOmni2ListenState | None = None):
        """``frames`` (n, feature_dim): the frames of several rows, row after row, each in order (``features[mask]``);
        ``counts``: frames per row (rows without frames are skipped). Returns (n, out_dim). ``state``: the rows'
        state before these frames, updated to after them."""
        counts = [int(c) for c in counts.tolist() if c]
        if not counts:
            return frames.new_zeros(0, self.proj.out_features)
        hidden = None if state is None else state.hidden
        if hidden is not None and hidden.shape[1] != len(counts):
            raise ValueError(f"listen_state holds {hidden.shape[1]} rows, but {len(counts)} rows have frames")
        inner = self.fc_2(F.silu(self.fc_1(frames)))
        out, hidden = self.gru(nn.utils.rnn.pack_sequence(inner.split(counts), enforce_sorted=False), hidden)
        if state is not None:
            state.hidden = hidden
        return self.proj(torch.cat(nn.utils.rnn.unpack_sequence(out)))


def _torch_default_init(layer: nn.Module) -> None:
    """torch's own initialisation of a linear, convolutional or recurrent layer (``reset_parameters``), through the
    library's init functions, which leave loaded weights alone."""
    if isinstance(layer, nn.RNNBase):
        bound = 1 / math.sqrt(layer.hidden_size)
        for weight in layer.parameters():
            init.uniform_(weight, -bound, bound)
        return
    init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
    if layer.bias is not None:
        bound = 1 / math.sqrt(layer.weight[0].numel())
        init.uniform_(layer.bias, -bound, bound)


def build_listen_projector(config: MiniOmni2Config) -> nn.Module | None:
    """The listening adapter ``config.listen_adapter`` names (None for codec input: the codes need none)."""
    if config.listen_feature_dim is None:
        return None
    hidden = config.text_config.hidden_size
    if config.listen_adapter == "conv":
        return MiniOmni2ListenConvAdapter(config.listen_feature_shape, config.listen_conv_channels, hidden)
    if config.listen_adapter == "gru":
        return MiniOmni2ListenRecurrentAdapter(
            config.listen_feature_dim, config.listen_gru_size, config.listen_gru_layers, hidden
        )
    return MiniOmni2Adapter(config.listen_feature_dim, config.adapter_intermediate_size, hidden)


class MiniOmni2Codec(nn.Module):
    """The SNAC 24 kHz codec, frozen, so that a checkpoint holds everything needed to speak.

    It maps between audio frames (T, 7) of the token layout and waveforms. SNAC's decoder adds learned noise;
    ``noise=False`` turns the noise blocks off (their input passes through), which makes decoding deterministic.
    """

    _is_mini_omni2_codec = True

    def __init__(self, codec_config: dict, layout: TokenLayout):
        super().__init__()
        from snac import SNAC

        self.layout = layout
        self.snac = SNAC(**codec_config)
        self.snac.requires_grad_(False)
        for module in self.snac.modules():
            module._is_mini_omni2_codec = True

    @property
    def sampling_rate(self) -> int:
        return int(self.snac.sampling_rate)

    @property
    def samples_per_frame(self) -> int:
        """Waveform samples of one audio frame: hop length x the coarsest stride (2,048 at 24 kHz)."""
        return int(self.snac.hop_length) * int(self.snac.vq_strides[0])

    def _set_noise(self, enabled: bool) -> list:
        from snac.layers import NoiseBlock

        if enabled:
            return []
        return [m.register_forward_hook(lambda mod, args, out: args[0]) for m in self.snac.modules() if isinstance(m, NoiseBlock)]

    @torch.no_grad()
    def decode(self, frames: torch.Tensor, noise: bool = True) -> torch.Tensor:
        """Frames (batch, T, 7) of codec codes -> waveforms (batch, T * samples_per_frame)."""
        if frames.ndim == 2:
            frames = frames.unsqueeze(0)
        if frames.shape[1] == 0:
            return torch.zeros(frames.shape[0], 0, device=frames.device)
        if not bool(self.layout.is_code(frames).all()):
            raise ValueError("codec frames must hold codes only; use TokenLayout.sanitize_frames first")
        device = next(self.snac.parameters()).device
        codes = [level.to(device) for level in self.layout.frames_to_snac(frames.long())]
        hooks = self._set_noise(noise)
        try:
            audio = self.snac.decode(codes)
        finally:
            for hook in hooks:
                hook.remove()
        return audio[:, 0].float()

    @torch.no_grad()
    def encode(self, waveform: torch.Tensor) -> torch.Tensor:
        """Waveforms (batch, samples) at the codec's rate -> frames (batch, T, 7) of codes."""
        if waveform.ndim == 1:
            waveform = waveform.unsqueeze(0)
        param = next(self.snac.parameters())
        codes = self.snac.encode(waveform[:, None].to(param.device, param.dtype))
        return self.layout.snac_to_frames(codes)


class MiniOmni2PreTrainedModel(PreTrainedModel):
    config: MiniOmni2Config
    config_class = MiniOmni2Config
    base_model_prefix = "model"
    input_modalities = ("image", "audio", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer", "WhisperEncoderLayer", "CLIPEncoderLayer", "MiniOmni2Codec"]
    _skip_keys_device_placement = [CACHE_NAME]
    _keep_in_fp32_modules_strict = ["codec"]  # SNAC decodes in float32 whatever the backbone dtype
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as transformers does, with the full ``auto_map`` (config, base model and head) in config.json, the
        pipeline (``custom_pipelines``), the model card and the endpoint handler (``hub_mini_omni2``)."""
        if self._auto_class is not None:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        from .hub_mini_omni2 import save_with_hub_files

        return save_with_hub_files(self, super().save_pretrained, save_directory, *args, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the model with its own card (transformers' would write a blank one); see ``hub_mini_omni2``."""
        from .hub_mini_omni2 import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        # The codec keeps SNAC's own initialisation (weight-normed convolutions, snake alphas).
        if getattr(module, "_is_mini_omni2_codec", False):
            return
        if getattr(module, "_mini_omni2_torch_init", False):
            _torch_default_init(module)
            return
        super()._init_weights(module)


class MiniOmni2Model(MiniOmni2PreTrainedModel):
    """Encoders, adapters and the Qwen2 backbone; embeds the 8 streams and places the features."""

    # A full checkpoint also holds the head and the codec, which belong to MiniOmni2ForConditionalGeneration: loading
    # the base model from it (AutoModel) drops them on purpose, without a load report.
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\.", r"^codec\."]

    def __init__(self, config: MiniOmni2Config):
        super().__init__(config)
        hidden = config.text_config.hidden_size
        self.language_model = AutoModel.from_config(config.text_config)
        self.audio_tower = WhisperEncoder._from_config(config.audio_config)
        self.audio_projector = MiniOmni2Adapter(config.audio_feature_dim, config.adapter_intermediate_size, hidden)
        if config.has_vision:
            self.vision_tower = CLIPVisionModelWithProjection._from_config(config.vision_config)
            self.vision_projector = MiniOmni2Adapter(
                config.vision_feature_dim, config.adapter_intermediate_size, hidden
            )
        else:
            self.vision_tower = None
            self.vision_projector = None
        # (extension, docs/duplex.md) the listening row's audio features replace its audio-stream embeddings
        self.listen_projector = build_listen_projector(config)
        self.post_init()

    @property
    def layout(self) -> TokenLayout:
        return self.config.token_layout

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_audio_features(self, input_features: torch.Tensor) -> torch.Tensor:
        """Log-mel (n, 80, 3000) -> adapted Whisper frames (n, 1500, hidden)."""
        encoder_dtype = self.audio_tower.conv1.weight.dtype
        frames = self.audio_tower(input_features.to(encoder_dtype), return_dict=True).last_hidden_state
        return self.audio_projector(frames.to(self.audio_projector.fc_1.weight.dtype))

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels (n, 3, 224, 224) -> adapted CLIP tokens (n, 50, hidden).

        All 50 tokens go through the post layer norm and the 512-wide projection (SPEC §5); transformers'
        CLIPVisionModel normalises only the pooled token, so both are applied here.
        """
        if self.vision_tower is None:
            raise ValueError("This model has no vision encoder (a Mini-Omni model); it cannot take images.")
        clip = self.vision_tower.vision_model
        dtype = self.vision_tower.visual_projection.weight.dtype
        tokens = clip(pixel_values=pixel_values.to(dtype), return_dict=True).last_hidden_state
        tokens = self.vision_tower.visual_projection(clip.post_layernorm(tokens))
        return self.vision_projector(tokens.to(self.vision_projector.fc_1.weight.dtype))

    @staticmethod
    def _place_features(
        audio_embeds: torch.Tensor, features: torch.Tensor, mask: torch.Tensor, kind: str, exact: int | None
    ) -> torch.Tensor:
        """Replace the audio-stream embeddings (batch, 7, seq, hidden) at ``mask`` by the features.

        Feature row k goes to the k-th batch row that has any masked position; its first ``mask.sum()`` frames
        are used, in order.
        """
        counts = mask.sum(dim=1)
        rows_with = counts > 0
        if int(rows_with.sum()) != features.shape[0]:
            raise ValueError(
                f"{features.shape[0]} {kind} inputs given but {int(rows_with.sum())} rows have {kind} positions"
            )
        used = counts[rows_with]
        if exact is not None and bool((used != exact).any()):
            raise ValueError(f"every row with {kind} positions must have exactly {exact} of them, got {used.tolist()}")
        if bool((used > features.shape[1]).any()):
            raise ValueError(f"{kind} positions ({int(used.max())}) exceed the {features.shape[1]} encoder frames")
        frame_mask = torch.arange(features.shape[1], device=features.device)[None, :] < used[:, None]
        selected = features[frame_mask].to(audio_embeds.dtype)
        placed = audio_embeds.new_zeros(audio_embeds.shape[0], audio_embeds.shape[2], audio_embeds.shape[3])
        placed = placed.masked_scatter(mask[..., None], selected)
        return torch.where(mask[:, None, :, None], placed[:, None], audio_embeds)

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        """Every stream's ids lie in its own slice of the vocabulary (SPEC §2), else a ValueError naming it."""
        layout = self.layout
        if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
            raise TypeError(f"input_ids must be integer ids, got dtype {input_ids.dtype}")
        offsets = layout.stream_offsets(input_ids.device)[None, :, None]
        sizes = torch.tensor(layout.stream_vocab_sizes(), device=input_ids.device)[None, :, None]
        local = input_ids - offsets
        outside = (local < 0) | (local >= sizes)
        if bool(outside.any()):
            stream = int(outside.any(dim=2).any(dim=0).nonzero()[0])
            low = int(offsets[0, stream, 0])
            bad = input_ids[:, stream][outside[:, stream]][:5].tolist()
            name = "text" if stream == layout.text_stream else f"audio layer {stream + 1}"
            raise ValueError(
                f"input_ids of stream {stream} ({name}) must lie in [{low}, {low + int(sizes[0, stream, 0])}), got "
                f"{bad}; build prompts with the processor or TokenLayout"
            )

    def _check_features_given(
        self, input_ids: torch.Tensor, audio_feature_mask: torch.Tensor | None, image_feature_mask: torch.Tensor | None
    ) -> None:
        """A prompt that starts an audio or image input (``input_a`` or ``image`` then ``pad_a`` on the first audio
        stream, SPEC §4) must come with its feature positions: without them the model would not hear or see. A
        listening row (its prompt's text is ``n_irq``) hears its own frames instead."""
        if input_ids.shape[-1] < 2:  # a decoding step: no prompt
            return
        layout = self.layout
        first_layer = input_ids[:, 0]
        pad = layout.layershift(layout.pad_a, 0)
        starts = (first_layer != pad).long().argmax(dim=1)  # the first non-padding position of each row
        rows = torch.arange(first_layer.shape[0], device=first_layer.device)
        marker = first_layer[rows, starts]
        follows = first_layer[rows, (starts + 1).clamp(max=first_layer.shape[1] - 1)]
        opens = (follows == pad) & (starts + 1 < first_layer.shape[1])
        listening = input_ids[rows, layout.text_stream, starts] == layout.n_irq  # a listening row (docs/duplex.md)
        opens &= ~listening
        for kind, token, mask in (
            ("audio", layout.input_a, audio_feature_mask),
            ("image", layout.image, image_feature_mask),
        ):
            needs = opens & (marker == layout.layershift(token, 0))
            if mask is not None:
                needs &= ~mask.bool().any(dim=1)
            if bool(needs.any()):
                row = int(needs.nonzero()[0])
                raise ValueError(
                    f"row {row} of input_ids holds a prompt with {kind} positions but no {kind} features are given "
                    f"for it: pass input_features/audio_feature_mask (audio) or pixel_values/image_feature_mask "
                    f"(images), as the processor returns them"
                )

    def embed(
        self,
        input_ids: torch.LongTensor,
        input_features: torch.Tensor | None = None,
        audio_feature_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_feature_mask: torch.Tensor | None = None,
        listen_features: torch.Tensor | None = None,
        listen_feature_mask: torch.Tensor | None = None,
        listen_state: MiniOmni2ListenState | None = None,
    ) -> torch.Tensor:
        """Input embeddings (batch, seq, hidden): the mean of the 8 stream embeddings, features placed (SPEC §3).

        ``listen_features`` (batch, seq, listen_feature_dim) go through ``listen_projector`` at the positions of
        ``listen_feature_mask`` (batch, seq): the listening row's frames (extension, docs/duplex.md). The ``"gru"``
        adapter hears each row's frames in order from ``listen_state`` (a row's start when None) and updates it.
        """
        layout = self.layout
        if input_ids.ndim != 3 or input_ids.shape[1] != layout.num_streams:
            raise ValueError(f"input_ids must have shape (batch, {layout.num_streams}, seq), got {tuple(input_ids.shape)}")
        if not torch.compiler.is_compiling():
            self._check_input_ids(input_ids)
            self._check_features_given(input_ids, audio_feature_mask, image_feature_mask)
        embeds = self.get_input_embeddings()(input_ids)  # (batch, 8, seq, hidden)
        audio_embeds = embeds[:, : layout.num_audio_layers]
        if (input_features is None) != (audio_feature_mask is None or not bool(audio_feature_mask.any())):
            raise ValueError("input_features and a non-empty audio_feature_mask must be given together")
        if input_features is not None:
            features = self.get_audio_features(input_features)
            audio_embeds = self._place_features(audio_embeds, features, audio_feature_mask.bool(), "audio", None)
        if (pixel_values is None) != (image_feature_mask is None or not bool(image_feature_mask.any())):
            raise ValueError("pixel_values and a non-empty image_feature_mask must be given together")
        if pixel_values is not None:
            features = self.get_image_features(pixel_values)
            audio_embeds = self._place_features(
                audio_embeds, features, image_feature_mask.bool(), "image", layout.num_image_tokens
            )
        if listen_features is not None or listen_feature_mask is not None:
            audio_embeds = self._place_listen_features(audio_embeds, listen_features, listen_feature_mask, listen_state)
        text_embeds = embeds[:, layout.text_stream :]
        return torch.cat([audio_embeds, text_embeds], dim=1).mean(dim=1)

    def _place_listen_features(
        self,
        audio_embeds: torch.Tensor,
        features: torch.Tensor | None,
        mask: torch.Tensor | None,
        state: MiniOmni2ListenState | None = None,
    ) -> torch.Tensor:
        """The listening adapter's output of ``features`` (batch, seq, dim) replaces the 7 audio-stream embeddings
        (batch, 7, seq, hidden) at ``mask`` (batch, seq); a recurrent adapter goes on from ``state``."""
        if self.listen_projector is None:
            raise ValueError(
                f"this model's listening row hears {self.config.listen_input!r}, not features: it has no listen_projector"
            )
        if features is None or mask is None:
            raise ValueError("listen_features and listen_feature_mask must be given together")
        batch, seq = audio_embeds.shape[0], audio_embeds.shape[2]
        dim = self.config.listen_feature_dim
        if features.shape != (batch, seq, dim) or mask.shape != (batch, seq):
            raise ValueError(
                f"listen_features must have shape ({batch}, {seq}, {dim}) and listen_feature_mask ({batch}, {seq}), "
                f"got {tuple(features.shape)} and {tuple(mask.shape)}"
            )
        mask = mask.bool()
        frames = features[mask].to(next(self.listen_projector.parameters()).dtype)
        if isinstance(self.listen_projector, MiniOmni2ListenRecurrentAdapter):
            projected = self.listen_projector(frames, mask.sum(1), state)
        else:
            projected = self.listen_projector(frames)
        placed = audio_embeds.new_zeros(batch, seq, audio_embeds.shape[3]).masked_scatter(
            mask[..., None], projected.to(audio_embeds.dtype)
        )
        return torch.where(mask[:, None, :, None], placed[:, None], audio_embeds)

    def listen_front_end(self, codec=None, **kwargs) -> MiniOmni2ListenFrontEnd:
        """A streaming front end for this model's listening row (``codec``: the model's, for codec input)."""
        return MiniOmni2ListenFrontEnd.from_config(self.config, codec=codec, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        audio_feature_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_feature_mask: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
        use_cache: bool | None = None,
        listen_features: torch.Tensor | None = None,
        listen_feature_mask: torch.Tensor | None = None,
        listen_state: MiniOmni2ListenState | None = None,
        **kwargs,
    ) -> MiniOmni2ModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Give exactly one of input_ids (batch, 8, seq) or inputs_embeds")
        if audio_lengths is not None and audio_feature_mask is not None:
            if not torch.equal(audio_lengths.to(audio_feature_mask.device).long(), audio_feature_mask.sum(1)[audio_feature_mask.any(1)]):
                raise ValueError("audio_lengths disagree with the number of audio positions per row")
        if inputs_embeds is None:
            inputs_embeds = self.embed(
                input_ids, input_features, audio_feature_mask, pixel_values, image_feature_mask,
                listen_features, listen_feature_mask, listen_state,
            )
        if position_ids is None and attention_mask is not None:
            position_ids = positions_from_attention_mask(attention_mask, inputs_embeds.shape[1])
        cache = _given_cache(past_key_values, kwargs)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            return_dict=True,
            **{CACHE_NAME: cache},
            **kwargs,
        )
        return MiniOmni2ModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


def positions_from_attention_mask(attention_mask: torch.Tensor, seq_len: int) -> torch.LongTensor:
    """Positions that count only real tokens, so a left-padded row sees the same positions as alone."""
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.clamp(min=0)
    return positions[:, -seq_len:]


def stream_cross_entropies(logits: torch.Tensor, labels: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Per-stream mean cross-entropy (8,), each stream over its own slice of the head (SPEC §2, §9).

    ``labels`` (batch, 8, seq) hold the same global ids as ``input_ids`` (-100 ignored) and are shifted here:
    the logits at position t predict the labels at t+1. A stream with no label contributes 0.
    """
    if labels.ndim != 3 or labels.shape[1] != layout.num_streams:
        raise ValueError(f"labels must have shape (batch, {layout.num_streams}, seq), got {tuple(labels.shape)}")
    shift_logits = logits[:, :-1]
    shift_labels = labels[:, :, 1:].to(logits.device)
    losses = []
    offsets = layout.stream_offsets().tolist()
    for stream, (offset, size) in enumerate(zip(offsets, layout.stream_vocab_sizes())):
        target = shift_labels[:, stream]
        ignored = target == IGNORE_INDEX
        local = torch.where(ignored, target, target - offset)
        if bool(((local < 0) | (local >= size))[~ignored].any()):
            raise ValueError(f"labels of stream {stream} fall outside its vocabulary slice [{offset}, {offset + size})")
        stream_logits = shift_logits[..., offset : offset + size].float()
        total = F.cross_entropy(stream_logits.flatten(0, 1), local.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        losses.append(total / (~ignored).sum().clamp(min=1))
    return torch.stack(losses)


class MiniOmni2ForConditionalGeneration(MiniOmni2GenerationMixin, MiniOmni2PreTrainedModel, GenerationMixin):
    """Mini-Omni2 with its LM head over the whole 181,120-id vocabulary and the SNAC codec."""

    _tp_plan = {"lm_head": "colwise_gather_output"}
    # The loss is a sum of per-stream means and ignores `num_items_in_batch`: let Trainer scale it for gradient
    # accumulation itself (otherwise it assumes the model normalised by the token count and does not).
    accepts_loss_kwargs = False

    def __init__(self, config: MiniOmni2Config):
        super().__init__(config)
        self.model = MiniOmni2Model(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.total_vocab_size, bias=False)
        self.codec = MiniOmni2Codec(config.codec_config, config.token_layout) if config.codec_config else None
        self.post_init()

    @property
    def layout(self) -> TokenLayout:
        return self.config.token_layout

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, with the codec frozen again (loading makes fresh trainable tensors)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if getattr(model, "codec", None) is not None:
            model.codec.requires_grad_(False)
        return loaded

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_audio_features(self, input_features: torch.Tensor) -> torch.Tensor:
        return self.model.get_audio_features(input_features)

    def quantize_int8(self, head: bool = True) -> "MiniOmni2ForConditionalGeneration":
        """Int8 weight-only linear layers (torchao's ``Int8WeightOnlyConfig``) for the language model, and its head
        unless ``head=False``; activations stay in the model's dtype. The encoders, adapters and codec are untouched
        (they run once per request, or in float32). Needs ``pip install torchao`` (the ``int8`` extra).

        The weights take half the bytes of bfloat16, which is what a decoding step on a CPU is bound by; the speed
        gain needs ``torch.compile`` of the step on CPUs (see docs/benchmarks.md)."""
        try:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
        except ImportError as error:
            raise ImportError("int8 weight-only layers need torchao: pip install torchao (or mini-omni2[int8])") from error
        quantize_(self.model.language_model, Int8WeightOnlyConfig())
        if head:
            quantize_(self, Int8WeightOnlyConfig(), filter_fn=lambda module, name: name == "lm_head")
        return self

    def sliced_head(
        self, hidden: torch.Tensor, text_rows: torch.LongTensor | None, audio_rows: torch.LongTensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's text columns for the rows ``text_rows`` and its audio columns for ``audio_rows`` of ``hidden``
        (batch, seq, hidden): (n_text, seq, text_vocab) and (n_audio, 7, seq, audio_vocab). A speech row needs only
        the 29,120 audio columns, a text row only the 152,000 text columns (SPEC §2): the rest is never computed."""
        layout = self.layout
        weight = self.lm_head.weight
        empty = torch.zeros(0, dtype=torch.long, device=hidden.device)
        text_rows = empty if text_rows is None else text_rows.to(hidden.device)
        audio_rows = empty if audio_rows is None else audio_rows.to(hidden.device)
        text_logits = F.linear(hidden[text_rows], weight[: layout.text_vocab_size])
        audio_logits = F.linear(hidden[audio_rows], weight[layout.text_vocab_size : layout.total_vocab_size])
        audio_logits = audio_logits.unflatten(-1, (layout.num_audio_layers, layout.audio_vocab_size)).transpose(1, 2)
        return text_logits, audio_logits

    def listen_state_head(self, hidden: torch.Tensor, rows: torch.LongTensor) -> torch.Tensor:
        """The head's two listening-state columns (``TokenLayout.listen_states``) for the rows ``rows`` of ``hidden``
        (batch, seq, hidden), at every column: (n, seq, 2). A listening row reads only these (docs/duplex.md), so the
        other 152,000 text columns of its every frame are never computed."""
        states = torch.tensor(self.layout.listen_states, device=hidden.device)
        return F.linear(hidden[rows.to(hidden.device)], self.lm_head.weight[states])

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values)

    def listen_front_end(self, **kwargs) -> MiniOmni2ListenFrontEnd:
        """A streaming front end for the listening row (extension, docs/duplex.md), with this model's codec."""
        return self.model.listen_front_end(codec=self.codec, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        audio_feature_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_feature_mask: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        text_logits_rows: torch.LongTensor | None = None,
        audio_logits_rows: torch.LongTensor | None = None,
        listen_logits_rows: torch.LongTensor | None = None,
        listen_features: torch.Tensor | None = None,
        listen_feature_mask: torch.Tensor | None = None,
        listen_state: MiniOmni2ListenState | None = None,
        **kwargs,
    ) -> MiniOmni2CausalLMOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch, 8, seq)`): audio layers 1..7 then text, global ids.
        input_features (`torch.FloatTensor` of shape `(n_audio, 80, 3000)`): log-mel of each audio, in row order.
        audio_feature_mask (`torch.BoolTensor` of shape `(batch, seq)`): positions that take audio frames.
        pixel_values (`torch.FloatTensor` of shape `(n_images, 3, 224, 224)`): each image, in row order.
        image_feature_mask (`torch.BoolTensor` of shape `(batch, seq)`): positions that take the 50 CLIP tokens.
        listen_features (`torch.FloatTensor` of shape `(batch, seq, listen_feature_dim)`): (extension) the listening
            row's audio features at the positions of `listen_feature_mask` (`(batch, seq)`), docs/duplex.md.
        listen_state (`MiniOmni2ListenState`): (extension) where a `"gru"` listening adapter goes on from, updated in
            place (a row fed in several calls with a cache); `None`: each row's frames from its start.
        labels (`torch.LongTensor` of shape `(batch, 8, seq)`): targets in input-id space, -100 ignored.
        text_logits_rows, audio_logits_rows (`torch.LongTensor` of shape `(n,)`): the sliced head used by the decoding
            engine: when either is given, only the text columns of the rows `text_logits_rows` and the audio columns
            of the rows `audio_logits_rows` are computed; `logits` is then `None`, `text_logits` has shape
            `(len(text_logits_rows), kept, text_vocab)` and `audio_logits` `(len(audio_logits_rows), 7, kept,
            audio_vocab)`, in the order of the indices.
        listen_logits_rows (`torch.LongTensor` of shape `(n,)`): (extension) rows of the sliced head whose only
            output is their two listening-state logits (`TokenLayout.listen_states`), at every input column (a
            listening row catching up reads each frame it was fed, docs/duplex.md): `listen_logits` `(n, seq, 2)`.
        """
        kwargs.pop("num_items_in_batch", None)  # each stream's loss is a mean over its own targets (SPEC §9)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            input_features=input_features,
            audio_feature_mask=audio_feature_mask,
            pixel_values=pixel_values,
            image_feature_mask=image_feature_mask,
            audio_lengths=audio_lengths,
            use_cache=use_cache,
            listen_features=listen_features,
            listen_feature_mask=listen_feature_mask,
            listen_state=listen_state,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        listen_logits = None
        if listen_logits_rows is not None:
            listen_logits = self.listen_state_head(hidden, listen_logits_rows)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        if text_logits_rows is not None or audio_logits_rows is not None or listen_logits_rows is not None:
            if labels is not None:
                raise ValueError(
                    "labels need the full head; do not pass text_logits_rows / audio_logits_rows / listen_logits_rows"
                )
            text_logits, audio_logits = self.sliced_head(hidden, text_logits_rows, audio_logits_rows)
            return MiniOmni2CausalLMOutputWithPast(
                text_logits=text_logits,
                audio_logits=audio_logits,
                listen_logits=listen_logits,
                **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
                hidden_states=outputs.hidden_states,
                attentions=outputs.attentions,
            )
        logits = self.lm_head(hidden)
        text_logits, audio_logits = self.layout.split_logits(logits)
        loss = stream_losses = None
        if labels is not None:
            stream_losses = stream_cross_entropies(logits, labels, self.layout)
            loss = stream_losses.sum()
        return MiniOmni2CausalLMOutputWithPast(
            loss=loss,
            stream_losses=stream_losses,
            logits=logits,
            text_logits=text_logits,
            audio_logits=audio_logits.transpose(1, 2),
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "MiniOmni2PreTrainedModel",
    "MiniOmni2Model",
    "MiniOmni2ForConditionalGeneration",
    "MiniOmni2Codec",
    "MiniOmni2Adapter",
    "MiniOmni2ListenConvAdapter",
    "MiniOmni2ListenRecurrentAdapter",
    "native_bfloat16",
    "resolve_dtype",
]
