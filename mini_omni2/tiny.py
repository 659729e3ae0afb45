"""Tiny random Mini-Omni2 models for tests and offline demos: shrunk sizes, the same layout rules.

Nothing here downloads: the tokenizer is a byte-level BPE trained on a fixed built-in corpus (deterministic),
so its ids are fixed across runs and machines.
"""

from __future__ import annotations

import json

import torch

from .configuration_mini_omni2 import MiniOmni2Config

TINY_TEXT_VOCAB_SIZE = 512  # tokenizer ids (at most 448) + 64 text specials
TINY_TOKENIZER_VOCAB = TINY_TEXT_VOCAB_SIZE - 64

_CORPUS = [
    "What is your name? My name is Omni, a small model that hears, sees and speaks.",
    "Describe the image. A red square on a blue background, with a yellow circle in the corner.",
    "Hello world. How are you today? I am fine, thank you. The weather is nice and sunny.",
    "Transcribe the audio please. One two three four five six seven eight nine ten.",
    "Tell me a story about a cat and a dog who were friends in a quiet little town.",
    "the quick brown fox jumps over the lazy dog 0123456789 , . ! ? ; : ' \" ( ) - _",
]


def tiny_tokenizer():
    """A Qwen2 tokenizer (byte-level BPE) with a small fixed vocabulary, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_TOKENIZER_VOCAB - 1,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    model = bpe.get_vocab()
    vocab = dict(sorted(model.items(), key=lambda kv: kv[1]))
    vocab["<|endoftext|>"] = len(vocab)

    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    return Qwen2Tokenizer(vocab=vocab, merges=merges)


#: The tiny language model (a Qwen2 of ~0.2 M parameters) of the test models.
TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def tiny_config(vision: bool = True, codec: bool = True, **overrides) -> MiniOmni2Config:
    """A Mini-Omni2 config (Mini-Omni without vision) small enough for CPU tests, with the release's rules."""
    text = dict(TINY_TEXT)
    audio = dict(
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        num_mel_bins=80,
        max_source_positions=1500,
        vocab_size=51865,  # the unused decoder's; no parameters are built for it
    )
    clip = dict(
        hidden_size=32,
        intermediate_size=64,
        projection_dim=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=224,
        patch_size=32,
        hidden_act="quick_gelu",
    )
    snac = dict(
        sampling_rate=24000,
        encoder_dim=4,
        encoder_rates=[2, 4, 8, 8],
        decoder_dim=16,
        decoder_rates=[8, 8, 4, 2],
        attn_window_size=None,
        codebook_size=64,
        codebook_dim=4,
        vq_strides=[4, 2, 1],
        noise=True,
        depthwise=True,
    )
    kwargs = dict(
        text_config=text,
        audio_config=audio,
        vision_config=clip if vision else None,
        codec_config=snac if codec else None,
        text_vocab_size=TINY_TEXT_VOCAB_SIZE,
        num_text_special_tokens=64,
        audio_codebook_size=64,
        audio_vocab_size=128,
        num_audio_layers=7,
        adapter_intermediate_size=64,
    )
    kwargs.update(overrides)
    return MiniOmni2Config(**kwargs)


def tiny_model(vision: bool = True, codec: bool = True, seed: int = 0, **overrides):
    """A random tiny :class:`MiniOmni2ForConditionalGeneration` in eval mode, reproducible from ``seed``."""
    from .modeling_mini_omni2 import MiniOmni2ForConditionalGeneration

    torch.manual_seed(seed)
    model = MiniOmni2ForConditionalGeneration(tiny_config(vision=vision, codec=codec, **overrides))
    return model.eval()


def tiny_processor(vision: bool = True, **overrides):
    """A :class:`MiniOmni2Processor` matching :func:`tiny_config` (tiny tokenizer, real CLIP/Whisper settings)."""
    from .processing_mini_omni2 import MiniOmni2Processor

    return MiniOmni2Processor.from_config(tiny_config(vision=vision, **overrides), tokenizer=tiny_tokenizer())
