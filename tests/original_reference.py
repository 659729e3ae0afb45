"""A plain re-implementation of the ORIGINAL forward math, computed straight from the original state dicts.

Nothing here uses transformers or this package's modules (only :class:`TokenLayout` for ids in the decoding loop):
LitGPT's fused-qkv grouped attention with rotate-half RoPE on the full head, LLaMA MLP, RMSNorm, the mean of the 8
stream embeddings with the release's feature placement (``concat_feat``), the openai-whisper encoder, OpenAI CLIP's
visual tower (``ln_post`` on every token, then ``@ proj``) and the LLaMA-MLP adapters.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def _layer_norm(x: torch.Tensor, state: dict, name: str, eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal_offset: int | None) -> torch.Tensor:
    """Plain softmax attention over (B, T, D) projections split into ``heads``."""
    B, T, D = q.shape
    S = k.shape[1]
    hd = D // heads
    q = q.view(B, T, heads, hd).transpose(1, 2)
    k = k.view(B, S, heads, hd).transpose(1, 2)
    v = v.view(B, S, heads, hd).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if causal_offset is not None:
        qpos = torch.arange(T)[:, None] + causal_offset
        scores = scores.masked_fill(torch.arange(S)[None, :] > qpos, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)


# ----- openai-whisper encoder -------------------------------------------------------------------------------------
def whisper_encoder(checkpoint: dict, mel: torch.Tensor) -> torch.Tensor:
    """openai-whisper ``AudioEncoder``: conv1/gelu, conv2 (stride 2)/gelu, + positional embedding, pre-LN blocks,
    ``ln_post``. ``mel`` (B, n_mels, 3000) -> (B, 1500, n_audio_state)."""
    s, dims = checkpoint["model_state_dict"], checkpoint["dims"]
    x = F.gelu(F.conv1d(mel, s["encoder.conv1.weight"], s["encoder.conv1.bias"], padding=1))
    x = F.gelu(F.conv1d(x, s["encoder.conv2.weight"], s["encoder.conv2.bias"], stride=2, padding=1))
    x = x.permute(0, 2, 1) + s["encoder.positional_embedding"]
    for i in range(dims["n_audio_layer"]):
        p = f"encoder.blocks.{i}"
        h = _layer_norm(x, s, f"{p}.attn_ln")
        q = h @ s[f"{p}.attn.query.weight"].T + s[f"{p}.attn.query.bias"]
        k = h @ s[f"{p}.attn.key.weight"].T
        v = h @ s[f"{p}.attn.value.weight"].T + s[f"{p}.attn.value.bias"]
        a = _attention(q, k, v, dims["n_audio_head"], None)
        x = x + a @ s[f"{p}.attn.out.weight"].T + s[f"{p}.attn.out.bias"]
        h = _layer_norm(x, s, f"{p}.mlp_ln")
        h = F.gelu(h @ s[f"{p}.mlp.0.weight"].T + s[f"{p}.mlp.0.bias"])
        x = x + h @ s[f"{p}.mlp.2.weight"].T + s[f"{p}.mlp.2.bias"]
    return _layer_norm(x, s, "encoder.ln_post")


# ----- OpenAI CLIP visual tower -----------------------------------------------------------------------------------
def clip_visual(state: dict, pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """All tokens after ``ln_post``, times ``proj``: (B, 3, H, W) -> (B, 1 + grid^2, out)."""
    w = state["visual.conv1.weight"]
    x = F.conv2d(pixels, w, stride=w.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = state["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + state["visual.positional_embedding"]
    x = _layer_norm(x, state, "visual.ln_pre")
    n = 0
    while f"visual.transformer.resblocks.{n}.ln_1.weight" in state:
        p = f"visual.transformer.resblocks.{n}"
        h = _layer_norm(x, state, f"{p}.ln_1")
        qkv = h @ state[f"{p}.attn.in_proj_weight"].T + state[f"{p}.attn.in_proj_bias"]
        q, k, v = qkv.chunk(3, dim=-1)
        a = _attention(q, k, v, heads, None)
        x = x + a @ state[f"{p}.attn.out_proj.weight"].T + state[f"{p}.attn.out_proj.bias"]
        h = _layer_norm(x, state, f"{p}.ln_2")
        h = h @ state[f"{p}.mlp.c_fc.weight"].T + state[f"{p}.mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h)
        x = x + h @ state[f"{p}.mlp.c_proj.weight"].T + state[f"{p}.mlp.c_proj.bias"]
        n += 1
    return _layer_norm(x, state, "visual.ln_post") @ state["visual.proj"]


# ----- LitGPT backbone ----------------------------------------------------------------------------------------------
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def _llama_mlp(x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    return (F.silu(x @ state[f"{prefix}.fc_1.weight"].T) * (x @ state[f"{prefix}.fc_2.weight"].T)) @ state[
        f"{prefix}.proj.weight"
    ].T


def _rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """LitGPT's ``apply_rope`` on the full head: rotate-half with cos/sin of ``positions * theta`` repeated twice."""
    hs = x.shape[-1]
    theta = 1.0 / (base ** (torch.arange(0, hs, 2).float() / hs))
    angles = torch.outer(positions.float(), theta).repeat(1, 2)
    x1, x2 = x[..., : hs // 2], x[..., hs // 2 :]
    return x * angles.cos() + torch.cat((-x2, x1), dim=-1) * angles.sin()


class LitGPTReference:
    """The release's ``GPT`` forward from ``lit_model.pth`` and ``model_config.yaml`` (post_adapter off).

    ``cache`` (a list of per-layer (k, v)) makes step-by-step decoding possible: ``forward`` appends to it.
    """

    def __init__(self, state: dict, config: dict):
        self.s = state
        self.c = config

    # the release's concat_feat: features replace the 7 audio-stream embeddings at fixed positions per task
    def embed(
        self,
        streams: torch.Tensor,
        tasks: Sequence[str | None] | None = None,
        audio_features: Sequence[torch.Tensor | None] | None = None,
        audio_lengths: Sequence[int] | None = None,
        image_features: Sequence[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """``streams`` (8, B, T) of global ids -> (B, T, n_embd)."""
        wte = self.s["transformer.wte.weight"]
        x = [wte[streams[i]] for i in range(8)]
        for j, task in enumerate(tasks or []):
            if task is None:
                continue
            audio = None
            if audio_features is not None and audio_features[j] is not None:
                audio = _llama_mlp(audio_features[j], self.s, "whisper_adapter")[: audio_lengths[j]]
            if task in ("A1A2", "A1T2", "A1T1"):
                for i in range(7):
                    x[i][j, 1 : audio_lengths[j] + 1] = audio
            elif task in ("ImageQA_A", "ImageQA_AT"):  # V+A1: image at 1..50, audio at 52..51+L
                image = _llama_mlp(image_features[j], self.s, "vision_adapter")
                for i in range(7):
                    x[i][j, 1:51] = image
                    x[i][j, 52 : 52 + audio_lengths[j]] = audio
            else:
                raise ValueError(f"no feature placement for task {task}")
        return sum(x) / 8

    def forward(self, x: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        """Embeddings (B, T, n_embd) -> logits (B, T, padded_vocab); positions continue after ``cache``."""
        c, s = self.c, self.s
        B, T, _ = x.shape
        start = cache[0][0].shape[2] if cache else 0
        positions = torch.arange(start, start + T)
        H, G, hs = c["n_head"], c["n_query_groups"], c["head_size"]
        q_per_kv = H // G
        for n in range(c["n_layer"]):
            p = f"transformer.h.{n}"
            h = _rms_norm(x, s[f"{p}.norm_1.weight"], c["norm_eps"])
            qkv = h @ s[f"{p}.attn.attn.weight"].T + s[f"{p}.attn.attn.bias"]
            qkv = qkv.view(B, T, G, q_per_kv + 2, hs).permute(0, 2, 3, 1, 4)  # (B, G, q_per_kv+2, T, hs)
            q, k, v = qkv.split((q_per_kv, 1, 1), dim=2)
            q = _rope(q.reshape(B, H, T, hs), positions, c["rope_base"])
            k = _rope(k.reshape(B, G, T, hs), positions, c["rope_base"])
            v = v.reshape(B, G, T, hs)
            if cache is not None:
                if len(cache) > n:
                    k = torch.cat([cache[n][0], k], dim=2)
                    v = torch.cat([cache[n][1], v], dim=2)
                    cache[n] = (k, v)
                else:
                    cache.append((k, v))
            k = k.repeat_interleave(q_per_kv, dim=1)  # head h uses group h // q_per_kv
            v = v.repeat_interleave(q_per_kv, dim=1)
            scores = q @ k.transpose(-1, -2) / math.sqrt(hs)
            S = k.shape[2]
            mask = torch.arange(S)[None, :] > positions[:, None]
            att = scores.masked_fill(mask, float("-inf")).softmax(-1) @ v  # (B, H, T, hs)
            x = x + att.transpose(1, 2).reshape(B, T, H * hs) @ s[f"{p}.attn.proj.weight"].T
            x = x + _llama_mlp(_rms_norm(x, s[f"{p}.norm_2.weight"], c["norm_eps"]), s, f"{p}.mlp")
        x = _rms_norm(x, s["transformer.ln_f.weight"], c["norm_eps"])
        return x @ s["lm_head.weight"].T


# ----- greedy delayed parallel decoding (SPEC §6), driven by any "next logits" function -------------------------------
def greedy_decode(
    step: Callable[[torch.Tensor | None], torch.Tensor],
    layout,
    output: str,
    max_new_tokens: int,
    batch_parallel: bool,
) -> dict:
    """Greedy text-instruct delayed parallel decoding.

    ``step(None)`` prefills and returns the last-position logits (B, V); ``step(ids)`` feeds ids (B, 8, 1) and returns
    the next logits. ``output`` is ``"speech"`` or ``"text"``. With ``batch_parallel`` (speech), row 0 is the speech
    row and row 1 its text-out twin: audio from row 0, text from row 1, both rows fed the text token, row 1's audio
    streams ``pad_a``. Returns ``{"text": [...], "audio": [[...] x 7]}`` of local audio ids / text ids.
    Rules: once the text is ``eot``, later text tokens are ``pad_t``; speech stops when stream 6 yields ``eoa`` (that
    step is not kept); text-only output stops after ``eot`` (kept) and feeds ``pad_a`` to the audio streams.
    """
    n_layers = layout.num_audio_layers
    text_ids: list[int] = []
    audio_ids: list[list[int]] = [[] for _ in range(n_layers)]
    logits = step(None)
    text_end = False
    pad_a = [layout.layershift(layout.pad_a, i) for i in range(n_layers)]
    for _ in range(max_new_tokens):
        text_row = 1 if batch_parallel else 0
        text_logits, audio_logits = layout.split_logits(logits)
        text = int(text_logits[text_row].argmax())
        audio = [int(a) for a in audio_logits[0].argmax(-1)]
        if output == "speech":
            if text_end:
                text = layout.pad_t
            if audio[-1] == layout.eoa:
                break
            if text == layout.eot:
                text_end = True
            for i in range(n_layers):
                audio_ids[i].append(audio[i])
            text_ids.append(text)
            row0 = [layout.layershift(a, i) for i, a in enumerate(audio)] + [text]
            rows = [row0, pad_a + [text]] if batch_parallel else [row0]
        else:
            text_ids.append(text)
            if text == layout.eot:
                break
            rows = [pad_a + [text]]
        logits = step(torch.tensor(rows, dtype=torch.long)[:, :, None])
    return {"text": text_ids, "audio": audio_ids}
