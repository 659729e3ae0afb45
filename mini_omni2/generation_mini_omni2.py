"""Generation for Mini-Omni2: text-instruct delayed parallel decoding and batch parallel decoding (SPEC §6-7).

``model.generate`` takes one prompt row per request (as built by :class:`MiniOmni2Processor`, left padded) and
answers every request in the way its last prompt position asks for: ``answer_a`` on the audio streams gives a spoken
answer (text + speech), otherwise a text answer (``asr`` on the text stream gives a transcription, decoded the same
way). It is a loop over the decoding engine (:mod:`.engine_mini_omni2`), which owns the decoding rules; this module
turns ``generate``'s arguments into the engine's settings. See ``docs/generation.md``.

This file is shipped as remote code with saved models: it imports only torch, transformers and sibling modules.
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from .engine_mini_omni2 import (
    RELEASE_SAMPLING,
    DecodeGroup,
    DecodeSettings,
    MiniOmni2Engine,
    MiniOmni2GenerateOutput,
    Sampling,
    check_twin_rule,
    infer_task,
)
from .token_layout import TokenLayout

#: Steps generated when neither ``max_new_tokens`` nor ``max_length`` is set (~87 s of speech).
DEFAULT_MAX_NEW_TOKENS = 1024

_SAMPLING_FIELDS = ("do_sample", "temperature", "top_k", "top_p")
_AUDIO_SAMPLING_FIELDS = tuple(f"audio_{name}" for name in _SAMPLING_FIELDS)
_ACCEPTED_KWARGS = frozenset(
    _SAMPLING_FIELDS
    + _AUDIO_SAMPLING_FIELDS
    + (
        "max_new_tokens",
        "max_length",
        "min_new_tokens",
        "generator",
        "cache_implementation",
        "compile_decode",
        "force_delay_pad",
        "audio_logits_processor",
        "request_index",
        "use_cache",
        "share_twin_prefill",
        "slice_head",
    )
)
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (options, compiled forward)


def release_generation_config(**overrides: Any) -> GenerationConfig:
    """A :class:`GenerationConfig` with the release's sampling settings (SPEC §6), for ``generation_config.json``."""
    values = dict(RELEASE_SAMPLING, max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    values.update(overrides)
    return GenerationConfig(**values)


class MiniOmni2GenerationMixin:
    """Adds Mini-Omni2's ``generate``: delayed parallel decoding of 8 streams (SPEC §6) and audio decoding (§7)."""

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        audio_feature_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_feature_mask: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        streamer: BaseStreamer | None = None,
        batch_parallel: bool = True,
        decode_audio: bool = True,
        codec_noise: bool = True,
        logits_processor=None,
        stopping_criteria=None,
        **kwargs,
    ) -> MiniOmni2GenerateOutput:
        r"""Answer N requests at once, one prompt row each, and decode their speech.

        Args:
            input_ids (`torch.LongTensor` of shape `(N, 8, seq)`): the prompts, left padded (SPEC §4).
            attention_mask (`torch.Tensor` of shape `(N, seq)`): 1 on real positions; every row must end on one.
            input_features, audio_feature_mask, pixel_values, image_feature_mask, audio_lengths: as for `forward`.
            generation_config (`GenerationConfig`): defaults to the model's; fields left unset take the release's
                values (do_sample, temperature 0.9, top_k 1, top_p 1.0). Keyword arguments override both.
            streamer: a [`MiniOmni2Streamer`] (text deltas and audio chunks of every request) or any transformers
                `BaseStreamer` (then the text tokens of a single request are put, prompt first, as `TextStreamer`
                expects).
            batch_parallel (`bool`): answer each speech request with two rows (SPEC §6): its own speech row gives the
                7 audio tokens, its text-out twin (built here) gives the text token fed to both.
            decode_audio (`bool`): decode speech answers to waveforms with `model.codec`.
            codec_noise (`bool`): let SNAC add its learned noise when decoding (the release does); `False` makes the
                waveform a deterministic function of the codes.
            logits_processor: transformers logits processors applied to the text scores `(N, text_vocab)` with the text
                stream history `(N, seq + t)` as `input_ids`, before the sampling warpers.
            stopping_criteria: transformers stopping criteria called with the text stream history and the text scores;
                a request they stop keeps the step.

        Keyword arguments: `max_new_tokens` (default: the generation config's, else 1024), `max_length` (prompt +
        answer), `min_new_tokens` (no stop before), `do_sample`, `temperature`, `top_k`, `top_p` (all streams),
        `audio_do_sample`, `audio_temperature`, `audio_top_k`, `audio_top_p` (the 7 audio streams, default the
        above), `generator` (a `torch.Generator` for the draws; else the global seed), `audio_logits_processor`
        (processors for the audio scores `(N * 7, audio_vocab)`, history of local ids per layer),
        `force_delay_pad` (feed `pad_a` instead of the sampled token in the delay slots, default False as in the
        release), `cache_implementation` (`"dynamic"`, default, or `"static"`), `compile_decode` (`True` or a dict of
        `torch.compile` arguments, e.g. `{"mode": "reduce-overhead"}`: compile the decoding step; implies the static
        cache), `slice_head` (default True: compute only the head columns each row uses; same tokens),
        `share_twin_prefill` (default False: prefill each twin from its speech row's cache; same outputs),
        `request_index` (from the processor: must be one row per request).
        """
        unknown = set(kwargs) - _ACCEPTED_KWARGS
        if unknown:
            raise TypeError(
                f"generate() got unexpected arguments {sorted(unknown)}; accepted: {sorted(_ACCEPTED_KWARGS)}"
            )
        layout: TokenLayout = self.config.token_layout
        if input_ids.ndim != 3 or input_ids.shape[1] != layout.num_streams:
            raise ValueError(f"input_ids must have shape (N, {layout.num_streams}, seq), got {tuple(input_ids.shape)}")
        num_requests, _, prompt_len = input_ids.shape
        device = input_ids.device
        self._check_request_index(kwargs.get("request_index"), num_requests)
        if kwargs.get("use_cache") is False:
            raise ValueError("generate always uses a cache")
        if attention_mask is None:
            attention_mask = torch.ones(num_requests, prompt_len, dtype=torch.long, device=device)
        attention_mask = attention_mask.to(device)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("every prompt must end on a real position: pad on the left (the processor does)")
        for name, mask in (("audio_feature_mask", audio_feature_mask), ("image_feature_mask", image_feature_mask)):
            if mask is not None and bool(mask[:, -1].any()):
                raise ValueError(f"{name} marks the last (answer) position; it must hold the answer tokens")
        if audio_lengths is not None and audio_feature_mask is not None:
            counts = audio_feature_mask.sum(1)[audio_feature_mask.any(1)]
            if not torch.equal(audio_lengths.to(counts.device).long(), counts.long()):
                raise ValueError("audio_lengths disagree with the number of audio positions per row")

        settings, options = self._generation_settings(generation_config, kwargs, prompt_len)
        settings = dataclasses.replace(
            settings, batch_parallel=batch_parallel, logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
        )
        static = options["cache_implementation"] == "static"
        if static and prompt_len + settings.max_new_tokens > self.config.text_config.max_position_embeddings:
            raise ValueError(
                f"a static cache of prompt ({prompt_len}) + max_new_tokens ({settings.max_new_tokens}) positions "
                f"exceeds the model's {self.config.text_config.max_position_embeddings}; lower max_new_tokens"
            )
        inputs = dict(
            input_ids=input_ids, attention_mask=attention_mask, input_features=input_features,
            audio_feature_mask=audio_feature_mask, pixel_values=pixel_values, image_feature_mask=image_feature_mask,
        )
        group = DecodeGroup(
            layout, inputs, settings, streamer=streamer,
            codec=getattr(self, "codec", None) if decode_audio else None,
            keep_rows=True, share_twin_prefill=options["share_twin_prefill"], codec_noise=codec_noise,
        )
        engine = MiniOmni2Engine(
            self,
            static_cache_len=prompt_len + settings.max_new_tokens if static else None,
            decode_forward=self._decode_forward(options["compile_decode"]),
            slice_head=options["slice_head"],
        )
        engine.run(group)
        return group.result(decode_audio=decode_audio)

    # ----- helpers -----------------------------------------------------------------------------------------------
    @staticmethod
    def _check_request_index(request_index, num_requests: int) -> None:
        if request_index is None:
            return
        request_index = torch.as_tensor(request_index).cpu()
        if request_index.numel() != num_requests or not torch.equal(request_index, torch.arange(num_requests)):
            raise ValueError(
                "generate takes one prompt row per request and builds the batch parallel rows itself; build the "
                "inputs with processor(..., batch_parallel=False)"
            )

    def _generation_settings(self, generation_config, kwargs: dict, prompt_len: int) -> tuple[DecodeSettings, dict]:
        """The engine's settings from the keyword arguments, then the generation config, then the release."""
        base = generation_config if generation_config is not None else getattr(self, "generation_config", None)
        base = copy.deepcopy(base) if base is not None else GenerationConfig()
        if (getattr(base, "num_beams", None) or 1) > 1 or (getattr(base, "num_return_sequences", None) or 1) > 1:
            raise ValueError("beam search and several sequences per request are not supported")

        def pick(name, default=None):
            if name in kwargs and kwargs[name] is not None:
                return kwargs[name]
            value = getattr(base, name, None)
            return default if value is None else value

        text = {name: pick(name, RELEASE_SAMPLING[name]) for name in _SAMPLING_FIELDS}
        audio = {name: pick(f"audio_{name}", text[name]) for name in _SAMPLING_FIELDS}
        max_new = pick("max_new_tokens")
        if max_new is None:
            max_length = kwargs.get("max_length") or getattr(base, "max_length", None)
            max_new = max_length - prompt_len if max_length is not None else DEFAULT_MAX_NEW_TOKENS
        if max_new < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
        settings = DecodeSettings(
            text=_sampling(text, ""),
            audio=_sampling(audio, "audio_"),
            max_new_tokens=int(max_new),
            min_new_tokens=int(pick("min_new_tokens", 0)),
            generator=kwargs.get("generator"),
            audio_logits_processor=kwargs.get("audio_logits_processor"),
            force_delay_pad=bool(kwargs.get("force_delay_pad", False)),
        )
        cache_impl = pick("cache_implementation", "dynamic")
        compile_decode = kwargs.get("compile_decode", False)
        if compile_decode and not isinstance(compile_decode, (bool, dict)):
            raise ValueError("compile_decode must be a bool or a dict of torch.compile arguments")
        if compile_decode:
            cache_impl = "static"
        if cache_impl not in ("dynamic", "static"):
            raise ValueError(f"cache_implementation must be 'dynamic' or 'static', got {cache_impl!r}")
        share = bool(kwargs.get("share_twin_prefill", False))
        if share and cache_impl == "static":
            raise ValueError("share_twin_prefill needs the dynamic cache (cache_implementation='dynamic')")
        options = {
            "cache_implementation": cache_impl,
            "compile_decode": compile_decode,
            "share_twin_prefill": share,
            "slice_head": bool(kwargs.get("slice_head", True)),
        }
        return settings, options

    def _decode_forward(self, compile_decode):
        if not compile_decode:
            return self.__call__
        options = {"dynamic": False}
        if isinstance(compile_decode, dict):
            options.update(compile_decode)
        key = tuple(sorted((k, repr(v)) for k, v in options.items()))
        cached = _COMPILED.get(self)
        if cached is None or cached[0] != key:
            # one graph for the decoding step: its shapes (rows, 8, 1), the full-length mask and the static cache do
            # not change from step to step
            cached = (key, torch.compile(self.__call__, **options))
            _COMPILED[self] = cached
        return cached[1]


def _sampling(values: dict, prefix: str) -> Sampling:
    """A :class:`Sampling`, its errors naming the argument (``top_p`` or ``audio_top_p`` ...)."""
    try:
        return Sampling(**values)
    except ValueError as error:
        raise ValueError(f"{prefix}{error}") from None


__all__ = [
    "MiniOmni2GenerationMixin",
    "MiniOmni2GenerateOutput",
    "release_generation_config",
    "check_twin_rule",
    "infer_task",
    "RELEASE_SAMPLING",
    "DEFAULT_MAX_NEW_TOKENS",
]
