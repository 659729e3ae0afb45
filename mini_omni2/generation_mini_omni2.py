"""Generation for Mini-Omni2: text-instruct delayed parallel decoding and batch parallel decoding (SPEC §6-7).

``model.generate`` takes one prompt row per request (as built by :class:`MiniOmni2Processor`, left padded) and
answers every request in the way its last prompt position asks for: ``answer_a`` on the audio streams gives a spoken
answer (text + speech), otherwise a text answer (``asr`` on the text stream gives a transcription, decoded the same
way). See ``docs/generation.md``.

This file is shipped as remote code with saved models: it imports only torch, transformers and sibling modules.
"""

from __future__ import annotations

import copy
import functools
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache, StaticCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.utils import ModelOutput

from .streaming_mini_omni2 import StreamStep
from .token_layout import OUTPUT_ASR, OUTPUT_SPEECH, OUTPUT_TEXT, TASKS, TokenLayout, task_name

#: The release's sampling settings (SPEC §6): temperature 0.9, top_k 1 (effectively greedy), top_p 1.0.
RELEASE_SAMPLING = {"do_sample": True, "temperature": 0.9, "top_k": 1, "top_p": 1.0}
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
    )
)
_FINISH_REASONS = ("length", "eoa", "eot", "stopping_criteria")
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (options, compiled forward)


def release_generation_config(**overrides: Any) -> GenerationConfig:
    """A :class:`GenerationConfig` with the release's sampling settings (SPEC §6), for ``generation_config.json``."""
    values = dict(RELEASE_SAMPLING, max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    values.update(overrides)
    return GenerationConfig(**values)


@dataclass
class MiniOmni2GenerateOutput(ModelOutput):
    """What :meth:`MiniOmni2GenerationMixin.generate` returns; the lists hold one entry per request (input row).

    Args:
        sequences: (N, 8, prompt_len + steps) global ids: the prompt, then the ids fed back at each step (for a spoken
            answer, its speech row's). After a request finished, its positions hold ``pad_a``/``pad_t``.
        generated_lengths: (N,) steps that belong to each answer (the step whose layer-7 ``eoa`` or text-row ``eot``
            stopped it is not counted).
        text_ids: the answer's text tokens, cut at the first ``eot``, without text specials (``pad_t`` ...).
        audio_frames: codec frames (T, 7) of local codes after undelay (SPEC §7) and sanitizing: a special id where a
            code is expected is replaced by the previous code of its layer (0 at the start), see
            :meth:`TokenLayout.sanitize_frames`. ``None`` for text answers.
        audio_frames_replaced: bool (T, 7), which frame entries were replaced by sanitizing; ``None`` for text answers.
        audio_codes: the three SNAC levels (1, T), (1, 2T), (1, 4T) of the frames; ``None`` for text answers.
        waveforms: 1-D float waveforms at ``sampling_rate`` (T x 2048 samples at 24 kHz); ``None`` for text answers,
            with ``decode_audio=False`` or when the model has no codec.
        sampling_rate: the codec's sampling rate (24,000), ``None`` without a codec.
        output_kinds: ``"speech"``, ``"text"`` or ``"asr"`` per request, read from its last prompt position.
        tasks: the prompt layout recognised per request (``"A1A2"``, ``"T1T2"`` ...) or ``None`` if not a known one.
        finish_reasons: ``"eoa"`` (speech), ``"eot"`` (text), ``"stopping_criteria"`` or ``"length"``.
    """

    sequences: torch.LongTensor | None = None
    generated_lengths: torch.LongTensor | None = None
    text_ids: list[torch.LongTensor] | None = None
    audio_frames: list[torch.LongTensor | None] | None = None
    audio_frames_replaced: list[torch.BoolTensor | None] | None = None
    audio_codes: list[list[torch.LongTensor] | None] | None = None
    waveforms: list[torch.FloatTensor | None] | None = None
    sampling_rate: int | None = None
    output_kinds: list[str] | None = None
    tasks: list[str | None] | None = None
    finish_reasons: list[str] | None = None


@functools.lru_cache(maxsize=None)
def check_twin_rule(layout: TokenLayout) -> None:
    """Assert that generate's twin rule is SPEC §6's second row for every speech task of ``layout``.

    ``generate`` builds the text-out row of a speech request by replacing the last position's 7 audio-stream tokens
    with ``pad_a``. This checks, per speech task, that the result is exactly the prompt of
    :meth:`TokenLayout.text_output_task` (A1A2 -> A1T2, T1A2 -> T1T2, VA1A2 -> VA1T2, ...).
    """
    pad_ids = layout.pad_ids()[: layout.num_audio_layers].tolist()
    for task, (inputs, output) in TASKS.items():
        if output != OUTPUT_SPEECH:
            continue
        kwargs: dict[str, Any] = {}
        if "audio" in inputs:
            kwargs["num_audio_frames"] = 3
        if "text" in inputs:
            kwargs["text_ids"] = [0, 1]
        speech = layout.build_prompt(task, **kwargs)
        text = layout.build_prompt(layout.text_output_task(task), **kwargs)
        twin = [list(row) for row in speech.streams]
        for i, pad in enumerate(pad_ids):
            twin[i][-1] = pad
        if twin != text.streams or speech.audio_positions != text.audio_positions:
            raise AssertionError(f"the twin of {task} is not the {layout.text_output_task(task)} prompt")


def infer_task(layout: TokenLayout, streams: torch.Tensor) -> str | None:
    """The task of one prompt (8, len) of real positions, read from its ids; ``None`` if it is not a known layout."""
    audio0 = streams[0].tolist()
    text = streams[layout.text_stream].tolist()
    inputs = set()
    if layout.layershift(layout.image, 0) in audio0:
        inputs.add("image")
    if layout.layershift(layout.input_a, 0) in audio0:
        inputs.add("audio")
    if any(0 <= t < layout.tokenizer_vocab_size for t in text):
        inputs.add("text")
    if audio0[-1] == layout.layershift(layout.answer_a, 0):
        output = OUTPUT_SPEECH
    elif text[-1] == layout.asr:
        output = OUTPUT_ASR
    else:
        output = OUTPUT_TEXT
    try:
        return task_name(inputs, output)
    except ValueError:
        return None


def _sampling_processors(temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        if temperature <= 0:
            raise ValueError(
                f"temperature must be > 0 when sampling, got {temperature}; use do_sample=False for greedy"
            )
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(int(top_k)))
    if top_p is not None and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    return processors


class _Sampler:
    """Picks ids from (rows, vocab) scores: greedy (argmax) or through transformers' warpers and a multinomial draw."""

    def __init__(self, do_sample: bool, temperature: float, top_k: int, top_p: float, user: Any, generator):
        # top_k == 1 keeps only the best id: that is argmax, without the softmax and the random draw.
        self.greedy = (not do_sample) or top_k == 1
        self.warpers = None if self.greedy else _sampling_processors(temperature, top_k, top_p)
        self.user = user
        self.generator = generator

    def __call__(self, history, scores: torch.Tensor) -> torch.Tensor:
        if self.user:
            scores = self.user(history() if callable(history) else history, scores)
        if self.greedy:
            return scores.argmax(dim=-1)
        scores = self.warpers(None, scores.float())
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


def _as_list(value, cls):
    if value is None:
        return None
    if isinstance(value, cls):
        return value
    return cls(value if isinstance(value, (list, tuple)) else [value])


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
        cache), `request_index` (from the processor: must be one row per request).
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

        settings = self._generation_settings(generation_config, kwargs, prompt_len)
        max_new_tokens = settings["max_new_tokens"]

        # ----- per-request kind, read from the last prompt position -----------------------------------------
        offsets = layout.stream_offsets(device)  # (8,) local -> global
        audio_offsets = offsets[: layout.num_audio_layers]
        last = input_ids[:, :, -1]
        answer_a = layout.answer_a + audio_offsets
        is_answer_a = last[:, : layout.num_audio_layers] == answer_a
        is_speech = is_answer_a[:, 0]
        if bool((is_answer_a.any(1) & ~is_answer_a.all(1)).any()):
            raise ValueError("a prompt's last position has answer_a on some audio streams but not all 7")
        is_asr = (~is_speech) & (last[:, layout.text_stream] == layout.asr)
        kinds = [
            OUTPUT_SPEECH if s else (OUTPUT_ASR if a else OUTPUT_TEXT)
            for s, a in zip(is_speech.tolist(), is_asr.tolist())
        ]
        real = attention_mask.bool()
        tasks = [infer_task(layout, input_ids[r][:, real[r]]) for r in range(num_requests)]

        # ----- batch parallel twins (SPEC §6) ------------------------------------------------------------------
        pad_audio = layout.pad_ids(device)[: layout.num_audio_layers]  # (7,)
        twin_of = [r for r in range(num_requests) if batch_parallel and kinds[r] == OUTPUT_SPEECH]
        if twin_of:
            check_twin_rule(layout)
            for r in twin_of:
                if tasks[r] is not None:
                    layout.text_output_task(tasks[r])  # raises if the task has no text-out twin
        twin_index = torch.tensor(twin_of, dtype=torch.long, device=device)
        num_rows = num_requests + len(twin_of)
        # row whose text logits give each request's text token: its twin for batch parallel speech requests
        text_source = torch.arange(num_requests, device=device)
        if twin_of:
            text_source[twin_index] = torch.arange(num_requests, num_rows, device=device)

        # ----- prefill: encoders run once, twins reuse the embeddings -----------------------------------------
        total_len = prompt_len + max_new_tokens
        row_mask = attention_mask
        if twin_of:
            row_mask = torch.cat([attention_mask, attention_mask[twin_index]], dim=0)
        full_mask = torch.cat([row_mask.long(), row_mask.new_ones(num_rows, max_new_tokens).long()], dim=1)
        prompt_positions = (row_mask.long().cumsum(-1) - 1).clamp(min=0)
        next_position = row_mask.long().sum(-1, keepdim=True)  # (rows, 1)
        static = settings["cache_implementation"] == "static"
        if static:
            cache = StaticCache(config=self.config.text_config, max_cache_len=total_len)
        else:
            cache = DynamicCache(config=self.config.text_config)
        decode_forward = self._decode_forward(settings["compile_decode"])

        self._streamer_begin(streamer, layout, kinds, input_ids, attention_mask, codec_noise, decode_audio)
        try:
            embeds = self.model.embed(input_ids, input_features, audio_feature_mask, pixel_values, image_feature_mask)
            if twin_of:
                twin_last = input_ids[twin_index, :, -1:].clone()
                twin_last[:, : layout.num_audio_layers, 0] = pad_audio
                twin_embeds = torch.cat([embeds[twin_index, :-1], self.model.embed(twin_last)], dim=1)
                embeds = torch.cat([embeds, twin_embeds], dim=0)
            out = self(
                inputs_embeds=embeds,
                attention_mask=full_mask[:, :prompt_len] if not static else full_mask,
                position_ids=prompt_positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        except BaseException as error:
            self._streamer_abort(streamer, error)
            raise

        # ----- state ----------------------------------------------------------------------------------------
        history = torch.empty(num_requests, layout.num_streams, total_len, dtype=torch.long, device=device)
        history[:, :, :prompt_len] = input_ids
        pad_ids = layout.pad_ids(device)  # (8,)
        finished = torch.zeros(num_requests, dtype=torch.bool, device=device)
        text_done = torch.zeros(num_requests, dtype=torch.bool, device=device)
        lengths = torch.zeros(num_requests, dtype=torch.long, device=device)
        reasons = torch.zeros(num_requests, dtype=torch.long, device=device)  # index into _FINISH_REASONS
        speech_col = is_speech[:, None]
        eot, pad_t, eoa, pad_a = layout.eot, layout.pad_t, layout.eoa, layout.pad_a
        last_layer = layout.num_audio_layers - 1
        delay_slots = torch.arange(layout.num_audio_layers, device=device)
        stopping = _as_list(stopping_criteria, StoppingCriteriaList)
        text_sampler = _Sampler(
            settings["do_sample"], settings["temperature"], settings["top_k"], settings["top_p"],
            _as_list(logits_processor, LogitsProcessorList), settings["generator"],
        )
        audio_sampler = _Sampler(
            settings["audio_do_sample"], settings["audio_temperature"], settings["audio_top_k"],
            settings["audio_top_p"], _as_list(settings["audio_logits_processor"], LogitsProcessorList),
            settings["generator"],
        )
        min_new_tokens = settings["min_new_tokens"]

        steps = 0
        try:
            for step in range(max_new_tokens):
                cur = prompt_len + step
                text_scores = out.text_logits[text_source, -1]  # (N, text_vocab)
                audio_scores = out.audio_logits[:num_requests, :, -1]  # (N, 7, audio_vocab)
                if step < min_new_tokens:  # ban each request's stop token (masks, not boolean indexing: no sync)
                    # text_scores is a gathered copy; audio_scores a view of logits that are dropped after this step
                    banned = torch.tensor(float("-inf"), device=device, dtype=text_scores.dtype)
                    text_scores[:, eot] = torch.where(is_speech, text_scores[:, eot], banned)
                    audio_scores[:, last_layer, eoa] = torch.where(is_speech, banned, audio_scores[:, last_layer, eoa])
                text_tok = text_sampler(history[:, layout.text_stream, :cur], text_scores)
                audio_hist = lambda: (  # noqa: E731  (built only if an audio processor asks for it)
                    history[:, : layout.num_audio_layers, :cur] - audio_offsets[None, :, None]
                ).flatten(0, 1)
                audio_tok = audio_sampler(audio_hist, audio_scores.flatten(0, 1)).view(num_requests, -1)
                if settings["force_delay_pad"] and step < layout.num_audio_layers:
                    audio_tok = torch.where(delay_slots[None] >= step, torch.full_like(audio_tok, pad_a), audio_tok)

                # the rules of SPEC §6
                text_tok = torch.where(text_done, torch.full_like(text_tok, pad_t), text_tok)
                stop_eoa = is_speech & (audio_tok[:, last_layer] == eoa)
                stop_eot = ~is_speech & (text_tok == eot)
                stop_now = (stop_eoa | stop_eot) & ~finished
                reasons = torch.where(stop_now, torch.where(stop_eoa, 1, 2), reasons)
                finished = finished | stop_now
                text_done = text_done | (text_tok == eot)

                fed = torch.cat([torch.where(speech_col, audio_tok, pad_a) + audio_offsets, text_tok[:, None]], dim=1)
                fed = torch.where(finished[:, None], pad_ids, fed)
                history[:, :, cur] = fed
                kept = ~finished  # the step belongs to the answer (a stopping criterion below keeps it too)
                lengths = lengths + kept.long()
                if stopping is not None:
                    stop_user = stopping(history[:, layout.text_stream, : cur + 1], text_scores) & ~finished
                    reasons = torch.where(stop_user, 3, reasons)
                    finished = finished | stop_user
                steps = step + 1
                if streamer is not None:
                    self._streamer_put(streamer, layout, fed, kept, finished)
                if step + 1 == max_new_tokens or bool(finished.all()):
                    break

                # feed the step back: request rows, then twins (pad_a on the audio streams, the same text token)
                step_ids = fed
                if twin_of:
                    twin_ids = torch.cat([pad_audio.expand(len(twin_of), -1), fed[twin_index, -1:]], dim=1)
                    twin_ids = torch.where(finished[twin_index, None], pad_ids, twin_ids)
                    step_ids = torch.cat([fed, twin_ids], dim=0)
                out = decode_forward(
                    input_ids=step_ids[:, :, None],
                    attention_mask=full_mask if static else full_mask[:, : cur + 1],
                    position_ids=next_position + step,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
        except BaseException as error:
            self._streamer_abort(streamer, error)
            raise
        if streamer is not None:
            streamer.end()
        return self._finish(layout, input_ids, history, prompt_len, steps, lengths, finished, reasons, kinds, tasks,
                            decode_audio, codec_noise)

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

    def _generation_settings(self, generation_config, kwargs: dict, prompt_len: int) -> dict:
        base = generation_config if generation_config is not None else getattr(self, "generation_config", None)
        base = copy.deepcopy(base) if base is not None else GenerationConfig()
        if (getattr(base, "num_beams", None) or 1) > 1 or (getattr(base, "num_return_sequences", None) or 1) > 1:
            raise ValueError("beam search and several sequences per request are not supported")

        def pick(name, default=None):
            if name in kwargs and kwargs[name] is not None:
                return kwargs[name]
            value = getattr(base, name, None)
            return default if value is None else value

        settings = {name: pick(name, RELEASE_SAMPLING[name]) for name in _SAMPLING_FIELDS}
        for name in _SAMPLING_FIELDS:
            settings[f"audio_{name}"] = pick(f"audio_{name}", settings[name])
        for prefix in ("", "audio_"):
            top_p = settings[f"{prefix}top_p"]
            if not 0.0 < float(top_p) <= 1.0:
                raise ValueError(f"{prefix}top_p must be in (0, 1], got {top_p}")
            if int(settings[f"{prefix}top_k"]) < 0:
                raise ValueError(f"{prefix}top_k must be >= 0 (0 disables it), got {settings[f'{prefix}top_k']}")
        max_new = pick("max_new_tokens")
        if max_new is None:
            max_length = kwargs.get("max_length") or getattr(base, "max_length", None)
            max_new = max_length - prompt_len if max_length is not None else DEFAULT_MAX_NEW_TOKENS
        if max_new < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
        settings["max_new_tokens"] = int(max_new)
        settings["min_new_tokens"] = int(pick("min_new_tokens", 0))
        cache_impl = pick("cache_implementation", "dynamic")
        compile_decode = kwargs.get("compile_decode", False)
        if compile_decode and not isinstance(compile_decode, (bool, dict)):
            raise ValueError("compile_decode must be a bool or a dict of torch.compile arguments")
        settings["compile_decode"] = compile_decode
        if compile_decode:
            cache_impl = "static"
        if cache_impl not in ("dynamic", "static"):
            raise ValueError(f"cache_implementation must be 'dynamic' or 'static', got {cache_impl!r}")
        settings["cache_implementation"] = cache_impl
        settings["generator"] = kwargs.get("generator")
        settings["force_delay_pad"] = bool(kwargs.get("force_delay_pad", False))
        settings["audio_logits_processor"] = kwargs.get("audio_logits_processor")
        return settings

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

    def _streamer_begin(self, streamer, layout, kinds, input_ids, attention_mask, codec_noise, decode_audio) -> None:
        if streamer is None:
            return
        if hasattr(streamer, "begin"):
            codec = getattr(self, "codec", None) if decode_audio else None  # without it: frames, no waveforms
            streamer.begin(layout=layout, codec=codec, output_kinds=kinds, codec_noise=codec_noise)
            return
        if len(kinds) != 1:
            raise ValueError("a plain transformers streamer takes one request; use MiniOmni2Streamer for batches")
        text = input_ids[0, layout.text_stream][attention_mask[0].bool()]
        streamer.put(text[(text >= 0) & (text < layout.tokenizer_vocab_size)].cpu())

    @staticmethod
    def _streamer_abort(streamer, error: BaseException) -> None:
        if streamer is not None and hasattr(streamer, "abort"):
            streamer.abort(error)

    @staticmethod
    def _streamer_put(streamer, layout, fed, kept, finished) -> None:
        if hasattr(streamer, "begin"):
            streamer.put(StreamStep(tokens=fed, kept=kept, finished=finished))
            return
        # a transformers text streamer: the text token of the single request, when it is a tokenizer id
        token = int(fed[0, layout.text_stream])
        if bool(kept[0]) and 0 <= token < layout.tokenizer_vocab_size:
            streamer.put(torch.tensor([token]))

    def _finish(self, layout, input_ids, history, prompt_len, steps, lengths, finished, reasons, kinds, tasks,
                decode_audio, codec_noise) -> MiniOmni2GenerateOutput:
        num_requests = input_ids.shape[0]
        device = input_ids.device
        sequences = history[:, :, : prompt_len + steps].clone()
        lengths_list = lengths.tolist()
        pad_ids = layout.pad_ids(device)
        position = torch.arange(steps, device=device)
        after = position[None, :] >= lengths[:, None]  # (N, steps)
        generated = sequences[:, :, prompt_len:]
        sequences[:, :, prompt_len:] = torch.where(after[:, None, :], pad_ids[None, :, None], generated)
        reason_names = [_FINISH_REASONS[k] for k in reasons.tolist()]

        codec = getattr(self, "codec", None)
        audio_offsets = layout.stream_offsets(device)[: layout.num_audio_layers, None]
        text_ids, frames_out, replaced_out, codes_out, waves = [], [], [], [], []
        for r in range(num_requests):
            n = lengths_list[r]
            text = generated[r, layout.text_stream, :n]
            ends = (text == layout.eot).nonzero()
            if len(ends):
                text = text[: int(ends[0, 0])]
            text_ids.append(text[(text >= 0) & (text < layout.tokenizer_vocab_size)].clone())
            if kinds[r] != OUTPUT_SPEECH:
                for column in (frames_out, replaced_out, codes_out, waves):
                    column.append(None)
                continue
            local = generated[r, : layout.num_audio_layers, :n] - audio_offsets
            frames, replaced = layout.sanitize_frames(layout.undelay(local))
            frames_out.append(frames)
            replaced_out.append(replaced)
            codes_out.append([level[None] for level in layout.frames_to_snac(frames)])
            if decode_audio and codec is not None:
                waves.append(codec.decode(frames[None], noise=codec_noise)[0].float())
            else:
                waves.append(None)
        return MiniOmni2GenerateOutput(
            sequences=sequences,
            generated_lengths=lengths,
            text_ids=text_ids,
            audio_frames=frames_out,
            audio_frames_replaced=replaced_out,
            audio_codes=codes_out,
            waveforms=waves,
            sampling_rate=codec.sampling_rate if codec is not None else None,
            output_kinds=kinds,
            tasks=tasks,
            finish_reasons=reason_names,
        )


__all__ = [
    "MiniOmni2GenerationMixin",
    "MiniOmni2GenerateOutput",
    "release_generation_config",
    "check_twin_rule",
    "infer_task",
    "RELEASE_SAMPLING",
    "DEFAULT_MAX_NEW_TOKENS",
]
