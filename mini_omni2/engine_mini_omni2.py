"""The decoding engine of Mini-Omni2: the one owner of the decoding rules (SPEC §6-7), for many requests at once.

A :class:`MiniOmni2Engine` holds the rows of every request in flight in one batched KV cache and advances them all by
one step per :meth:`~MiniOmni2Engine.step`. Requests come in :class:`DecodeGroup` objects (a ``generate`` call is one
group; a server request is a group of one): a group shares its sampling settings, its streamer and its history.
Groups join at any step (their prompts are prefilled, alone or together with other waiting groups, and their rows are
appended to the cache), and their rows leave between steps when they finish or are cancelled: continuous batching.

Each request has one row, plus for a spoken answer with batch parallel decoding its text-out twin (SPEC §6). Per step,
from the last position of each row only the head columns that are used are computed (:meth:`DecodeGroup.text_slots`,
:meth:`DecodeGroup.audio_slots`): a speech row's 7 audio slices, a twin's or a text row's text slice, nothing for a
row whose text has ended and whose audio is not needed. See ``docs/serving.md`` (engine) and ``docs/generation.md``.

This file is shipped as remote code with saved models: it imports only torch, transformers and sibling modules.
"""

from __future__ import annotations

import collections
import functools
import itertools
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.utils import ModelOutput

from .streaming_mini_omni2 import StreamStep
from .token_layout import (
    LISTEN_FEATURES,
    OUTPUT_ASR,
    OUTPUT_SPEECH,
    OUTPUT_TEXT,
    TASKS,
    TokenLayout,
    check_listen_rule,
    normalize_listen_rule,
    task_name,
)

#: The release's sampling settings (SPEC §6): temperature 0.9, top_k 1 (effectively greedy), top_p 1.0.
RELEASE_SAMPLING = {"do_sample": True, "temperature": 0.9, "top_k": 1, "top_p": 1.0}
#: Why a request ended, as reported in outputs and streams.
FINISH_REASONS = ("length", "eoa", "eot", "stopping_criteria", "cancelled")
#: The most microphone frames a listening row reads in one engine step (docs/duplex.md): one when decoding keeps up
#: with real time, more while it catches up on a backlog, so the row keeps real time down to 11.7 / 4 = 2.9 steps/s.
LISTEN_CATCH_UP_FRAMES = 4
_LENGTH, _EOA, _EOT, _STOPPED, _CANCELLED = range(len(FINISH_REASONS))


# ----------------------------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class MiniOmni2GenerateOutput(ModelOutput):
    """What a group of requests produced (``generate`` returns it); the lists hold one entry per request (input row).

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
        finish_reasons: ``"eoa"`` (speech), ``"eot"`` (text), ``"stopping_criteria"``, ``"cancelled"`` or ``"length"``.
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


# ----------------------------------------------------------------------------------------------------------------
# prompts: what a request answers, its twin
# ----------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def check_twin_rule(layout: TokenLayout) -> None:
    """Assert that the engine's twin rule is SPEC §6's second row for every speech task of ``layout``.

    The engine builds the text-out row of a speech request by replacing the last position's 7 audio-stream tokens
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


def output_kinds(layout: TokenLayout, input_ids: torch.Tensor) -> list[str]:
    """What each prompt row (N, 8, seq) asks for, read from its last position: ``answer_a`` on the audio streams is
    a spoken answer, ``asr`` on the text stream a transcription, anything else a text answer."""
    audio_offsets = layout.stream_offsets(input_ids.device)[: layout.num_audio_layers]
    last = input_ids[:, :, -1]
    is_answer_a = last[:, : layout.num_audio_layers] == layout.answer_a + audio_offsets
    if bool((is_answer_a.any(1) & ~is_answer_a.all(1)).any()):
        raise ValueError("a prompt's last position has answer_a on some audio streams but not all 7")
    is_asr = last[:, layout.text_stream] == layout.asr
    return [
        OUTPUT_SPEECH if s else (OUTPUT_ASR if a else OUTPUT_TEXT)
        for s, a in zip(is_answer_a[:, 0].tolist(), is_asr.tolist())
    ]


# ----------------------------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """How one stream kind is sampled: greedy (``do_sample=False`` or ``top_k=1``) or warped multinomial draws."""

    do_sample: bool = RELEASE_SAMPLING["do_sample"]
    temperature: float = RELEASE_SAMPLING["temperature"]
    top_k: int = RELEASE_SAMPLING["top_k"]
    top_p: float = RELEASE_SAMPLING["top_p"]
    min_p: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if int(self.top_k) < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.min_p is not None and not 0.0 <= float(self.min_p) <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.do_sample and not self.greedy and not float(self.temperature) > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}; use do_sample=False")

    @property
    def greedy(self) -> bool:
        """``top_k == 1`` keeps only the best id: that is argmax, without the softmax and the random draw."""
        return (not self.do_sample) or int(self.top_k) == 1

    def warpers(self) -> LogitsProcessorList:
        processors = LogitsProcessorList()
        if self.temperature is not None and self.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(float(self.temperature)))
        if self.top_k:
            processors.append(TopKLogitsWarper(int(self.top_k)))
        if self.top_p is not None and self.top_p < 1.0:
            processors.append(TopPLogitsWarper(float(self.top_p)))
        if self.min_p:
            processors.append(MinPLogitsWarper(float(self.min_p)))
        return processors


class _Sampler:
    """Picks ids from (rows, vocab) scores: user processors, then argmax or transformers' warpers and a draw."""

    def __init__(self, sampling: Sampling, user: LogitsProcessorList | None, generator: torch.Generator | None):
        self.greedy = sampling.greedy
        self.warpers = None if self.greedy else sampling.warpers()
        self.user = user
        self.generator = generator

    def __call__(self, history: Callable[[], torch.Tensor], scores: torch.Tensor) -> torch.Tensor:
        if self.user:
            scores = self.user(history(), scores)
        if self.greedy:
            return scores.argmax(dim=-1)
        scores = self.warpers(None, scores.float())
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


@dataclass
class DecodeSettings:
    """Everything a group of requests is decoded with.

    Args:
        text, audio: sampling of the text stream and of the 7 audio streams.
        max_new_tokens: steps at most; min_new_tokens: steps before a request may stop (its stop token is banned).
        generator: the ``torch.Generator`` of the random draws (``None``: the global RNG).
        logits_processor: transformers processors for the text scores ``(n, text_vocab)``, with the text-stream
            history ``(n, seq + t)`` as ``input_ids`` (n = the group's requests still running).
        audio_logits_processor: processors for the audio scores ``(n * 7, audio_vocab)``, with each layer's local
            ids so far as ``input_ids``.
        stopping_criteria: transformers stopping criteria, called with the text-stream history and the text scores;
            a request they stop keeps the step.
        text_stop_ids: text ids that end the text as ``eot`` does (``eos_token_id``); they are replaced by ``eot``.
        force_delay_pad: feed ``pad_a`` in the delay slots instead of the sampled token (the release does not).
        batch_parallel: answer each speech request with its speech row and its text-out twin (SPEC §6).
    """

    text: Sampling = field(default_factory=Sampling)
    audio: Sampling | None = None
    max_new_tokens: int = 1024
    min_new_tokens: int = 0
    generator: torch.Generator | None = None
    logits_processor: LogitsProcessorList | None = None
    audio_logits_processor: LogitsProcessorList | None = None
    stopping_criteria: StoppingCriteriaList | None = None
    text_stop_ids: tuple[int, ...] = ()
    force_delay_pad: bool = False
    batch_parallel: bool = True

    def __post_init__(self) -> None:
        if self.audio is None:
            self.audio = self.text
        self.logits_processor = _as_list(self.logits_processor, LogitsProcessorList)
        self.audio_logits_processor = _as_list(self.audio_logits_processor, LogitsProcessorList)
        self.stopping_criteria = _as_list(self.stopping_criteria, StoppingCriteriaList)
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if int(self.min_new_tokens) < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")


def _as_list(value, cls):
    """``None``, one processor / criterion, or a list of them -> ``cls`` (``LogitsProcessorList`` ...) or None."""
    if value is None or isinstance(value, cls):
        return value
    return cls(value if isinstance(value, (list, tuple)) else [value])


# ----------------------------------------------------------------------------------------------------------------
# the batched KV cache: rows join, leave and are trimmed between steps
# ----------------------------------------------------------------------------------------------------------------
class RowCacheLayer(DynamicLayer):
    """A :class:`DynamicLayer` whose tensors grow in place (amortised doubling instead of a copy per step) and whose
    rows can be selected, appended (left padded) and trimmed on the left by the engine between steps."""

    def __init__(self) -> None:
        super().__init__()
        self._keys: torch.Tensor | None = None  # (rows, heads, capacity, dim)
        self._values: torch.Tensor | None = None
        self._length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._set(key_states[:, :, :0], value_states[:, :, :0], capacity=0)
        self.is_initialized = True

    def _set(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        """Hold ``keys``/``values`` (rows, heads, length, dim) in buffers of at least ``capacity`` positions."""
        length = keys.shape[-2]
        capacity = max(capacity, length)
        self._keys = keys.new_empty(keys.shape[0], keys.shape[1], capacity, keys.shape[3])
        self._values = values.new_empty(values.shape[0], values.shape[1], capacity, values.shape[3])
        self._keys[:, :, :length] = keys
        self._values[:, :, :length] = values
        self._length = length
        self._views()

    def _views(self) -> None:
        self.keys = self._keys[:, :, : self._length]
        self.values = self._values[:, :, : self._length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self._length + new > self._keys.shape[-2]:
            self._set(self.keys, self.values, capacity=max(16, 2 * (self._length + new)))
        self._keys[:, :, self._length : self._length + new] = key_states
        self._values[:, :, self._length : self._length + new] = value_states
        self._length += new
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length if self.is_initialized else 0

    # ----- row surgery (the engine, between steps) -------------------------------------------------------------
    def select_rows(self, index: torch.Tensor) -> None:
        if self.is_initialized:
            self._set(self.keys[index], self.values[index], capacity=self._keys.shape[-2])

    def drop_left(self, columns: int) -> None:
        if self.is_initialized and columns > 0:
            self._set(self.keys[:, :, columns:], self.values[:, :, columns:], capacity=self._keys.shape[-2])

    def append_rows(self, other: "RowCacheLayer") -> None:
        """Append ``other``'s rows below these, both right aligned: the shorter side is padded on the left."""
        if not self.is_initialized or self.keys.shape[0] == 0:
            self.dtype, self.device = other.dtype, other.device
            self._set(other.keys, other.values, capacity=other._length)
            self.is_initialized = True
            return
        length = max(self._length, other._length)
        keys = torch.cat([_left_pad(self.keys, length, dim=2), _left_pad(other.keys, length, dim=2)], dim=0)
        values = torch.cat([_left_pad(self.values, length, dim=2), _left_pad(other.values, length, dim=2)], dim=0)
        self._set(keys, values, capacity=max(self._keys.shape[-2], length))


class RowCache(DynamicCache):
    """A dynamic cache of :class:`RowCacheLayer` layers: the engine's batched cache (one row per decoding row)."""

    def __init__(self, num_layers: int) -> None:
        Cache.__init__(self, layers=[RowCacheLayer() for _ in range(num_layers)])

    def select_rows(self, index: torch.Tensor) -> None:
        for layer in self.layers:
            layer.select_rows(index)

    def drop_left(self, columns: int) -> None:
        for layer in self.layers:
            layer.drop_left(columns)

    def append_rows(self, other: "RowCache") -> None:
        for mine, theirs in zip(self.layers, other.layers):
            mine.append_rows(theirs)

    def copy_rows(self, index: torch.Tensor, drop_last: int = 0) -> "RowCache":
        """A new cache with ``index``'s rows, without their last ``drop_last`` positions (for a twin's prefix)."""
        copy = RowCache(len(self.layers))
        for mine, theirs in zip(copy.layers, self.layers):
            end = theirs.get_seq_length() - drop_last
            mine.lazy_initialization(theirs.keys, theirs.values)
            mine._set(theirs.keys[index, :, :end], theirs.values[index, :, :end], capacity=end + 1)
        return copy


# ----------------------------------------------------------------------------------------------------------------
# groups
# ----------------------------------------------------------------------------------------------------------------
class EngineGroup:
    """Rows that join the engine together and are decoded by one set of rules.

    Slots ``0 .. num_slots - 1`` are the group's rows; the engine keeps the live ones (:attr:`live`) contiguous and in
    slot order in its cache. A subclass says how its rows are prefilled (:meth:`prefill_inputs` for
    :meth:`prefill_slots`, :meth:`shared_prefix_rows` for rows that start from another row's cache), which head
    columns each live row needs (:meth:`text_slots`, :meth:`audio_slots`), what a step's scores do (:meth:`advance`)
    and what each live row is fed next (:meth:`next_ids`, :meth:`next_embeds`, :meth:`waiting`).
    """

    _ids = itertools.count()
    #: advance before the groups that do not (a listening row: its ``irq`` cancels its speaking rows in the same step)
    advance_first = False
    #: a listening row: its text scores are its two state logits alone (``TokenLayout.listen_states``), for every
    #: column it was fed (it reads each frame), not the whole text vocabulary at the last column
    reads_listen_state = False

    def __init__(self, num_slots: int) -> None:
        self.id = next(self._ids)
        self.live: list[int] = list(range(num_slots))
        self.done = False
        self.error: BaseException | None = None

    # ----- prefill --------------------------------------------------------------------------------------------
    def prefill_slots(self) -> list[int]:
        """The slots prefilled with their whole prompt (the others come from :meth:`shared_prefix_rows`)."""
        return list(self.live)

    def prefill_inputs(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds (rows, len, hidden), attention mask (rows, len)) of :meth:`prefill_slots`, left padded."""
        raise NotImplementedError

    def shared_prefix_rows(self) -> list[tuple[int, int, torch.Tensor]]:
        """Rows that take another row's prefilled cache for all but their last prompt position: a list of
        (slot, source slot, the last position's 8 ids)."""
        return []

    # ----- per step -------------------------------------------------------------------------------------------
    def begin_step(self, max_columns: int | None = None) -> None:
        """Called by the engine before it collects a decoding step's inputs (a listening row takes its frames, at
        most ``max_columns``; ``None``: as many as it may take)."""

    def text_slots(self) -> list[int]:
        """Live slots whose text logits the next :meth:`advance` uses (sorted)."""
        return []

    def audio_slots(self) -> list[int]:
        """Live slots whose 7 audio slices the next :meth:`advance` uses (sorted)."""
        return []

    def advance(self, text_scores: torch.Tensor | None, audio_scores: torch.Tensor | None) -> None:
        """One step: ``text_scores`` (len(text_slots), text_vocab), ``audio_scores`` (len(audio_slots), 7, vocab).
        A group with :attr:`reads_listen_state` gets ``text_scores`` (len(text_slots), its columns, 2)."""
        raise NotImplementedError

    def next_ids(self) -> torch.Tensor:
        """(live rows, 8) global ids fed at the next step; (live rows, 8, n) for a group that feeds n columns."""
        raise NotImplementedError

    def next_embeds(self) -> dict[int, torch.Tensor]:
        """Live rows (by index in :attr:`live`) whose next input is an embedding (hidden,) instead of ids; (n,
        hidden) for a group that feeds n columns."""
        return {}

    def waiting(self) -> list[bool]:
        """Per live row: True if it does not advance at the next step (no new input yet)."""
        return [False] * len(self.live)

    def columns(self) -> list[int]:
        """Per live row: the positions it is fed at the next step (0: it waits; more than 1: a listening row that
        catches up on the microphone)."""
        return [0 if waits else 1 for waits in self.waiting()]

    def is_idle(self) -> bool:
        """True while every row of the group would wait at the next step (no input has arrived)."""
        return False

    def followers(self) -> list["EngineGroup"]:
        """Groups the engine queues when this one leaves (a listening row's successor)."""
        return []

    def dropped_slots(self) -> list[int]:
        """Live slots that leave the engine now (finished, cancelled or no longer needed)."""
        return list(self.live) if self.done else []

    def cancel(self, request: int | None = None) -> None:
        raise NotImplementedError

    def apply_cancellations(self) -> None:
        """Called by the engine between steps: act on :meth:`cancel` calls made since the last step."""

    def fail(self, error: BaseException) -> None:
        """The engine could not run this group (its prefill or its rules raised): end it with ``error``."""
        self.error = error
        self.done = True


class DecodeGroup(EngineGroup):
    """N requests prompted together (one left-padded prompt row each) and decoded with the rules of SPEC §6.

    Slots: the N request rows, then one text-out twin per speech request when ``settings.batch_parallel``. At each
    step the 7 audio tokens of a speech request come from its own row and its text token from its twin (or its own
    row without a twin); both rows are fed that text token, the twin ``pad_a`` on its audio streams.

    Args:
        layout: the token layout.
        inputs: the prompts: ``input_ids`` (N, 8, seq) left padded, ``attention_mask`` (N, seq), and the feature
            inputs of ``MiniOmni2Model.embed`` (``input_features``, ``audio_feature_mask``, ``pixel_values``,
            ``image_feature_mask``).
        settings: :class:`DecodeSettings`.
        streamer: a ``MiniOmni2Streamer`` (text deltas and audio chunks of every request) or a transformers
            ``BaseStreamer`` (the text of a single request).
        codec: the codec for the streamer's chunks and the waveforms of :meth:`result` (``None``: frames only).
        keep_rows: keep every row until the whole group is done (finished requests are fed padding), as a
            fixed-shape batch needs (static cache, compiled step); otherwise rows leave as soon as they are done.
        share_twin_prefill: a twin takes its speech row's prefilled cache for all but the last prompt position
            instead of recomputing the common prompt.
        codec_noise: SNAC's noise when decoding.
    """

    def __init__(
        self,
        layout: TokenLayout,
        inputs: dict[str, torch.Tensor | None],
        settings: DecodeSettings,
        streamer: Any = None,
        codec: Any = None,
        keep_rows: bool = False,
        share_twin_prefill: bool = False,
        codec_noise: bool = True,
    ) -> None:
        input_ids = inputs["input_ids"]
        if input_ids.ndim != 3 or input_ids.shape[1] != layout.num_streams:
            raise ValueError(f"input_ids must have shape (N, {layout.num_streams}, seq), got {tuple(input_ids.shape)}")
        self.layout = layout
        self.inputs = inputs
        self.settings = settings
        self.streamer = streamer
        self.codec = codec
        self.keep_rows = keep_rows
        self.share_twin_prefill = share_twin_prefill
        self.codec_noise = codec_noise
        self.num_requests, _, self.prompt_len = input_ids.shape
        self.device = device = input_ids.device

        self.kinds = output_kinds(layout, input_ids)
        real = inputs["attention_mask"].bool()
        self.tasks = [infer_task(layout, input_ids[r][:, real[r]]) for r in range(self.num_requests)]
        self.is_speech = torch.tensor([k == OUTPUT_SPEECH for k in self.kinds], device=device)
        twin_of = [r for r in range(self.num_requests) if settings.batch_parallel and self.kinds[r] == OUTPUT_SPEECH]
        if twin_of:
            check_twin_rule(layout)
            for r in twin_of:
                if self.tasks[r] is not None:
                    layout.text_output_task(self.tasks[r])  # raises if the task has no text-out twin
        self.twin_of = twin_of  # slot num_requests + j is the twin of request twin_of[j]
        self.twin_slot = {r: self.num_requests + j for j, r in enumerate(twin_of)}
        super().__init__(self.num_requests + len(twin_of))

        n = self.num_requests
        self.step_count = 0
        self.finished = torch.zeros(n, dtype=torch.bool, device=device)
        self.text_done = torch.zeros(n, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(n, dtype=torch.long, device=device)
        self.reasons = torch.full((n,), _LENGTH, dtype=torch.long, device=device)
        self._history = torch.empty(n, layout.num_streams, self.prompt_len + 32, dtype=torch.long, device=device)
        self._history[:, :, : self.prompt_len] = input_ids
        self._fed = layout.pad_ids(device).expand(n, -1).clone()  # (N, 8) ids fed at the last step
        self._pending_cancel: set[int] = set()

        self.pad_ids = layout.pad_ids(device)
        self.audio_offsets = layout.stream_offsets(device)[: layout.num_audio_layers]
        self.text_sampler = _Sampler(settings.text, settings.logits_processor, settings.generator)
        self.audio_sampler = _Sampler(settings.audio, settings.audio_logits_processor, settings.generator)
        self._begin_streamer()

    # ----- rows ---------------------------------------------------------------------------------------------------
    def request_of(self, slot: int) -> int:
        return slot if slot < self.num_requests else self.twin_of[slot - self.num_requests]

    def _running(self, request: int) -> bool:
        return not bool(self.finished[request])

    def prefill_slots(self) -> list[int]:
        return list(range(self.num_requests)) if self.share_twin_prefill else list(self.live)

    def prefill_inputs(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of the request rows (the encoders run once per request) and, unless twins share the prefill,
        of the twins: the speech row's embeddings, the last position re-embedded with ``pad_a`` audio tokens."""
        inputs = self.inputs
        embeds = model.model.embed(
            inputs["input_ids"], inputs.get("input_features"), inputs.get("audio_feature_mask"),
            inputs.get("pixel_values"), inputs.get("image_feature_mask"),
        )
        mask = inputs["attention_mask"]
        if self.twin_of and not self.share_twin_prefill:
            index = torch.tensor(self.twin_of, device=self.device)
            twin_last = model.model.embed(self._twin_last_ids()[:, :, None])
            embeds = torch.cat([embeds, torch.cat([embeds[index, :-1], twin_last], dim=1)], dim=0)
            mask = torch.cat([mask, mask[index]], dim=0)
        return embeds, mask

    def shared_prefix_rows(self) -> list[tuple[int, int, torch.Tensor]]:
        if not (self.twin_of and self.share_twin_prefill):
            return []
        last = self._twin_last_ids()
        return [(self.twin_slot[r], r, last[j]) for j, r in enumerate(self.twin_of)]

    def _twin_last_ids(self) -> torch.Tensor:
        """(twins, 8): each twin's last prompt position: its speech row's, with ``pad_a`` on the 7 audio streams."""
        index = torch.tensor(self.twin_of, device=self.device)
        last = self.inputs["input_ids"][index, :, -1].clone()
        last[:, : self.layout.num_audio_layers] = self.pad_ids[: self.layout.num_audio_layers]
        return last

    def text_slots(self) -> list[int]:
        """Each running request's twin, or its own row without one, until its text has ended (after ``eot`` the text
        is forced to ``pad_t``: no logits are needed). A text request ends at ``eot``, so it always needs them."""
        slots = []
        for r in range(self.num_requests):
            if self._running(r) and not (self.kinds[r] == OUTPUT_SPEECH and bool(self.text_done[r])):
                slots.append(self.twin_slot.get(r, r))
        return sorted(slots)

    def audio_slots(self) -> list[int]:
        return [r for r in range(self.num_requests) if self.kinds[r] == OUTPUT_SPEECH and self._running(r)]

    def dropped_slots(self) -> list[int]:
        """Without ``keep_rows``: the rows of finished requests, and twins once their request's text has ended."""
        if self.done:
            return list(self.live)
        if self.keep_rows:
            return []
        dropped = []
        for slot in self.live:
            r = self.request_of(slot)
            if not self._running(r) or (slot != r and bool(self.text_done[r])):
                dropped.append(slot)
        return dropped

    def next_ids(self) -> torch.Tensor:
        """Request rows get what was fed; twins ``pad_a`` and the same text token (all padding once finished)."""
        slots = torch.tensor(self.live, device=self.device)
        requests = torch.tensor([self.request_of(s) for s in self.live], device=self.device)
        fed = self._fed[requests]
        is_twin = (slots >= self.num_requests)[:, None]
        audio_streams = torch.arange(self.layout.num_streams, device=self.device) < self.layout.num_audio_layers
        return torch.where(is_twin & audio_streams[None], self.pad_ids, fed)

    # ----- one step: the rules of SPEC §6 ---------------------------------------------------------------------------
    def advance(self, text_scores: torch.Tensor | None, audio_scores: torch.Tensor | None) -> None:
        layout, settings = self.layout, self.settings
        n, device = self.num_requests, self.device
        step = self.step_count
        cur = self.prompt_len + step
        self._grow_history(cur + 1)
        text_requests = [self.request_of(s) for s in self.text_slots()]
        audio_requests = self.audio_slots()
        eot, eoa, pad_a, pad_t = layout.eot, layout.eoa, layout.pad_a, layout.pad_t
        last_layer = layout.num_audio_layers - 1

        text_tok = torch.full((n,), pad_t, dtype=torch.long, device=device)
        if text_requests:
            index = torch.tensor(text_requests, device=device)
            if step < settings.min_new_tokens:  # text requests may not stop yet (a speech request may end its text)
                text_scores = text_scores.clone()
                text_scores[~self.is_speech[index], eot] = float("-inf")
            history = lambda: self._history[index, layout.text_stream, :cur]  # noqa: E731
            text_tok[index] = self.text_sampler(history, text_scores)
        audio_tok = torch.full((n, layout.num_audio_layers), pad_a, dtype=torch.long, device=device)
        if audio_requests:
            index = torch.tensor(audio_requests, device=device)
            if step < settings.min_new_tokens:
                audio_scores = audio_scores.clone()
                audio_scores[:, last_layer, eoa] = float("-inf")
            history = lambda: (  # noqa: E731  (built only if an audio processor asks for it)
                self._history[index, : layout.num_audio_layers, :cur] - self.audio_offsets[None, :, None]
            ).flatten(0, 1)
            sampled = self.audio_sampler(history, audio_scores.flatten(0, 1)).view(len(audio_requests), -1)
            if settings.force_delay_pad and step < layout.num_audio_layers:
                slot = torch.arange(layout.num_audio_layers, device=device)
                sampled = torch.where(slot[None] >= step, torch.full_like(sampled, pad_a), sampled)
            audio_tok[index] = sampled

        if settings.text_stop_ids:  # eos_token_id: ends the text as eot does
            stops = torch.tensor(settings.text_stop_ids, device=device)
            text_tok = torch.where(torch.isin(text_tok, stops), torch.full_like(text_tok, eot), text_tok)
        text_tok = torch.where(self.text_done, torch.full_like(text_tok, pad_t), text_tok)
        stop_eoa = self.is_speech & (audio_tok[:, last_layer] == eoa)
        stop_eot = ~self.is_speech & (text_tok == eot)
        stop_now = (stop_eoa | stop_eot) & ~self.finished
        self.reasons = torch.where(stop_now, torch.where(stop_eoa, _EOA, _EOT), self.reasons)
        self.finished = self.finished | stop_now
        self.text_done = self.text_done | (text_tok == eot)

        fed = torch.cat([audio_tok + self.audio_offsets, text_tok[:, None]], dim=1)
        fed = torch.where(self.finished[:, None], self.pad_ids, fed)
        self._history[:, :, cur] = fed
        kept = ~self.finished  # the step belongs to the answer (a stopping criterion below keeps it too)
        self.lengths = self.lengths + kept.long()
        if settings.stopping_criteria is not None and bool(kept.any()):
            index = kept.nonzero().flatten()
            scores = self._scores_of(text_scores, text_requests, index)
            stop = torch.zeros(n, dtype=torch.bool, device=device)
            stop[index] = settings.stopping_criteria(self._history[index, layout.text_stream, : cur + 1], scores).to(
                device
            )
            self.reasons = torch.where(stop, _STOPPED, self.reasons)
            self.finished = self.finished | stop
        self._fed = fed
        self.step_count = step + 1
        if self.step_count >= settings.max_new_tokens:
            self.finished = torch.ones_like(self.finished)
        self._put(fed, kept, self.finished, cancelled=None)
        if bool(self.finished.all()):
            self._end()

    def _scores_of(self, text_scores, text_requests: list[int], index: torch.Tensor) -> torch.Tensor:
        """Text scores of the requests ``index`` for stopping criteria; zeros where none were computed this step (a
        spoken answer whose text had ended)."""
        width = text_scores.shape[-1] if text_scores is not None else self.layout.text_vocab_size
        dtype = text_scores.dtype if text_scores is not None else torch.float32
        scores = torch.zeros(len(index), width, dtype=dtype, device=self.device)
        row_of = {r: k for k, r in enumerate(text_requests)}
        for k, r in enumerate(index.tolist()):
            if r in row_of:
                scores[k] = text_scores[row_of[r]]
        return scores

    def cancel(self, request: int | None = None) -> None:
        """Cancel one request (or all): it ends at the engine's next step boundary with reason ``"cancelled"``; its
        stream ends without the audio that was still waiting for its lookahead."""
        for r in range(self.num_requests) if request is None else [request]:
            if not 0 <= r < self.num_requests:
                raise ValueError(f"request must be in [0, {self.num_requests}), got {r}")
            self._pending_cancel.add(r)

    def apply_cancellations(self) -> None:
        pending = sorted(r for r in self._pending_cancel if self._running(r))
        self._pending_cancel.clear()
        if not pending or self.done:
            return
        stop = torch.zeros(self.num_requests, dtype=torch.bool, device=self.device)
        stop[torch.tensor(pending, device=self.device)] = True
        self.reasons = torch.where(stop, _CANCELLED, self.reasons)
        self.finished = self.finished | stop
        self._fed = torch.where(self.finished[:, None], self.pad_ids, self._fed)
        self._put(self._fed, torch.zeros_like(stop), self.finished, cancelled=stop)
        if bool(self.finished.all()):
            self._end()

    # ----- history, streamer, result -----------------------------------------------------------------------------
    def _grow_history(self, length: int) -> None:
        """The history grows by doubling: nothing is allocated up front for ``max_new_tokens``."""
        if length <= self._history.shape[-1]:
            return
        bigger = self._history.new_empty(*self._history.shape[:2], max(length, 2 * self._history.shape[-1]))
        bigger[:, :, : self._history.shape[-1]] = self._history
        self._history = bigger

    def _begin_streamer(self) -> None:
        streamer, layout = self.streamer, self.layout
        if streamer is None:
            return
        if hasattr(streamer, "begin"):
            streamer.begin(layout=layout, codec=self.codec, output_kinds=self.kinds, codec_noise=self.codec_noise)
            return
        if self.num_requests != 1:
            raise ValueError("a plain transformers streamer takes one request; use MiniOmni2Streamer for batches")
        ids = self.inputs["input_ids"][0, layout.text_stream][self.inputs["attention_mask"][0].bool()]
        streamer.put(ids[(ids >= 0) & (ids < layout.tokenizer_vocab_size)].cpu())

    def _put(self, fed: torch.Tensor, kept: torch.Tensor, finished: torch.Tensor, cancelled) -> None:
        streamer = self.streamer
        if streamer is None:
            return
        if hasattr(streamer, "begin"):
            streamer.put(StreamStep(tokens=fed, kept=kept, finished=finished, cancelled=cancelled))
            return
        token = int(fed[0, self.layout.text_stream])  # a transformers text streamer: the single request's text
        if bool(kept[0]) and 0 <= token < self.layout.tokenizer_vocab_size:
            streamer.put(torch.tensor([token]))

    def _end(self) -> None:
        self.done = True
        if self.streamer is not None:
            self.streamer.end()

    def fail(self, error: BaseException) -> None:
        super().fail(error)
        if self.streamer is not None and hasattr(self.streamer, "abort"):
            self.streamer.abort(error)

    def result(self, decode_audio: bool = True) -> MiniOmni2GenerateOutput:
        """The group's output: sequences, text ids, frames and SNAC codes, and waveforms (with ``decode_audio`` and
        a codec). Raises the group's error if it failed."""
        if self.error is not None:
            raise self.error
        layout, codec = self.layout, self.codec
        steps = self.step_count
        sequences = self._history[:, :, : self.prompt_len + steps].clone()
        after = torch.arange(steps, device=self.device)[None, :] >= self.lengths[:, None]
        generated = sequences[:, :, self.prompt_len :]
        sequences[:, :, self.prompt_len :] = torch.where(after[:, None, :], self.pad_ids[None, :, None], generated)
        lengths = self.lengths.tolist()
        text_ids, frames_out, replaced_out, codes_out, waves = [], [], [], [], []
        for r in range(self.num_requests):
            text = generated[r, layout.text_stream, : lengths[r]]
            ends = (text == layout.eot).nonzero()
            if len(ends):
                text = text[: int(ends[0, 0])]
            text_ids.append(text[(text >= 0) & (text < layout.tokenizer_vocab_size)].clone())
            if self.kinds[r] != OUTPUT_SPEECH:
                for column in (frames_out, replaced_out, codes_out, waves):
                    column.append(None)
                continue
            local = generated[r, : layout.num_audio_layers, : lengths[r]] - self.audio_offsets[:, None]
            frames, replaced = layout.sanitize_frames(layout.undelay(local))
            frames_out.append(frames)
            replaced_out.append(replaced)
            codes_out.append([level[None] for level in layout.frames_to_snac(frames)])
            decode = decode_audio and codec is not None
            waves.append(codec.decode(frames[None], noise=self.codec_noise)[0].float() if decode else None)
        return MiniOmni2GenerateOutput(
            sequences=sequences,
            generated_lengths=self.lengths.clone(),
            text_ids=text_ids,
            audio_frames=frames_out,
            audio_frames_replaced=replaced_out,
            audio_codes=codes_out,
            waveforms=waves,
            sampling_rate=codec.sampling_rate if codec is not None else None,
            output_kinds=list(self.kinds),
            tasks=list(self.tasks),
            finish_reasons=[FINISH_REASONS[k] for k in self.reasons.tolist()],
        )


# ----------------------------------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------------------------------
Scores = dict[int, tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]]  # group id -> (text, audio) by slot


class MiniOmni2Engine:
    """Decodes many groups of requests in one batch, one step at a time, groups joining and leaving between steps.

    Args:
        model: a :class:`MiniOmni2ForConditionalGeneration`.
        max_rows: the most rows decoded in one step (requests plus twins); a waiting group joins when its rows fit.
        static_cache_len: use a transformers ``StaticCache`` of this many positions, for a single group with
            ``keep_rows`` (fixed shapes, as a compiled decoding step needs).
        decode_forward: the callable for decoding steps (default: ``model``; e.g. a ``torch.compile`` of it).
        slice_head: compute only the head columns each row needs; off: the whole head for every row.
    """

    def __init__(
        self,
        model,
        max_rows: int | None = None,
        static_cache_len: int | None = None,
        decode_forward: Callable | None = None,
        slice_head: bool = True,
    ) -> None:
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.model = model
        self.layout: TokenLayout = model.config.token_layout
        self.max_rows = max_rows
        self.static_cache_len = static_cache_len
        self.decode_forward = decode_forward or model
        self.slice_head = slice_head
        self.groups: list[EngineGroup] = []  # admitted, in cache row order
        self.pending: list[EngineGroup] = []  # waiting for room
        self.cache: Cache | None = None
        self.mask: torch.Tensor | None = None  # (rows, cache length) 1 on real positions; static: the full length
        self.positions: torch.Tensor | None = None  # (rows,) position of each row's next input
        self.steps = 0

    # ----- requests -------------------------------------------------------------------------------------------
    def add(self, group: EngineGroup) -> EngineGroup:
        """Queue a group; it is prefilled at the next :meth:`step` that has room for its rows."""
        rows = len(group.live)
        if self.max_rows is not None and rows > self.max_rows:
            raise ValueError(f"the request needs {rows} rows but the engine decodes at most {self.max_rows} per step")
        if self.static_cache_len is not None and (self.groups or self.pending or self.steps):
            raise ValueError("an engine with a static cache decodes a single group")
        self.pending.append(group)
        return group

    def cancel(self, group: EngineGroup, request: int | None = None) -> None:
        """Cancel a group (or one of its requests): it ends at the next step boundary, or now if still waiting."""
        group.cancel(request)
        if group in self.pending and request is None:
            self.pending.remove(group)
            group.apply_cancellations()
            group.done = True

    @property
    def num_rows(self) -> int:
        return sum(len(g.live) for g in self.groups)

    def has_work(self) -> bool:
        return bool(self.groups or self.pending)

    @property
    def idle(self) -> bool:
        """Nothing to compute until new input arrives: no waiting group, and every admitted row waits."""
        return not self.pending and all(g.is_idle() for g in self.groups)

    # ----- one step ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """Advance every admitted row by one step, admit waiting groups that fit (their first step comes from their
        prefill), then drop the rows that are done. An error in a batched forward fails every group in it (and is
        raised); an error in one group's rules or inputs fails that group alone."""
        for group in self.groups:
            group.apply_cancellations()
        self._drop_rows()
        scores: Scores = {}
        try:
            if self.groups:
                scores.update(self._decode())
            admitted = self._admit(scores)
        except BaseException as error:
            for group in self.groups + getattr(self, "_admitting", []):
                group.fail(error)
            self._reset()
            raise
        for group in sorted(self.groups, key=lambda g: not g.advance_first):
            if group.done:  # ended during this step (a listening row's irq cancelled it): nothing more is streamed
                continue
            text, audio = scores.get(group.id, ({}, {}))
            try:
                group.advance(_stack(text, group.text_slots()), _stack(audio, group.audio_slots()))
            except BaseException as error:  # one group's rules (e.g. a user logits processor) fail that group
                group.fail(error)
        self.steps += bool(scores) or bool(admitted)
        self._drop_rows()

    def run(self, group: EngineGroup) -> EngineGroup:
        """Queue ``group`` and step until it is done (other groups advance too); raises the group's error."""
        self.add(group)
        while not group.done:
            self.step()
        if group.error is not None:
            raise group.error
        return group

    # ----- internals -------------------------------------------------------------------------------------------
    def _forward(self, fn: Callable, blocks: list[tuple[EngineGroup, list[int]]], width: int = 1,
                 columns: list[int] | None = None, **kwargs) -> Scores:
        """One forward over the rows of ``blocks`` ((group, slots) in row order); the scores each group needs: at
        the last of the ``width`` input columns, or (a group that :attr:`~EngineGroup.reads_listen_state`) its two
        state logits at each of the row's last ``columns[row]`` columns."""
        text_rows, audio_rows, listen_rows, text_keys, audio_keys, listen_keys = [], [], [], [], [], []
        offset = 0
        for group, slots in blocks:
            row = {slot: offset + k for k, slot in enumerate(slots)}
            for slot in group.text_slots():
                if slot in row and group.reads_listen_state:
                    listen_rows.append(row[slot])
                    listen_keys.append((group.id, slot, columns[row[slot]] if columns is not None else 1))
                elif slot in row:
                    text_rows.append(row[slot])
                    text_keys.append((group.id, slot))
            for slot in group.audio_slots():
                if slot in row:
                    audio_rows.append(row[slot])
                    audio_keys.append((group.id, slot))
            offset += len(slots)
        device = kwargs.get("position_ids").device
        if self.slice_head:  # the last column of the answers' rows; every column of a listening row's two states
            for name, rows in (("text", text_rows), ("audio", audio_rows), ("listen", listen_rows)):
                kwargs[f"{name}_logits_rows"] = torch.tensor(rows, dtype=torch.long, device=device)
            out = fn(use_cache=True, logits_to_keep=1, **kwargs)
        else:
            out = fn(use_cache=True, logits_to_keep=width, **kwargs)
        if getattr(out, "logits", None) is None:  # the sliced head: rows come in text / audio / listen_rows order
            text, audio, listen = out.text_logits, out.audio_logits[:, :, -1], out.listen_logits
        else:  # the whole head for every row (slicing off, or a forward that does not slice)
            text = out.text_logits[torch.tensor(text_rows, dtype=torch.long)]
            audio = out.audio_logits[torch.tensor(audio_rows, dtype=torch.long), :, -1]
            listen = out.text_logits[torch.tensor(listen_rows, dtype=torch.long)][..., list(self.layout.listen_states)]
        scores: Scores = {}
        for k, (gid, slot) in enumerate(text_keys):
            scores.setdefault(gid, ({}, {}))[0][slot] = text[k, -1]
        for k, (gid, slot, wanted) in enumerate(listen_keys):
            scores.setdefault(gid, ({}, {}))[0][slot] = listen[k, -wanted:]
        for k, (gid, slot) in enumerate(audio_keys):
            scores.setdefault(gid, ({}, {}))[1][slot] = audio[k]
        return scores

    def _decode(self) -> Scores:
        """The decoding forward of the admitted rows: each row's next input at one new cache position. No forward
        when every row waits (a listening row alone, between microphone frames).

        A listening row behind the microphone catches up: it is fed several frames at once (``width`` columns), and
        every other row gets its one input in the last column after ``width - 1`` columns of padding that nothing
        attends to (attention 0, its position not advanced), as a waiting row is padded. The static cache keeps one
        column a step (its shapes are fixed)."""
        for g in self.groups:
            g.begin_step(1 if self.static_cache_len is not None else None)
        columns = [c for g in self.groups for c in g.columns()]
        if not any(columns):
            return {}
        width = max(columns)
        ids = torch.cat([_columns(g.next_ids(), width) for g in self.groups], dim=0)
        fed = torch.tensor(columns, dtype=torch.long, device=ids.device)
        offsets = torch.arange(width, device=ids.device)[None] - (width - fed)[:, None]  # < 0: padding
        if self.static_cache_len is not None:
            mask = self.mask
        else:
            mask = torch.cat([self.mask, (offsets >= 0).long()], dim=1)
        position_ids = self.positions[:, None] + offsets.clamp(min=0)
        kwargs = dict(attention_mask=mask, position_ids=position_ids, past_key_values=self.cache)
        embeds, offset = {}, 0
        for g in self.groups:
            embeds.update({offset + k: e for k, e in g.next_embeds().items()})
            offset += len(g.live)
        if embeds:
            inputs_embeds = self.model.model.embed(ids)
            for row, e in embeds.items():
                e = e.reshape(-1, inputs_embeds.shape[-1])
                inputs_embeds[row, width - len(e):] = e.to(inputs_embeds.dtype)
            kwargs["inputs_embeds"] = inputs_embeds
        else:
            kwargs["input_ids"] = ids
        scores = self._forward(self.decode_forward, [(g, list(g.live)) for g in self.groups], width=width,
                               columns=columns, **kwargs)
        if self.static_cache_len is None:
            self.mask = mask
        self.positions = self.positions + fed
        return scores

    def _take_pending(self) -> list[EngineGroup]:
        room = None if self.max_rows is None else self.max_rows - self.num_rows
        chosen = []
        while self.pending:
            rows = len(self.pending[0].live)
            if room is not None and rows > room:
                break
            chosen.append(self.pending.pop(0))
            if room is not None:
                room -= rows
        return chosen

    def _admit(self, scores: Scores) -> list[EngineGroup]:
        """Prefill the waiting groups that fit, in one forward; their rows join the cache after the others."""
        chosen = []
        for group in self._take_pending():
            try:
                prefill = group.prefill_inputs(self.model)
            except BaseException as error:  # bad inputs (e.g. features that do not match) fail their group alone
                group.fail(error)
                continue
            chosen.append((group, prefill))
        if not chosen:
            return []
        self._admitting = [g for g, _ in chosen]
        try:
            length = max(embeds.shape[1] for _, (embeds, _m) in chosen)
            embeds = torch.cat([_left_pad(e, length, dim=1) for _, (e, _m) in chosen], dim=0)
            mask = torch.cat([_left_pad(m, length, dim=1) for _, (_e, m) in chosen], dim=0).long()
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            blocks = [(g, g.prefill_slots()) for g, _ in chosen]
            cache = self._new_cache(length)
            forward_mask = mask
            if self.static_cache_len is not None:
                forward_mask = torch.cat([mask, mask.new_ones(len(mask), self.static_cache_len - length)], dim=1)
            scores.update(self._forward(self.model, blocks, inputs_embeds=embeds, attention_mask=forward_mask,
                                        position_ids=positions, past_key_values=cache))
            next_positions = mask.sum(-1)
            cache, mask, next_positions = self._shared_prefixes(blocks, cache, mask, next_positions, scores)
        finally:
            admitted = self._admitting
            self._admitting = []
        self._append_rows(cache, forward_mask if self.static_cache_len is not None else mask, next_positions)
        self.groups.extend(admitted)
        return admitted

    def _shared_prefixes(self, blocks, cache, mask, next_positions, scores: Scores):
        """Rows that take another row's cache for all but their last prompt position (twins): copy that prefix, run
        the last position, and put each group's shared rows after its prefilled rows (its slot order)."""
        shared = [group.shared_prefix_rows() for group, _ in blocks]
        if not any(shared):
            return cache, mask, next_positions
        if self.static_cache_len is not None:
            raise ValueError("shared twin prefill needs the dynamic cache")
        sources, last_ids, order = [], [], []
        total = sum(len(slots) for _, slots in blocks)
        offset = extra = 0
        for (group, slots), rows in zip(blocks, shared):
            row = {slot: offset + k for k, slot in enumerate(slots)}
            order += [row[s] for s in slots] + [total + extra + k for k in range(len(rows))]
            for _slot, source, ids in rows:
                sources.append(row[source])
                last_ids.append(ids)
            offset += len(slots)
            extra += len(rows)
        index = torch.tensor(sources, device=mask.device)
        prefix = cache.copy_rows(index, drop_last=1)
        prefix_mask = mask[index]
        prefix_positions = next_positions[index] - 1
        twin_blocks = [(group, [slot for slot, _, _ in rows]) for (group, _), rows in zip(blocks, shared)]
        scores_twins = self._forward(
            self.model, twin_blocks, input_ids=torch.stack(last_ids)[:, :, None], attention_mask=prefix_mask,
            position_ids=prefix_positions[:, None], past_key_values=prefix,
        )
        for gid, (text, audio) in scores_twins.items():
            mine = scores.setdefault(gid, ({}, {}))
            mine[0].update(text)
            mine[1].update(audio)
        order_t = torch.tensor(order, device=mask.device)
        cache.append_rows(prefix)
        cache.select_rows(order_t)
        mask = torch.cat([mask, prefix_mask], dim=0)[order_t]
        next_positions = torch.cat([next_positions, prefix_positions + 1], dim=0)[order_t]
        return cache, mask, next_positions

    def _new_cache(self, length: int) -> Cache:
        text_config = self.model.config.text_config
        if self.static_cache_len is not None:
            if length > self.static_cache_len:
                raise ValueError(f"the prompt ({length}) is longer than the static cache ({self.static_cache_len})")
            return StaticCache(config=text_config, max_cache_len=self.static_cache_len)
        return RowCache(text_config.num_hidden_layers)

    def _append_rows(self, cache: Cache, mask: torch.Tensor, next_positions: torch.Tensor) -> None:
        if self.cache is None or self.num_rows == 0:
            self.cache, self.mask, self.positions = cache, mask, next_positions
            return
        self.cache.append_rows(cache)
        length = max(self.mask.shape[1], mask.shape[1])
        self.mask = torch.cat([_left_pad(self.mask, length, dim=1), _left_pad(mask, length, dim=1)], dim=0)
        self.positions = torch.cat([self.positions, next_positions], dim=0)

    def _drop_rows(self) -> None:
        """Remove the rows that left (finished, cancelled, twins no longer needed) and columns no row uses."""
        keep, offset, changed = [], 0, False
        for group in self.groups:
            dropped = set(group.dropped_slots())
            keep += [offset + k for k, slot in enumerate(group.live) if slot not in dropped]
            changed = changed or bool(dropped)
            offset += len(group.live)
            group.live = [slot for slot in group.live if slot not in dropped]
            if not group.live and group.error is None:
                self.pending[:0] = group.followers()  # first in line: a listening row must not wait for room
        self.groups = [g for g in self.groups if g.live]
        if not changed:
            return
        if not keep:
            self._reset()
            return
        if self.static_cache_len is not None:
            raise RuntimeError("a static-cache engine keeps its rows until its group is done")
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.select_rows(index)
        self.mask = self.mask[index]
        self.positions = self.positions[index]
        unused = int((self.mask.cumsum(-1) == 0).all(0).sum())  # leading columns that no row attends to
        if unused:
            self.cache.drop_left(unused)
            self.mask = self.mask[:, unused:]

    def _reset(self) -> None:
        self.groups = [g for g in self.groups if not g.done]
        for group in self.groups:  # rows whose cache is gone cannot go on
            group.fail(RuntimeError("the engine's batch was reset"))
        self.groups = []
        self.cache = self.mask = self.positions = None


# ----------------------------------------------------------------------------------------------------------------
# the duplex listening row (extension, docs/duplex.md)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ListenRule:
    """When a listening row commits to ``irq``: P(irq) >= ``threshold`` (the softmax over the two state logits,
    :meth:`TokenLayout.listen_irq_probability`) on ``min_frames`` consecutive frames. ``0.5, 1`` is the argmax."""

    threshold: float = 0.5
    min_frames: int = 1

    def __post_init__(self) -> None:
        check_listen_rule(self.threshold, self.min_frames)

    @classmethod
    def for_config(cls, config) -> "ListenRule":
        """The model's own rule: ``config.listen_rule``, chosen on validation clips when its listening row was
        trained (docs/duplex.md), else the argmax (0.5 on one frame)."""
        rule = normalize_listen_rule(getattr(config, "listen_rule", None))  # also a value set after loading
        return cls(**rule) if rule else cls()

    def as_config(self) -> dict:
        """The rule as ``config.listen_rule`` keeps it (:meth:`for_config` reads it back)."""
        return normalize_listen_rule(asdict(self))

    def run_after(self, run: int, probability: float) -> int:
        """The count of consecutive frames at the threshold, after a frame with this P(irq)."""
        return run + 1 if float(probability) >= self.threshold else 0

    def commits(self, run: int) -> bool:
        return run >= self.min_frames

    def first_irq(self, probabilities) -> int | None:
        """The frame at which a row with these P(irq) per frame commits to ``irq`` (None: never)."""
        run = 0
        for k, p in enumerate(probabilities):
            run = self.run_after(run, p)
            if self.commits(run):
                return k
        return None


def check_catch_up_frames(catch_up_frames: int, name: str = "catch_up_frames") -> None:
    """A listening row reads at least one frame a step (``ListenGroup(catch_up_frames=)``; ``name``: what the
    caller calls it, e.g. a command-line option)."""
    if isinstance(catch_up_frames, bool) or not isinstance(catch_up_frames, int) or catch_up_frames < 1:
        raise ValueError(f"{name} must be an int >= 1, got {catch_up_frames!r}")


def check_listen_window(window_frames: int | None, refeed_frames: int) -> None:
    """A listening row's hand-over (``ListenGroup(window_frames=, refeed_frames=)``) must keep fresh frames."""
    if window_frames is not None and not 0 <= refeed_frames < window_frames:
        raise ValueError(f"need 0 <= refeed_frames ({refeed_frames}) < window_frames ({window_frames})")


@dataclass
class MiniOmni2ListenState:
    """(extension, docs/duplex.md) What a listening row's ``"gru"`` adapter has heard so far: its hidden state
    (layers, rows, width), ``None`` before the first frame. ``MiniOmni2Model.embed(..., listen_state=...)`` reads and
    updates it in place (as a cache is), so a row fed one frame per step hears what a whole-row forward hears."""

    hidden: torch.Tensor | None = None


class ListenGroup(EngineGroup):
    """One duplex listening row (docs/duplex.md): it hears the microphone while ``speaking`` (a group) answers.

    Its prompt is :meth:`TokenLayout.build_listen_prompt`; each step it is fed the next frame of the incoming audio
    (:meth:`push`; features (dim,) through the model's ``listen_projector``, or the codec's 7 codes) with the state
    ``n_irq`` (:meth:`TokenLayout.listen_step`), and its text logits give P(irq) for that frame. Without a new frame
    the row waits (it takes no step; the speaking rows go on). Behind the microphone (decoding slower than real time)
    it catches up: up to ``catch_up_frames`` waiting frames in one step, each read in order as if fed one a step.
    When :attr:`rule` commits to ``irq`` the row cancels ``speaking`` at once, in the same step (the engine advances
    listening rows first and skips a group that ended, so nothing generated at or after that step is streamed),
    calls ``on_interrupt(self)`` and ends. :meth:`finish` ends it without an interruption.

    Args:
        model: the model (its ``listen_input`` says what a frame is).
        speaking: the group it may interrupt (``None``: only report).
        rule: :class:`ListenRule` (default: the model's own, :meth:`ListenRule.for_config`).
        on_interrupt: called from the engine's step when the row commits to ``irq``.
        window_frames: a row that has been fed this many frames hands over to a fresh row (a new prompt, fed the
            last ``refeed_frames`` frames again as context, not read), so that no row grows longer than the rows the
            model was trained on (docs/duplex.md); ``None``: never. The fresh row is :attr:`successor`: the engine
            queues it when this one leaves, and :meth:`push` forwards to it.
        refeed_frames: see ``window_frames``.
        context: frames fed first and not read (a successor's refed frames).
        first_frame: the index of this row's first read frame in the whole stream (a successor's).
        catch_up_frames: the most frames read in one step (default :data:`LISTEN_CATCH_UP_FRAMES`; 1: one frame a
            step, so a backlog is never caught up).
    """

    advance_first = True
    reads_listen_state = True

    def __init__(
        self,
        model,
        speaking: EngineGroup | None = None,
        rule: ListenRule | None = None,
        on_interrupt: Callable[["ListenGroup"], None] | None = None,
        window_frames: int | None = None,
        refeed_frames: int = 0,
        context: list[torch.Tensor] | None = None,
        first_frame: int = 0,
        catch_up_frames: int = LISTEN_CATCH_UP_FRAMES,
    ) -> None:
        super().__init__(1)
        check_listen_window(window_frames, refeed_frames)
        check_catch_up_frames(catch_up_frames)
        self.catch_up_frames = catch_up_frames
        config = model.config
        self.model = model
        self.layout: TokenLayout = config.token_layout
        self.features = config.listen_input == LISTEN_FEATURES
        self.feature_dim = config.listen_feature_dim
        self.speaking = speaking
        self.rule = rule or ListenRule.for_config(config)
        self.on_interrupt = on_interrupt
        self.device = next(model.parameters()).device
        self._frames: collections.deque[torch.Tensor] = collections.deque()  # appended by any thread
        self._feeding: list[torch.Tensor] = []  # the frames fed at this step
        self._adapter_state = MiniOmni2ListenState()  # what a recurrent listening adapter has heard
        self._run = 0
        self._stop = False
        self.heard = 0  # frames read
        self.window_frames, self.refeed_frames = window_frames, refeed_frames
        self.context_frames = len(context or [])
        self._frames.extend(context or [])
        self.fed = 0  # frames fed, context frames included
        self.recent: collections.deque[torch.Tensor] = collections.deque(maxlen=refeed_frames or 1)
        self.first_frame = first_frame
        self.successor: ListenGroup | None = None
        self._push_lock = threading.Lock()
        self.probabilities: list[float] = []
        self.interrupted_at: int | None = None  # the frame whose P(irq) committed the row
        self.interrupted_step: int | None = None  # the speaking group's step that was cut (its step_count)

    # ----- input ----------------------------------------------------------------------------------------------------
    def push(self, frames: torch.Tensor) -> None:
        """Queue frames of the incoming audio, as :class:`~.duplex_mini_omni2.MiniOmni2ListenFrontEnd` gives them:
        (n, feature_dim) float features or (n, 7) codes. Safe to call from another thread than the engine's."""
        frames = torch.as_tensor(frames)
        if frames.ndim == 1:
            frames = frames[None]
        width = self.feature_dim if self.features else self.layout.num_audio_layers
        if frames.ndim != 2 or frames.shape[1] != width:
            kind = "feature vectors" if self.features else "codec frames"
            raise ValueError(f"listening frames must be {kind} of shape (n, {width}), got {tuple(frames.shape)}")
        for frame in frames:
            if not self.features:
                self.layout.listen_step(frame)  # 7 codes in range, or a clear error
        with self._push_lock:
            if self.successor is None:
                self._frames.extend(frame.detach().cpu() for frame in frames)
                return
        self.successor.push(frames)

    def chain(self) -> list["ListenGroup"]:
        """This row and the rows that took over from it, in order."""
        rows = [self]
        while rows[-1].successor is not None:
            rows.append(rows[-1].successor)
        return rows

    def current(self) -> "ListenGroup":
        """The row that listens now: this one, or the last of its successors."""
        return self.chain()[-1]

    @property
    def heard_total(self) -> int:
        """Frames of the stream read so far, by this row and the rows before it."""
        return self.first_frame + self.heard

    @property
    def backlog(self) -> int:
        """Frames pushed but not heard yet."""
        return len(self._frames)

    def finish(self) -> None:
        """End the row at the next step boundary, without an interruption (safe from any thread)."""
        self._stop = True

    # ----- EngineGroup --------------------------------------------------------------------------------------------------
    def prefill_inputs(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor(self.layout.build_listen_prompt().streams, dtype=torch.long, device=self.device)[None]
        return model.model.embed(ids), torch.ones(1, ids.shape[-1], dtype=torch.long, device=self.device)

    def begin_step(self, max_columns: int | None = None) -> None:
        """Take the frames of this step: the next one, or while behind the microphone up to ``catch_up_frames``;
        never past the hand-over (a row ends exactly at ``window_frames``), and a successor's context frames in
        steps of their own (a step's frames are all read, or none)."""
        count = self.catch_up_frames if max_columns is None else min(max_columns, self.catch_up_frames)
        if self.window_frames is not None:
            count = min(count, self.window_frames - self.fed)
        if self.fed < self.context_frames:
            count = min(count, self.context_frames - self.fed)
        count = 0 if self._stop else min(count, len(self._frames))
        self._feeding = [self._frames.popleft() for _ in range(count)]

    def columns(self) -> list[int]:
        return [len(self._feeding)]

    def waiting(self) -> list[bool]:
        return [not self._feeding]

    def is_idle(self) -> bool:
        return not self._frames and not self._stop

    def _reading(self) -> bool:
        """Whether this step's frames are read (a successor's refed context frames are fed, not read)."""
        return bool(self._feeding) and self.fed >= self.context_frames

    def text_slots(self) -> list[int]:
        return [0] if self._reading() else []

    def next_ids(self) -> torch.Tensor:
        """(1, 8) while waiting, else (1, 8, frames of this step)."""
        if not self._feeding:
            return torch.tensor([self.layout.listen_step(None)], dtype=torch.long, device=self.device)
        steps = [self.layout.listen_step(None if self.features else frame) for frame in self._feeding]
        return torch.tensor(steps, dtype=torch.long, device=self.device).T[None]

    def next_embeds(self) -> dict[int, torch.Tensor]:
        if not self._feeding or not self.features:
            return {}
        ids = self.next_ids()
        features = torch.stack(self._feeding).to(self.device, torch.float32)[None]
        mask = torch.ones(features.shape[:2], dtype=torch.bool, device=self.device)
        embeds = self.model.model.embed(
            ids, listen_features=features, listen_feature_mask=mask, listen_state=self._adapter_state
        )
        return {0: embeds[0]}

    def advance(self, text_scores: torch.Tensor | None, audio_scores: torch.Tensor | None) -> None:
        """Read this step's frames in order (``text_scores``: (1, frames, text_vocab)); the first that commits to
        ``irq`` interrupts, and the frames after it in the same step are not read."""
        feeding, self._feeding = self._feeding, []
        for column, frame in enumerate(feeding):
            reading = self.fed >= self.context_frames
            self.recent.append(frame)
            self.fed += 1
            if reading:
                probability = float(self.layout.irq_probability(text_scores[0, column]))
                self.probabilities.append(probability)
                self.heard += 1
                self._run = self.rule.run_after(self._run, probability)
                if self.rule.commits(self._run):
                    self._interrupt()
                    return
        if feeding and self.window_frames is not None and self.fed >= self.window_frames:
            self._hand_over()

    def _hand_over(self) -> None:
        """A fresh row takes over (``window_frames``): fed the last frames again, then what is still waiting."""
        refeed = list(self.recent)[-self.refeed_frames:] if self.refeed_frames else []
        successor = ListenGroup(self.model, self.speaking, self.rule, self.on_interrupt, self.window_frames,
                                self.refeed_frames, context=refeed, first_frame=self.heard_total,
                                catch_up_frames=self.catch_up_frames)
        with self._push_lock:
            successor._frames.extend(self._frames)
            self._frames.clear()
            self.successor = successor
        self.done = True

    def followers(self) -> list[EngineGroup]:
        return [self.successor] if self.successor is not None else []

    def _interrupt(self) -> None:
        self.interrupted_at = self.heard_total - 1
        speaking = self.speaking
        if speaking is not None and not speaking.done:
            self.interrupted_step = getattr(speaking, "step_count", None)
            speaking.cancel()
            speaking.apply_cancellations()  # every request of it ends now, its streams without what is still pending
        self.done = True
        if self.on_interrupt is not None:
            self.on_interrupt(self)

    def cancel(self, request: int | None = None) -> None:
        self._stop = True

    def apply_cancellations(self) -> None:
        if self._stop:
            self.done = True


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zeros on the left of ``dim`` up to ``length`` (embeddings, masks, cache states)."""
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _columns(ids: torch.Tensor, width: int) -> torch.Tensor:
    """A group's next ids, (rows, 8) or (rows, 8, n), as (rows, 8, width): its last column repeated on the left as
    padding (any valid ids: the engine's mask hides them)."""
    if ids.ndim == 2:
        ids = ids[:, :, None]
    missing = width - ids.shape[-1]
    if missing <= 0:
        return ids
    return torch.cat([ids[:, :, -1:].expand(-1, -1, missing), ids], dim=-1)


def _stack(by_slot: dict[int, torch.Tensor], slots: list[int]) -> torch.Tensor | None:
    return torch.stack([by_slot[s] for s in slots]) if slots else None


__all__ = [
    "MiniOmni2Engine",
    "EngineGroup",
    "DecodeGroup",
    "ListenGroup",
    "ListenRule",
    "LISTEN_CATCH_UP_FRAMES",
    "MiniOmni2ListenState",
    "DecodeSettings",
    "Sampling",
    "MiniOmni2GenerateOutput",
    "RowCache",
    "check_twin_rule",
    "infer_task",
    "output_kinds",
    "RELEASE_SAMPLING",
    "FINISH_REASONS",
]
