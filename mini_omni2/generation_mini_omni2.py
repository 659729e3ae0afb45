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
import math
import weakref
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
    LogitsProcessorList,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
)
from transformers.generation.stopping_criteria import (
    MaxTimeCriteria,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)
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
#: generate's own keyword arguments (the GenerationConfig fields below are accepted as keywords too).
_OWN_KWARGS = frozenset(
    _AUDIO_SAMPLING_FIELDS
    + (
        "generator",
        "compile_decode",
        "force_delay_pad",
        "audio_logits_processor",
        "request_index",
        "share_twin_prefill",
        "slice_head",
        "tokenizer",
    )
)
#: GenerationConfig fields generate acts on (the text stream's processors and stopping criteria are transformers').
_CONFIG_FIELDS = frozenset(
    _SAMPLING_FIELDS
    + ("min_p", "max_new_tokens", "max_length", "min_new_tokens", "min_length", "max_time", "cache_implementation")
    + ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens")
    + ("sequence_bias", "renormalize_logits", "remove_invalid_values", "eos_token_id", "stop_strings")
    + ("use_cache", "return_dict_in_generate", "num_beams", "num_return_sequences")
)
#: Fields that say nothing about decoding here: token ids of other layouts (the prompt is never padded or started by
#: generate) and bookkeeping.
_CONFIG_METADATA = frozenset({"pad_token_id", "bos_token_id", "decoder_start_token_id", "transformers_version",
                              "_from_model_config", "cache_config", "compile_config", "disable_compile"})
#: Values of refused fields that mean "off" (older generation configs store them explicitly).
_NEUTRAL = {"num_beams": 1, "num_return_sequences": 1, "num_beam_groups": 1, "length_penalty": 1.0,
            "diversity_penalty": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
            "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0, "output_scores": False,
            "output_logits": False, "output_attentions": False, "output_hidden_states": False, "low_memory": False,
            "early_stopping": False, "token_healing": False, "is_assistant": False, "use_cache": True,
            "return_dict_in_generate": True, "renormalize_logits": False, "remove_invalid_values": False,
            "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "max_matching_ngram_size": None}
#: Why a refused field cannot apply to this model.
_REFUSED_BECAUSE = {
    "num_beams": "beam search cannot keep 8 delayed streams and a spoken answer consistent",
    "num_return_sequences": "one answer per request (repeat the request in the batch for several)",
    "output_scores": "scores are not collected; pass a logits_processor to record the text scores",
    "output_logits": "logits are not collected; pass a logits_processor to record the text scores",
    "output_attentions": "attentions are not collected; call the model's forward",
    "output_hidden_states": "hidden states are not collected; call the model's forward",
    "return_dict_in_generate": "generate always returns a MiniOmni2GenerateOutput (sequences in .sequences)",
    "use_cache": "generate always uses a cache",
}
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
        unknown = set(kwargs) - _OWN_KWARGS - set(GenerationConfig().to_dict())
        if unknown:
            raise TypeError(
                f"generate() got unexpected arguments {sorted(unknown)}; accepted: its own {sorted(_OWN_KWARGS)} "
                "and the fields of transformers' GenerationConfig (see docs/generation.md for the ones it supports)"
            )
        layout: TokenLayout = self.config.token_layout
        if input_ids.ndim != 3 or input_ids.shape[1] != layout.num_streams:
            raise ValueError(f"input_ids must have shape (N, {layout.num_streams}, seq), got {tuple(input_ids.shape)}")
        num_requests, _, prompt_len = input_ids.shape
        device = input_ids.device
        self._check_request_index(kwargs.get("request_index"), num_requests)
        if attention_mask is None:
            if bool(layout.is_padding(input_ids)[:, 0].any()):
                raise ValueError(
                    "these prompts are left padded (a row starts with padding ids) but no attention_mask was given: "
                    "pass the processor's attention_mask, which marks the padding"
                )
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
            settings, batch_parallel=batch_parallel,
            logits_processor=_joined(settings.logits_processor, logits_processor, LogitsProcessorList),
            stopping_criteria=_joined(settings.stopping_criteria, stopping_criteria, StoppingCriteriaList),
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
        """The engine's settings: keyword arguments over the generation config (the model's by default), and the
        release's sampling for what neither sets. Every GenerationConfig field is either applied (sampling, lengths,
        the text stream's processors and stopping criteria) or refused with the reason: none is ignored."""
        base = generation_config if generation_config is not None else getattr(self, "generation_config", None)
        config = copy.deepcopy(base) if base is not None else GenerationConfig()
        given = {k: v for k, v in kwargs.items() if k not in _OWN_KWARGS and v is not None}
        for name, value in given.items():
            setattr(config, name, value)
        _refuse_unsupported(config, given)

        def pick(name, default=None):
            value = getattr(config, name, None)
            return default if value is None else value

        text = {name: pick(name, RELEASE_SAMPLING[name]) for name in _SAMPLING_FIELDS}
        audio = {name: kwargs[f"audio_{name}"] if kwargs.get(f"audio_{name}") is not None else text[name]
                 for name in _SAMPLING_FIELDS}
        text["min_p"] = audio["min_p"] = config.min_p
        max_new = pick("max_new_tokens")
        if max_new is None:
            max_length = pick("max_length")
            max_new = max_length - prompt_len if max_length is not None else DEFAULT_MAX_NEW_TOKENS
        if max_new < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new} (max_length counts the padded prompt)")
        min_new = int(pick("min_new_tokens", 0))
        if config.min_length is not None:
            min_new = max(min_new, int(config.min_length) - prompt_len)
        settings = DecodeSettings(
            text=_sampling(text, ""),
            audio=_sampling(audio, "audio_"),
            max_new_tokens=int(max_new),
            min_new_tokens=min_new,
            generator=kwargs.get("generator"),
            logits_processor=_text_processors(config, prompt_len, self.config.token_layout),
            audio_logits_processor=kwargs.get("audio_logits_processor"),
            stopping_criteria=_stopping_criteria(config, kwargs.get("tokenizer"), self.config.token_layout),
            text_stop_ids=_text_stop_ids(config.eos_token_id, self.config.token_layout),
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


def _refuse_unsupported(config: GenerationConfig, given: dict) -> None:
    """A ValueError for any GenerationConfig field set to something generate cannot do (none is ignored)."""
    for name, value in config.to_dict().items():
        if value is None or name in _CONFIG_METADATA:
            continue
        explicit = name in given
        if name in _CONFIG_FIELDS and name not in _REFUSED_BECAUSE:
            continue
        neutral = _NEUTRAL.get(name, _UNSET)
        if value == neutral and not (explicit and name == "return_dict_in_generate" and value is False):
            continue
        if name == "return_dict_in_generate" and value is True:
            continue
        reason = _REFUSED_BECAUSE.get(name, "it has no meaning for Mini-Omni2's 8-stream decoding")
        raise ValueError(f"generate does not support {name}={value!r}: {reason}")


_UNSET = object()


def _text_processors(config: GenerationConfig, prompt_len: int, layout: TokenLayout) -> LogitsProcessorList:
    """transformers' logits processors for the GenerationConfig fields that shape the text stream (its scores
    ``(n, text_vocab)``, its history ``(n, seq + t)``); the user's ``logits_processor`` run after them."""
    _check_number(config.repetition_penalty, "repetition_penalty", "a positive number (1.0: none)", positive=True)
    _check_number(config.no_repeat_ngram_size, "no_repeat_ngram_size", "an integer >= 0 (0: none)", integer=True)
    processors = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=float(config.repetition_penalty)))
    if config.no_repeat_ngram_size:
        processors.append(NoRepeatNGramLogitsProcessor(int(config.no_repeat_ngram_size)))
    if config.bad_words_ids:
        processors.append(NoBadWordsLogitsProcessor(config.bad_words_ids, eos_token_id=None))
    if config.sequence_bias:
        processors.append(SequenceBiasLogitsProcessor(sequence_bias=config.sequence_bias))
    if config.suppress_tokens:
        processors.append(SuppressTokensLogitsProcessor(config.suppress_tokens))
    if config.begin_suppress_tokens:
        # the history a step sees is the prompt plus the steps before it: the first answer step sees prompt_len
        processors.append(SuppressTokensAtBeginLogitsProcessor(config.begin_suppress_tokens, begin_index=prompt_len))
    if config.remove_invalid_values:
        processors.append(InfNanRemoveLogitsProcessor())
    if config.renormalize_logits:
        processors.append(LogitNormalization())
    for ids in (config.suppress_tokens or []) + (config.begin_suppress_tokens or []):
        if not 0 <= int(ids) < layout.text_vocab_size:
            raise ValueError(f"suppressed token ids must be text ids in [0, {layout.text_vocab_size}), got {ids}")
    return processors or None


def _check_number(value, name: str, expected: str, positive: bool = False, integer: bool = False) -> None:
    """A ValueError unless ``value`` (when set) is a finite number (> 0 with ``positive``, an int >= 0 with
    ``integer``): transformers' processors would raise deep inside, or misbehave on NaN."""
    if value is None:
        return
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    bad = bad or (positive and value <= 0) or (integer and (not float(value).is_integer() or value < 0))
    if bad:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _stopping_criteria(config: GenerationConfig, tokenizer: Any, layout: TokenLayout) -> StoppingCriteriaList | None:
    criteria = StoppingCriteriaList()
    _check_number(config.max_time, "max_time", "a number of seconds >= 0", integer=False)
    if config.max_time is not None and config.max_time < 0:
        raise ValueError(f"max_time must be a number of seconds >= 0, got {config.max_time!r}")
    if config.max_time is not None:
        criteria.append(MaxTimeCriteria(max_time=float(config.max_time)))
    if config.stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: generate(..., stop_strings=..., "
                             "tokenizer=processor.tokenizer)")
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # the processor or its tokenizer
        criteria.append(_TokenizerIdsOnly(StopStringCriteria(tokenizer, config.stop_strings), tokenizer, layout))
    return criteria or None


def _text_stop_ids(eos_token_id, layout: TokenLayout) -> tuple[int, ...]:
    """``eos_token_id``: text ids that end the text as ``eot`` does (they are replaced by ``eot``)."""
    if eos_token_id is None:
        return ()
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    for token in ids:
        if not isinstance(token, int) or not 0 <= token < layout.text_vocab_size:
            raise ValueError(f"eos_token_id must be text ids in [0, {layout.text_vocab_size}), got {eos_token_id!r}")
    return tuple(t for t in ids if t != layout.eot)


class _TokenizerIdsOnly(StoppingCriteria):
    """Runs a criterion on the text stream's tokenizer ids only (the layout's specials dropped, rows right aligned and
    padded with the tokenizer's pad id): ``StopStringCriteria`` indexes its tables by tokenizer id."""

    def __init__(self, inner: StoppingCriteria, tokenizer: Any, layout: TokenLayout):
        self.inner = inner
        self.limit = min(layout.tokenizer_vocab_size, len(tokenizer))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad = int(pad) if pad is not None else 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        rows = [row[(row >= 0) & (row < self.limit)] for row in input_ids]
        width = max(1, max(len(row) for row in rows))
        batch = torch.full((len(rows), width), self.pad, dtype=torch.long, device=input_ids.device)
        for k, row in enumerate(rows):
            if len(row):
                batch[k, width - len(row) :] = row
        return self.inner(batch, scores, **kwargs)


def _joined(from_config, from_user, cls):
    """The GenerationConfig's processors (or criteria), then the user's, as transformers orders them."""
    user = [] if from_user is None else (list(from_user) if isinstance(from_user, (list, tuple)) else [from_user])
    joined = list(from_config or []) + user
    return cls(joined) if joined else None


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
