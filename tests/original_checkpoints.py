"""Synthetic checkpoints in the ORIGINAL release formats (SPEC §8), at tiny sizes with random weights.

They are written the way the release's files are: a flat LitGPT state dict ``lit_model.pth`` with the LitGPT
``model_config.yaml`` (every field of the release's ``Config`` dataclass), an openai-whisper ``small.pt`` (``dims`` +
``model_state_dict`` with encoder and decoder), a real TorchScript archive ``ViT-B-32.pt`` of a module with the OpenAI
CLIP naming (a visual tower and a small text tower), the Qwen2-style tokenizer files, and a SNAC folder with
``config.json`` + ``pytorch_model.bin``.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import torch
import yaml
from torch import nn

# Layout of the tiny models: the tiny tokenizer's 448 ids + 64 text specials; 7 audio layers of 64 codes + 64 specials.
TEXT_VOCAB = 512
AUDIO_VOCAB = 128
CODEBOOK = 64
NUM_LAYERS_AUDIO = 7
PADDED_VOCAB = TEXT_VOCAB + NUM_LAYERS_AUDIO * AUDIO_VOCAB

#: LitGPT sizes: 6 query heads in 2 groups (3 per group) with head size 16, and n_embd != n_head * head_size, so that
#: the de-interleaving and the explicit head size are both exercised.
LIT_SIZES = dict(n_embd=64, n_layer=2, n_head=6, n_query_groups=2, head_size=16, intermediate_size=96)
WHISPER_DIMS = dict(
    n_mels=80, n_vocab=51865, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=2,
    n_text_ctx=24, n_text_state=32, n_text_head=2, n_text_layer=1,
)
#: CLIP visual sizes: width 128 -> 2 heads by OpenAI's width // 64 rule; 224 px, patch 32 -> 50 tokens; output 16.
CLIP_WIDTH, CLIP_LAYERS, CLIP_PATCH, CLIP_IMAGE, CLIP_OUT = 128, 2, 32, 224, 16
SNAC_CONFIG = dict(
    sampling_rate=24000,
    encoder_dim=4,
    encoder_rates=[2, 4, 8, 8],
    decoder_dim=16,
    decoder_rates=[8, 8, 4, 2],
    attn_window_size=None,
    codebook_size=CODEBOOK,
    codebook_dim=4,
    vq_strides=[4, 2, 1],
    noise=True,
    depthwise=True,
)


def release_yaml(vision: bool) -> dict:
    """``model_config.yaml`` as LitGPT writes it: every field of the release's ``Config``, Qwen2 choices."""
    return dict(
        name="Qwen2-0.5B",
        hf_config=dict(name="Qwen2-0.5B", org="Qwen"),
        scale_embeddings=False,
        block_size=2048,
        vocab_size=50254,
        padding_multiple=512,
        padded_vocab_size=PADDED_VOCAB,
        rotary_percentage=1.0,
        parallel_residual=False,
        bias=False,
        lm_head_bias=False,
        shared_attention_norm=False,
        norm_class_name="RMSNorm",
        norm_eps=1e-6,
        mlp_class_name="LLaMAMLP",
        gelu_approximate="none",
        rope_condense_ratio=1,
        rope_base=1000000,
        n_expert=0,
        n_expert_per_token=0,
        add_qkv_bias=True,
        prompt_vocab_size=None,
        attn_dropout=0.0,
        pos_type="rope",
        force_align=False,
        use_pretrain_phoneme_emb=False,
        tie_word_embeddings=False,
        text_vocab_size=TEXT_VOCAB,
        cat_audio_vocab_size=NUM_LAYERS_AUDIO * AUDIO_VOCAB,
        audio_vocab_size=AUDIO_VOCAB,
        whisper_adapter_dim=WHISPER_DIMS["n_audio_state"],
        vision_adapter_dim=CLIP_OUT if vision else 512,
        post_adapter=False,
        post_adapter_layers=6,
        asr_adapter="llamamlp",
        **LIT_SIZES,
    )


class _Random:
    """Random tensors with scales that keep activations O(1), so a wrong mapping changes the logits a lot."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, *shape, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator) * std

    def linear(self, out_dim: int, in_dim: int) -> torch.Tensor:
        return self.normal(out_dim, in_dim, std=1 / math.sqrt(in_dim))

    def bias(self, dim: int) -> torch.Tensor:
        return self.normal(dim, std=0.1)

    def norm(self, dim: int) -> torch.Tensor:
        return 1 + self.normal(dim, std=0.1)


def lit_state_dict(vision: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    r = _Random(seed)
    c, L, H, G, hs, I = (LIT_SIZES[k] for k in ("n_embd", "n_layer", "n_head", "n_query_groups", "head_size", "intermediate_size"))
    state = {
        "transformer.wte.weight": r.normal(PADDED_VOCAB, c),
        "lm_head.weight": r.linear(PADDED_VOCAB, c),
        "transformer.ln_f.weight": r.norm(c),
    }
    for n in range(L):
        p = f"transformer.h.{n}"
        state[f"{p}.norm_1.weight"] = r.norm(c)
        state[f"{p}.attn.attn.weight"] = r.linear((H + 2 * G) * hs, c)
        state[f"{p}.attn.attn.bias"] = r.bias((H + 2 * G) * hs)
        state[f"{p}.attn.proj.weight"] = r.linear(c, H * hs)
        state[f"{p}.norm_2.weight"] = r.norm(c)
        state[f"{p}.mlp.fc_1.weight"] = r.linear(I, c)
        state[f"{p}.mlp.fc_2.weight"] = r.linear(I, c)
        state[f"{p}.mlp.proj.weight"] = r.linear(c, I)
    adapters = [("whisper_adapter", WHISPER_DIMS["n_audio_state"])]
    if vision:
        adapters.append(("vision_adapter", CLIP_OUT))
    for name, dim in adapters:
        state[f"{name}.fc_1.weight"] = r.linear(I, dim)
        state[f"{name}.fc_2.weight"] = r.linear(I, dim)
        state[f"{name}.proj.weight"] = r.linear(c, I)
    return state


def whisper_checkpoint(seed: int = 1) -> dict:
    """An openai-whisper checkpoint dict: ``dims`` and ``model_state_dict`` (encoder and decoder)."""
    r = _Random(seed)
    d = WHISPER_DIMS
    n, mels = d["n_audio_state"], d["n_mels"]
    state = {
        "encoder.conv1.weight": r.normal(n, mels, 3, std=1 / math.sqrt(3 * mels)),
        "encoder.conv1.bias": r.bias(n),
        "encoder.conv2.weight": r.normal(n, n, 3, std=1 / math.sqrt(3 * n)),
        "encoder.conv2.bias": r.bias(n),
        "encoder.positional_embedding": r.normal(d["n_audio_ctx"], n, std=0.5),
    }

    def block(prefix: str, cross: bool) -> None:
        attns = ["attn", "cross_attn"] if cross else ["attn"]
        for attn in attns:
            state[f"{prefix}.{attn}.query.weight"] = r.linear(n, n)
            state[f"{prefix}.{attn}.query.bias"] = r.bias(n)
            state[f"{prefix}.{attn}.key.weight"] = r.linear(n, n)
            state[f"{prefix}.{attn}.value.weight"] = r.linear(n, n)
            state[f"{prefix}.{attn}.value.bias"] = r.bias(n)
            state[f"{prefix}.{attn}.out.weight"] = r.linear(n, n)
            state[f"{prefix}.{attn}.out.bias"] = r.bias(n)
            state[f"{prefix}.{attn}_ln.weight"] = r.norm(n)
            state[f"{prefix}.{attn}_ln.bias"] = r.bias(n)
        state[f"{prefix}.mlp.0.weight"] = r.linear(4 * n, n)
        state[f"{prefix}.mlp.0.bias"] = r.bias(4 * n)
        state[f"{prefix}.mlp.2.weight"] = r.linear(n, 4 * n)
        state[f"{prefix}.mlp.2.bias"] = r.bias(n)
        state[f"{prefix}.mlp_ln.weight"] = r.norm(n)
        state[f"{prefix}.mlp_ln.bias"] = r.bias(n)

    for i in range(d["n_audio_layer"]):
        block(f"encoder.blocks.{i}", cross=False)
    state["encoder.ln_post.weight"] = r.norm(n)
    state["encoder.ln_post.bias"] = r.bias(n)
    state["decoder.token_embedding.weight"] = r.normal(d["n_vocab"], d["n_text_state"])
    state["decoder.positional_embedding"] = r.normal(d["n_text_ctx"], d["n_text_state"])
    for i in range(d["n_text_layer"]):
        block(f"decoder.blocks.{i}", cross=True)
    state["decoder.ln.weight"] = r.norm(n)
    state["decoder.ln.bias"] = r.bias(n)
    return {"dims": dict(d), "model_state_dict": state}


# ----- a tiny CLIP with the OpenAI naming, saved as a TorchScript archive ---------------------------------------
class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * width, width))])
        )
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (seq, batch, width)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    """OpenAI's visual tower; ``forward`` returns all tokens after ``ln_post``, times ``proj`` (the release's use)."""

    def __init__(self, image: int, patch: int, width: int, layers: int, heads: int, out: int):
        super().__init__()
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((image // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x).permute(1, 0, 2)
        x = self.transformer(x).permute(1, 0, 2)
        return self.ln_post(x) @ self.proj


class TinyCLIP(nn.Module):
    """Visual tower plus a small text tower (its tensors are in the archive and must be dropped on purpose)."""

    def __init__(self, heads: int):
        super().__init__()
        self.visual = VisionTransformer(CLIP_IMAGE, CLIP_PATCH, CLIP_WIDTH, CLIP_LAYERS, heads, CLIP_OUT)
        text_width = 32
        self.transformer = Transformer(text_width, 1, 1)
        self.token_embedding = nn.Embedding(50, text_width)
        self.positional_embedding = nn.Parameter(torch.randn(8, text_width))
        self.ln_final = nn.LayerNorm(text_width)
        self.text_projection = nn.Parameter(torch.randn(text_width, CLIP_OUT))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)


def tiny_clip(seed: int = 2) -> TinyCLIP:
    torch.manual_seed(seed)
    model = TinyCLIP(heads=CLIP_WIDTH // 64)
    r = _Random(seed + 100)
    with torch.no_grad():  # non-trivial norms and biases
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(r.normal(*param.shape, std=0.1))
            elif name.endswith("weight") and name.split(".")[-2].startswith("ln_"):
                param.copy_(1 + r.normal(*param.shape, std=0.1))
    return model.eval()


def save_clip_archive(path: Path, seed: int = 2, trace: bool = False) -> TinyCLIP:
    """Write a real TorchScript archive (scripted, or traced like a frozen release) and return the eager module."""
    model = tiny_clip(seed)
    if trace:
        archive = torch.jit.trace(model, torch.randn(1, 3, CLIP_IMAGE, CLIP_IMAGE))
    else:
        archive = torch.jit.script(model)
    archive.save(str(path))
    return model


def snac_state_dict(old_weight_norm_names: bool, seed: int = 3) -> dict[str, torch.Tensor]:
    """A tiny SNAC's weights; with ``old_weight_norm_names`` in the ``weight_g``/``weight_v`` spelling."""
    from snac import SNAC

    torch.manual_seed(seed)
    state = SNAC(**SNAC_CONFIG).state_dict()
    if old_weight_norm_names:
        state = {
            k.replace(".parametrizations.weight.original0", ".weight_g").replace(
                ".parametrizations.weight.original1", ".weight_v"
            ): v
            for k, v in state.items()
        }
    return state


def write_release(folder: Path, vision: bool, seed: int = 0) -> Path:
    """A release folder as on the Hub (``gpt-omni/mini-omni2`` with ``vision``, else ``gpt-omni/mini-omni``)."""
    from mini_omni2.tiny import tiny_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "model_config.yaml", "w", encoding="utf-8") as handle:
        yaml.safe_dump(release_yaml(vision), handle)
    torch.save(lit_state_dict(vision, seed), folder / "lit_model.pth")
    torch.save(whisper_checkpoint(seed + 1), folder / "small.pt")
    if vision:
        save_clip_archive(folder / "ViT-B-32.pt", seed + 2)
    tiny_tokenizer().save_pretrained(str(folder))
    return folder


def write_snac(folder: Path, old_weight_norm_names: bool, seed: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(SNAC_CONFIG))
    torch.save(snac_state_dict(old_weight_norm_names, seed), folder / "pytorch_model.bin")
    return folder
