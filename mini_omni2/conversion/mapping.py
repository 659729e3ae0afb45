"""Name and shape mapping from the original Mini-Omni / Mini-Omni2 release files to this package (issue 4).

Four sources, each a flat ``{name: tensor}`` dict (SPEC §8):

- ``lit_model.pth`` (LitGPT naming): backbone, LM head and the adapters;
- ``small.pt`` (openai-whisper): ``encoder.*`` is used, ``decoder.*`` is dropped on purpose;
- ``ViT-B-32.pt`` (OpenAI CLIP): ``visual.*`` is used, the text tower is dropped on purpose;
- SNAC ``pytorch_model.bin``: every tensor, weight-norm names in either spelling.

Everything here is pure (no file access): :func:`build_config` turns the release's configs into a
:class:`~mini_omni2.MiniOmni2Config`, and :func:`map_state_dicts` turns the source dicts into the target dict while
recording every problem; :class:`ConversionError` reports all of them at once.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from ..configuration_mini_omni2 import MiniOmni2Config

#: Text specials after the Qwen2 vocabulary: a fixed fact of the release (151,936 + 64 = 152,000), not in its yaml.
RELEASE_NUM_TEXT_SPECIAL_TOKENS = 64

#: Fields of the release's LitGPT ``Config`` dataclass and their defaults (``litgpt/config.py`` of the release).
#: ``model_config.yaml`` holds a subset; the missing ones take these defaults, exactly as ``Config.from_file`` does.
LITGPT_DEFAULTS: dict[str, Any] = dict(
    name="",
    hf_config={},
    scale_embeddings=False,
    block_size=4096,
    vocab_size=50254,
    padding_multiple=512,
    padded_vocab_size=None,
    n_layer=16,
    n_head=32,
    head_size=None,
    n_embd=4096,
    rotary_percentage=0.25,
    parallel_residual=True,
    bias=True,
    lm_head_bias=False,
    n_query_groups=None,
    shared_attention_norm=False,
    norm_class_name="LayerNorm",
    norm_eps=1e-5,
    mlp_class_name="GptNeoxMLP",
    gelu_approximate="none",
    intermediate_size=None,
    rope_condense_ratio=1,
    rope_base=10000,
    n_expert=0,
    n_expert_per_token=0,
    add_qkv_bias=None,
    prompt_vocab_size=None,
    attn_dropout=0.0,
    pos_type="rope",
    force_align=False,
    use_pretrain_phoneme_emb=False,
    tie_word_embeddings=False,
    text_vocab_size=152000,
    cat_audio_vocab_size=29120,
    audio_vocab_size=4160,
    whisper_adapter_dim=768,
    vision_adapter_dim=512,
    post_adapter=False,
    post_adapter_layers=6,
    asr_adapter="llamamlp",
)

#: The type of the release's Config fields whose default is None (the rest take the type of their default).
LITGPT_OPTIONAL_TYPES = dict(
    padded_vocab_size=int, head_size=int, n_query_groups=int, intermediate_size=int, add_qkv_bias=bool,
    prompt_vocab_size=int,
)
#: Sizes that must be positive (the rest of the integer fields may be 0).
LITGPT_POSITIVE = (
    "block_size", "n_layer", "n_head", "head_size", "n_embd", "n_query_groups", "intermediate_size",
    "padded_vocab_size", "text_vocab_size", "audio_vocab_size", "whisper_adapter_dim", "vision_adapter_dim",
    "rope_condense_ratio",
)

# Source labels used in messages.
LIT, WHISPER, CLIP, SNAC = "lit_model.pth", "small.pt", "ViT-B-32.pt", "SNAC pytorch_model.bin"


class ConversionError(ValueError):
    """A conversion that cannot be done exactly; ``problems`` lists every reason found, one line each."""

    def __init__(self, problems: Iterable[str], header: str = "The checkpoint cannot be converted exactly"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{header} ({len(self.problems)} problem{'s' * (len(self.problems) != 1)}):\n{lines}")


@dataclass
class ConversionReport:
    """What a conversion did: tensors written, source tensors used, and those dropped on purpose (by reason)."""

    num_target_tensors: int = 0
    num_source_tensors_used: int = 0
    dropped: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"{self.num_target_tensors} tensors written from {self.num_source_tensors_used} source tensors",
        ]
        for reason, names in self.dropped.items():
            lines.append(f"dropped on purpose: {len(names)} tensors ({reason})")
        lines.extend(self.notes)
        return "\n".join(lines)


class SourceTensors:
    """A source state dict that records which names were taken, so that unused tensors can be reported."""

    def __init__(self, label: str, tensors: Mapping[str, torch.Tensor], problems: list[str]):
        self.label = label
        self.tensors = dict(tensors)
        self.problems = problems
        self.used: set[str] = set()
        self.dropped: set[str] = set()
        self.last: str | None = None  # the tensor taken last, named in messages about what it became

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor | None:
        """The tensor ``name`` (marked used), or None with a problem recorded if it is missing or mis-shaped."""
        if name not in self.tensors:
            self.problems.append(f"{self.label}: missing tensor {name!r}")
            return None
        self.used.add(name)
        self.last = f"{self.label} {name!r}"
        tensor = self.tensors[name]
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            self.problems.append(
                f"{self.label}: {name!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}"
            )
            return None
        return tensor

    def drop(self, predicate: Callable[[str], bool]) -> list[str]:
        names = sorted(n for n in self.tensors if predicate(n) and n not in self.used)
        self.dropped.update(names)
        return names

    def unused(self) -> list[str]:
        return sorted(n for n in self.tensors if n not in self.used and n not in self.dropped)


class Targets(dict):
    """Target tensors of one source; remembers which source tensor each came from (the one taken last)."""

    def __init__(self, src: SourceTensors):
        super().__init__()
        self.src = src
        self.origin: dict[str, str | None] = {}

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        self.origin[name] = self.src.last
        super().__setitem__(name, tensor)


# ----------------------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------------------
def litgpt_config(raw: Mapping[str, Any], problems: list[str], notes: list[str]) -> dict[str, Any]:
    """The effective LitGPT config of a ``model_config.yaml``: its values over the release's defaults, with
    ``Config.__post_init__``'s derived values, and a problem for every option this package cannot reproduce."""
    unknown = sorted(set(raw) - set(LITGPT_DEFAULTS))
    if unknown:
        notes.append(f"model_config.yaml: ignored keys unknown to the release's LitGPT Config: {', '.join(unknown)}")
    cfg = dict(LITGPT_DEFAULTS)
    cfg.update({k: v for k, v in raw.items() if k in LITGPT_DEFAULTS and _litgpt_value_ok(k, v, problems)})
    if cfg["head_size"] is None:
        if cfg["n_embd"] % cfg["n_head"]:
            problems.append(f"model_config.yaml: n_embd {cfg['n_embd']} is not a multiple of n_head {cfg['n_head']}")
        cfg["head_size"] = cfg["n_embd"] // cfg["n_head"]
    if cfg["n_query_groups"] is None:
        cfg["n_query_groups"] = cfg["n_head"]
    if cfg["n_head"] % cfg["n_query_groups"]:
        problems.append(
            f"model_config.yaml: n_head {cfg['n_head']} is not a multiple of n_query_groups {cfg['n_query_groups']}"
        )
    if cfg["add_qkv_bias"] is None:
        cfg["add_qkv_bias"] = cfg["bias"]
    if cfg["padded_vocab_size"] is None:
        problems.append("model_config.yaml: padded_vocab_size is missing (the released file sets it)")
    elif "cat_audio_vocab_size" in raw and cfg["cat_audio_vocab_size"] != cfg["padded_vocab_size"] - cfg["text_vocab_size"]:
        problems.append(
            f"model_config.yaml: cat_audio_vocab_size {cfg['cat_audio_vocab_size']} != padded_vocab_size - "
            f"text_vocab_size ({cfg['padded_vocab_size'] - cfg['text_vocab_size']})"
        )
    if cfg["intermediate_size"] is None:
        problems.append("model_config.yaml: intermediate_size is missing (LLaMAMLP needs it)")
    if cfg.get("post_adapter"):
        # The release's inference code sets `config.post_adapter = False` before building the model.
        notes.append("model_config.yaml: post_adapter is ignored, as the release's load_model does")
    cfg["post_adapter"] = False

    required = {
        "mlp_class_name": "LLaMAMLP",
        "norm_class_name": "RMSNorm",
        "parallel_residual": False,
        "shared_attention_norm": False,
        "rotary_percentage": 1.0,
        "rope_condense_ratio": 1,
        "scale_embeddings": False,
        "bias": False,
        "add_qkv_bias": True,
        "lm_head_bias": False,
        "tie_word_embeddings": False,
        "n_expert": 0,
        "pos_type": "rope",
        "asr_adapter": "llamamlp",
    }
    for key, value in required.items():
        if cfg[key] != value:
            problems.append(
                f"model_config.yaml: {key}={cfg[key]!r} is not supported (the Qwen2 backbone of Mini-Omni needs "
                f"{value!r})"
            )
    if "Gemma" in str(cfg["name"]) and cfg["norm_class_name"] == "RMSNorm":
        problems.append("model_config.yaml: a Gemma-named config uses unit-offset RMSNorm, which is not supported")
    return cfg


def _litgpt_value_ok(key: str, value: Any, problems: list[str]) -> bool:
    """Whether a yaml value has the type of the release's Config field (a problem is recorded if not; the field then
    keeps its default, so that every other problem is still found)."""
    default = LITGPT_DEFAULTS[key]
    kind = LITGPT_OPTIONAL_TYPES.get(key, type(default))
    if value is None and (default is None or key in LITGPT_OPTIONAL_TYPES):
        return True
    if kind is float:
        try:
            ok = not isinstance(value, bool) and float(value) == float(value)  # numbers and numeric strings, not NaN
        except (TypeError, ValueError):
            ok = False
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 1 if key in LITGPT_POSITIVE else value >= 0)
    else:
        ok = isinstance(value, kind)
    if not ok:
        what = {int: "a positive integer" if key in LITGPT_POSITIVE else "a non-negative integer", float: "a number"}
        problems.append(f"model_config.yaml: {key} is {value!r}, expected {what.get(kind, kind.__name__)}")
    return ok


def _positive_ints(values: Mapping[str, Any], keys: Iterable[str], label: str, problems: list[str]) -> bool:
    bad = [k for k in keys if k in values and (isinstance(values[k], bool) or not isinstance(values[k], int) or values[k] < 1)]
    for key in bad:
        problems.append(f"{label}: {key} is {values[key]!r}, expected a positive integer")
    return not bad


def whisper_config(dims: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """``WhisperConfig`` kwargs from openai-whisper ``dims`` (only the encoder is built; MLP width 4 x state)."""
    needed = ["n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer"]
    missing = [k for k in needed if k not in dims]
    if missing:
        problems.append(f"{WHISPER}: dims lacks {', '.join(missing)}")
        return {}
    optional = ["n_vocab", "n_text_ctx", "n_text_state", "n_text_head", "n_text_layer"]
    if not _positive_ints(dims, needed + optional, f"{WHISPER} dims", problems):
        return {}
    state = int(dims["n_audio_state"])
    config = dict(
        num_mel_bins=int(dims["n_mels"]),
        max_source_positions=int(dims["n_audio_ctx"]),
        d_model=state,
        encoder_attention_heads=int(dims["n_audio_head"]),
        encoder_layers=int(dims["n_audio_layer"]),
        encoder_ffn_dim=4 * state,
        activation_function="gelu",
        scale_embedding=False,
    )
    # Decoder sizes are recorded for completeness; no decoder parameters are built.
    for key, hf_key in (
        ("n_vocab", "vocab_size"),
        ("n_text_ctx", "max_target_positions"),
        ("n_text_head", "decoder_attention_heads"),
        ("n_text_layer", "decoder_layers"),
    ):
        if key in dims:
            config[hf_key] = int(dims[key])
    if "n_text_state" in dims:
        config["decoder_ffn_dim"] = 4 * int(dims["n_text_state"])
    if state % config["encoder_attention_heads"]:
        problems.append(f"{WHISPER}: n_audio_state {state} is not a multiple of n_audio_head")
    return config


def clip_config(state: Mapping[str, torch.Tensor], problems: list[str], num_heads: int | None = None) -> dict[str, Any]:
    """``CLIPVisionConfig`` kwargs from the shapes of an OpenAI CLIP ``visual.*`` state dict.

    The rules are OpenAI's ``build_model``: width from ``conv1``, patch size from its kernel, grid from the
    positional embedding, layers from the ``resblocks`` count, MLP width 4 x width, heads ``width // 64`` (unless the
    TorchScript archive says ``num_heads``), output dim from ``proj``.
    """
    needed = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj"]
    missing = [k for k in needed if k not in state]
    if missing:
        problems.append(f"{CLIP}: missing {', '.join(repr(k) for k in missing)}; is this an OpenAI CLIP ViT checkpoint?")
        return {}
    conv = state["visual.conv1.weight"]
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    positions = int(state["visual.positional_embedding"].shape[0])
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        problems.append(f"{CLIP}: {positions} positions is not a square grid plus the class token")
    layers = len({m.group(1) for k in state if (m := re.match(r"visual\.transformer\.resblocks\.(\d+)\.", k))})
    heads = num_heads if num_heads else width // 64
    if heads < 1 or width % heads:
        problems.append(f"{CLIP}: cannot split width {width} into heads (got {heads})")
        heads = 1
    return dict(
        hidden_size=width,
        intermediate_size=4 * width,
        projection_dim=int(state["visual.proj"].shape[1]),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_channels=int(conv.shape[1]),
        image_size=patch * grid,
        patch_size=patch,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def snac_config(raw: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """SNAC constructor kwargs: ``config.json`` over ``snac.SNAC``'s own defaults, so the saved config is explicit."""
    from snac import SNAC

    params = inspect.signature(SNAC.__init__).parameters
    defaults = {k: p.default for k, p in params.items() if k != "self"}
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        problems.append(f"SNAC config.json: keys unknown to snac.SNAC: {', '.join(unknown)}")
    config = dict(defaults)
    for key, value in raw.items():
        if key not in defaults:
            continue
        default = defaults[key]
        if isinstance(default, bool) or isinstance(value, bool):
            ok = isinstance(value, bool) and isinstance(default, bool)
        elif isinstance(default, (list, tuple)):
            ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
        else:  # sizes; latent_dim and attn_window_size may also be None (derived / no local attention)
            ok = (value is None and key in ("latent_dim", "attn_window_size")) or (isinstance(value, int) and value >= 1)
        if ok:
            config[key] = value
        else:
            problems.append(f"SNAC config.json: {key} is {value!r}, which snac.SNAC cannot take (default {default!r})")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def build_config(
    lit: Mapping[str, Any],
    whisper: Mapping[str, Any],
    clip: Mapping[str, Any] | None,
    codec: Mapping[str, Any],
    problems: list[str],
) -> MiniOmni2Config | None:
    """A :class:`MiniOmni2Config` from the effective LitGPT config, Whisper/CLIP kwargs and the SNAC config."""
    text_vocab, audio_vocab, padded = lit["text_vocab_size"], lit["audio_vocab_size"], lit["padded_vocab_size"]
    if padded is None:
        return None
    layers, rest = divmod(padded - text_vocab, audio_vocab)
    if rest or layers < 1:
        problems.append(
            f"model_config.yaml: padded_vocab_size {padded} is not text_vocab_size {text_vocab} plus a whole number "
            f"of audio layers of audio_vocab_size {audio_vocab}"
        )
        return None
    if whisper and lit["whisper_adapter_dim"] != whisper["d_model"]:
        problems.append(
            f"model_config.yaml: whisper_adapter_dim {lit['whisper_adapter_dim']} != the Whisper encoder width "
            f"{whisper['d_model']}"
        )
    if clip and lit["vision_adapter_dim"] != clip["projection_dim"]:
        problems.append(
            f"model_config.yaml: vision_adapter_dim {lit['vision_adapter_dim']} != the CLIP output dim "
            f"{clip['projection_dim']}"
        )
    if not whisper or (clip is not None and not clip):
        return None
    text = dict(
        hidden_size=lit["n_embd"],
        intermediate_size=lit["intermediate_size"],
        num_hidden_layers=lit["n_layer"],
        num_attention_heads=lit["n_head"],
        num_key_value_heads=lit["n_query_groups"],
        head_dim=lit["head_size"],
        hidden_act="silu",
        rms_norm_eps=float(lit["norm_eps"]),
        rope_parameters={"rope_type": "default", "rope_theta": float(lit["rope_base"])},
        max_position_embeddings=lit["block_size"],
        tie_word_embeddings=False,
        use_sliding_window=False,
        attention_dropout=float(lit["attn_dropout"]),
    )
    vision = dict(clip) if clip is not None else None
    num_image_tokens = 50 if vision is None else (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    try:
        return MiniOmni2Config(
            text_config=text,
            audio_config=dict(whisper),
            vision_config=vision,
            codec_config=dict(codec),
            text_vocab_size=text_vocab,
            num_text_special_tokens=RELEASE_NUM_TEXT_SPECIAL_TOKENS,
            audio_codebook_size=int(codec["codebook_size"]),
            audio_vocab_size=audio_vocab,
            num_audio_layers=layers,
            num_image_tokens=num_image_tokens,
            adapter_intermediate_size=lit["intermediate_size"],
        )
    except (ValueError, TypeError) as error:
        problems.append(f"the release's sizes do not make a valid MiniOmni2Config: {error}")
        return None


# ----------------------------------------------------------------------------------------------------------------
# tensors
# ----------------------------------------------------------------------------------------------------------------
def split_fused_qkv(
    tensor: torch.Tensor, n_query_groups: int, q_per_kv: int, head_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LitGPT's fused qkv rows -> (q, k, v) rows.

    The rows are grouped per key/value group: for each group, ``q_per_kv`` query heads, then 1 key head, then 1 value
    head, each ``head_size`` rows. Works for weights (rows, in) and biases (rows,).
    """
    grouped = tensor.reshape(n_query_groups, q_per_kv + 2, head_size, *tensor.shape[1:])
    q = grouped[:, :q_per_kv].reshape(n_query_groups * q_per_kv * head_size, *tensor.shape[1:])
    k = grouped[:, q_per_kv].reshape(n_query_groups * head_size, *tensor.shape[1:])
    v = grouped[:, q_per_kv + 1].reshape(n_query_groups * head_size, *tensor.shape[1:])
    return q.contiguous(), k.contiguous(), v.contiguous()


def _linear(out: Targets, src: SourceTensors, target: str, source: str, bias: bool) -> None:
    if (t := src.take(f"{source}.weight")) is not None:
        out[f"{target}.weight"] = t
    if bias and (t := src.take(f"{source}.bias")) is not None:
        out[f"{target}.bias"] = t


def map_litgpt(src: SourceTensors, lit: Mapping[str, Any], has_vision: bool) -> Targets:
    """``lit_model.pth`` -> backbone (``model.language_model``), ``lm_head`` and adapters."""
    out = Targets(src)
    lm = "model.language_model"
    n_embd, hs = lit["n_embd"], lit["head_size"]
    n_head, groups = lit["n_head"], lit["n_query_groups"]
    q_per_kv = n_head // groups if groups else 0
    fused_rows = (n_head + 2 * groups) * hs
    vocab = lit["padded_vocab_size"]

    if (t := src.take("transformer.wte.weight", (vocab, n_embd))) is not None:
        out[f"{lm}.embed_tokens.weight"] = t
    if (t := src.take("lm_head.weight", (vocab, n_embd))) is not None:
        out["lm_head.weight"] = t
    if (t := src.take("transformer.ln_f.weight", (n_embd,))) is not None:
        out[f"{lm}.norm.weight"] = t
    for n in range(lit["n_layer"]):
        s, d = f"transformer.h.{n}", f"{lm}.layers.{n}"
        if (t := src.take(f"{s}.norm_1.weight", (n_embd,))) is not None:
            out[f"{d}.input_layernorm.weight"] = t
        if (t := src.take(f"{s}.norm_2.weight", (n_embd,))) is not None:
            out[f"{d}.post_attention_layernorm.weight"] = t
        for kind, shape in (("weight", (fused_rows, n_embd)), ("bias", (fused_rows,))):
            if (t := src.take(f"{s}.attn.attn.{kind}", shape)) is not None:
                q, k, v = split_fused_qkv(t, groups, q_per_kv, hs)
                out[f"{d}.self_attn.q_proj.{kind}"] = q
                out[f"{d}.self_attn.k_proj.{kind}"] = k
                out[f"{d}.self_attn.v_proj.{kind}"] = v
        _linear(out, src, f"{d}.self_attn.o_proj", f"{s}.attn.proj", bias=False)
        _linear(out, src, f"{d}.mlp.gate_proj", f"{s}.mlp.fc_1", bias=False)
        _linear(out, src, f"{d}.mlp.up_proj", f"{s}.mlp.fc_2", bias=False)
        _linear(out, src, f"{d}.mlp.down_proj", f"{s}.mlp.proj", bias=False)
    adapters = [("whisper_adapter", "model.audio_projector")]
    if has_vision:
        adapters.append(("vision_adapter", "model.vision_projector"))
    for source, target in adapters:
        for name in ("fc_1", "fc_2", "proj"):
            _linear(out, src, f"{target}.{name}", f"{source}.{name}", bias=False)
    return out


def map_whisper(src: SourceTensors, num_layers: int) -> Targets:
    """openai-whisper ``encoder.*`` -> transformers ``WhisperEncoder`` (``model.audio_tower``)."""
    out = Targets(src)
    at = "model.audio_tower"
    for conv in ("conv1", "conv2"):
        _linear(out, src, f"{at}.{conv}", f"encoder.{conv}", bias=True)
    if (t := src.take("encoder.positional_embedding")) is not None:
        out[f"{at}.embed_positions.weight"] = t
    for n in range(num_layers):
        s, d = f"encoder.blocks.{n}", f"{at}.layers.{n}"
        _linear(out, src, f"{d}.self_attn.q_proj", f"{s}.attn.query", bias=True)
        _linear(out, src, f"{d}.self_attn.k_proj", f"{s}.attn.key", bias=False)
        _linear(out, src, f"{d}.self_attn.v_proj", f"{s}.attn.value", bias=True)
        _linear(out, src, f"{d}.self_attn.out_proj", f"{s}.attn.out", bias=True)
        _linear(out, src, f"{d}.self_attn_layer_norm", f"{s}.attn_ln", bias=True)
        _linear(out, src, f"{d}.fc1", f"{s}.mlp.0", bias=True)
        _linear(out, src, f"{d}.fc2", f"{s}.mlp.2", bias=True)
        _linear(out, src, f"{d}.final_layer_norm", f"{s}.mlp_ln", bias=True)
    _linear(out, src, f"{at}.layer_norm", "encoder.ln_post", bias=True)
    return out


def map_clip(src: SourceTensors, num_layers: int) -> Targets:
    """OpenAI CLIP ``visual.*`` -> transformers ``CLIPVisionModelWithProjection`` (``model.vision_tower``)."""
    out = Targets(src)
    vm = "model.vision_tower.vision_model"
    if (t := src.take("visual.conv1.weight")) is not None:
        out[f"{vm}.embeddings.patch_embedding.weight"] = t
    if (t := src.take("visual.class_embedding")) is not None:
        out[f"{vm}.embeddings.class_embedding"] = t
    if (t := src.take("visual.positional_embedding")) is not None:
        out[f"{vm}.embeddings.position_embedding.weight"] = t
    _linear(out, src, f"{vm}.pre_layrnorm", "visual.ln_pre", bias=True)
    for n in range(num_layers):
        s, d = f"visual.transformer.resblocks.{n}", f"{vm}.encoder.layers.{n}"
        for kind in ("weight", "bias"):
            if (t := src.take(f"{s}.attn.in_proj_{kind}")) is not None:
                if t.shape[0] % 3:
                    src.problems.append(f"{CLIP}: {s}.attn.in_proj_{kind} rows {t.shape[0]} not divisible by 3")
                    continue
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                    out[f"{d}.self_attn.{proj}.{kind}"] = part.contiguous()
        _linear(out, src, f"{d}.self_attn.out_proj", f"{s}.attn.out_proj", bias=True)
        _linear(out, src, f"{d}.layer_norm1", f"{s}.ln_1", bias=True)
        _linear(out, src, f"{d}.layer_norm2", f"{s}.ln_2", bias=True)
        _linear(out, src, f"{d}.mlp.fc1", f"{s}.mlp.c_fc", bias=True)
        _linear(out, src, f"{d}.mlp.fc2", f"{s}.mlp.c_proj", bias=True)
    _linear(out, src, f"{vm}.post_layernorm", "visual.ln_post", bias=True)
    if (t := src.take("visual.proj")) is not None:
        out["model.vision_tower.visual_projection.weight"] = t.t().contiguous()  # (width, out) -> (out, width)
    return out


def map_snac(src: SourceTensors, expected: Iterable[str]) -> Targets:
    """SNAC weights -> ``codec.snac``; old weight-norm names (``weight_g``/``weight_v``) become the parametrization
    names (``parametrizations.weight.original0``/``original1``) that ``torch.nn.utils.parametrizations`` uses.
    Names with no place in the model's codec are left untaken (reported as unused)."""
    out = Targets(src)
    expected = set(expected)
    for name in list(src.tensors):
        target = re.sub(r"\.weight_g$", ".parametrizations.weight.original0", name)
        target = re.sub(r"\.weight_v$", ".parametrizations.weight.original1", target)
        key = f"codec.snac.{target}"
        if key not in expected:
            continue
        if key in out:
            src.problems.append(f"{SNAC}: {name!r} and another tensor both map to {key!r}")
            continue
        out[key] = src.take(name)
    return out


def map_state_dicts(
    lit_state: Mapping[str, torch.Tensor],
    lit: Mapping[str, Any],
    whisper_state: Mapping[str, torch.Tensor],
    clip_state: Mapping[str, torch.Tensor] | None,
    snac_state: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    config: MiniOmni2Config,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """All source dicts -> the target state dict, checked against ``expected`` (name -> shape).

    Raises one :class:`ConversionError` listing every missing, unused, extra or mis-shaped tensor.
    """
    problems: list[str] = []
    report = ConversionReport()
    has_vision = config.has_vision
    sources = {
        LIT: SourceTensors(LIT, lit_state, problems),
        WHISPER: SourceTensors(WHISPER, whisper_state, problems),
        SNAC: SourceTensors(SNAC, snac_state, problems),
    }
    if has_vision:
        sources[CLIP] = SourceTensors(CLIP, clip_state or {}, problems)
    steps = [
        (LIT, lambda s: map_litgpt(s, lit, has_vision)),
        (WHISPER, lambda s: map_whisper(s, config.audio_config.encoder_layers)),
        (SNAC, lambda s: map_snac(s, expected)),
    ]
    if has_vision:
        steps.insert(2, (CLIP, lambda s: map_clip(s, config.vision_config.num_hidden_layers)))

    target: dict[str, torch.Tensor] = {}
    origin: dict[str, str | None] = {}
    for label, step in progress(steps):
        mapped = step(sources[label])
        for name, tensor in mapped.items():
            if tensor is None:
                continue
            if name in target:
                problems.append(f"target tensor {name!r} is written twice")
            target[name] = tensor
            origin[name] = mapped.origin.get(name)

    # Dropped on purpose: the Whisper decoder (only the encoder is used) and the CLIP text tower.
    whisper_drop = sources[WHISPER].drop(lambda n: n.startswith("decoder.") or n == "alignment_heads")
    if whisper_drop:
        report.dropped["openai-whisper decoder: Mini-Omni uses the encoder only"] = whisper_drop
    if has_vision:
        clip_drop = sources[CLIP].drop(lambda n: not n.startswith("visual."))
        if clip_drop:
            report.dropped["OpenAI CLIP text tower and scalars: Mini-Omni2 uses the visual tower only"] = clip_drop

    for src in sources.values():
        for name in src.unused():
            problems.append(f"{src.label}: tensor {name!r} is not used by the conversion")

    for name in sorted(set(expected) - set(target)):
        problems.append(f"target tensor {name!r} is not filled by any source tensor")
    for name in sorted(set(target) - set(expected)):
        problems.append(f"target tensor {name!r} (from {origin[name]}) does not exist in the model")
    for name in sorted(set(target) & set(expected)):
        if tuple(target[name].shape) != tuple(expected[name]):
            problems.append(
                f"target tensor {name!r} (from {origin[name]}): converted shape {tuple(target[name].shape)} != "
                f"model shape {tuple(expected[name])}"
            )
    if problems:
        raise ConversionError(problems)
    report.num_target_tensors = len(target)
    report.num_source_tensors_used = sum(len(s.used) for s in sources.values())
    return target, report


__all__ = [
    "ConversionError",
    "ConversionReport",
    "LITGPT_DEFAULTS",
    "build_config",
    "clip_config",
    "litgpt_config",
    "map_state_dicts",
    "snac_config",
    "split_fused_qkv",
    "whisper_config",
]

