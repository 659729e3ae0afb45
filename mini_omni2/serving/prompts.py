"""From API requests to model inputs: the current turn's prompt, the earlier turns of a conversation, and sampling.

**Multi-turn (this project's extension).** The released prompt layouts are single-turn (SPEC §4). A conversation's
earlier turns enter the prompt as *text segments* placed before the current turn's prompt, composed from the token
layout's own pieces (nothing new in the vocabulary):

- an earlier user turn with text: the input segment of the T1 layouts, ``input_t, tokens, eot`` on the text stream
  and ``pad_a`` on the 7 audio streams (a T1T2 prompt without its answer position);
- an earlier assistant turn: the answer position of a text answer (``answer_t``, ``pad_a``) followed by the text
  answer as the model generates it (``tokens, eot``; :meth:`TokenLayout.delay_answer` without frames).

Earlier turns' audio and images do not enter (the model takes one audio window and one image per prompt, at fixed
positions); an earlier spoken user turn enters through its transcript when one is known (realtime sessions with input
transcription), else not at all; an assistant's spoken answer enters through its transcript. The history is bounded:
the most recent whole turns that fit in ``max_history_positions`` (and in the context with the answer's steps).
System and developer messages (and realtime ``instructions``) are not put in the prompt: the release has no system
prompt and was not trained with one.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..engine_mini_omni2 import DecodeSettings, Sampling
from ..processing_mini_omni2 import SAMPLING_RATE
from ..token_layout import OUTPUT_SPEECH, TokenLayout
from .errors import invalid

#: Positions of earlier turns kept in a prompt at most (the oldest whole turns are dropped first).
DEFAULT_MAX_HISTORY_POSITIONS = 512


@dataclass
class Turn:
    """One turn of a conversation: who spoke, and what (text; audio as 16 kHz float32; an RGB PIL image)."""

    role: str
    text: str | None = None
    audio: np.ndarray | None = None
    image: Any = None

    @property
    def empty(self) -> bool:
        return not (self.text and self.text.strip()) and self.audio is None and self.image is None


@dataclass
class Prompt:
    """Model inputs of one request (batch of 1), with the counts ``usage`` reports."""

    inputs: dict[str, torch.Tensor]
    history_positions: int = 0
    text_tokens: int = 0
    audio_positions: int = 0
    image_positions: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.inputs["input_ids"].shape[-1])


# ----- earlier turns ------------------------------------------------------------------------------------------------
def user_segment(layout: TokenLayout, text_ids: list[int]) -> list[list[int]]:
    """An earlier user text turn: the T1 input segment (``input_t, tokens, eot`` / ``pad_a``), 8 rows of ids."""
    prompt = layout.build_prompt("T1T2", text_ids=text_ids)
    return [row[:-1] for row in prompt.streams]  # without the answer position


def assistant_segment(layout: TokenLayout, text_ids: list[int]) -> list[list[int]]:
    """An earlier assistant turn: a text answer's answer position (``answer_t`` / ``pad_a``), then its text as
    generated (``tokens, eot`` / ``pad_a``), 8 rows of ids."""
    answer_position = layout.pad_ids().tolist()
    answer_position[layout.text_stream] = layout.answer_t
    streams, _ = layout.delay_answer(text_ids, None)
    return [[first] + row for first, row in zip(answer_position, streams)]


def history_streams(processor, turns: list[Turn], max_positions: int) -> list[list[int]]:
    """The text segments of ``turns`` (oldest first), keeping the most recent whole turns within ``max_positions``."""
    layout = processor.layout
    segments = []
    for turn in turns:
        if not (turn.text and turn.text.strip()):
            continue
        ids = processor._encode_text(turn.text)  # the prompt's text rule: the plain encoding, no BOS
        if turn.role == "assistant":
            segments.append(assistant_segment(layout, ids))
        else:
            segments.append(user_segment(layout, ids))
    kept, total = [], 0
    for segment in reversed(segments):
        if total + len(segment[0]) > max_positions:
            break
        kept.insert(0, segment)
        total += len(segment[0])
    rows: list[list[int]] = [[] for _ in range(layout.num_streams)]
    for segment in kept:
        for row, part in zip(rows, segment):
            row.extend(part)
    return rows


def prepend_history(inputs: dict[str, torch.Tensor], history: list[list[int]]) -> dict[str, torch.Tensor]:
    """The processor's inputs of one request with ``history`` positions before its prompt (features shift along)."""
    length = len(history[0])
    if length == 0:
        return inputs
    ids = inputs["input_ids"]
    prefix = torch.tensor(history, dtype=ids.dtype)[None].to(ids.device)
    out = dict(inputs)
    out["input_ids"] = torch.cat([prefix, ids], dim=-1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"].new_ones(1, length), inputs["attention_mask"]], -1)
    for name in ("audio_feature_mask", "image_feature_mask"):
        if name in inputs:
            out[name] = torch.cat([inputs[name].new_zeros(1, length), inputs[name]], dim=-1)
    return out


def build_prompt(
    processor,
    current: Turn,
    history: list[Turn],
    output: str,
    max_history_positions: int = DEFAULT_MAX_HISTORY_POSITIONS,
    reserve: int = 0,
    param: str = "messages",
) -> Prompt:
    """The model inputs for answering ``current`` (output ``"speech"``, ``"text"`` or ``"asr"``) after ``history``.

    A current turn with text *and* audio (a text instruction beside speech) has no released layout: its text enters as
    the last history segment and the audio is the prompt. ``reserve`` positions (the answer's steps) are kept free in
    the context when the history is cut. Refusals are 400s naming ``param``.
    """
    if current.empty:
        raise invalid("there is nothing to answer: the last user turn has no text, audio or image", param)
    text, history = current.text, list(history)
    if text is not None and not text.strip():
        text = None
    if text is not None and current.audio is not None:
        history.append(Turn("user", text=text))
        text = None
    try:
        inputs = processor(
            text=text,
            audio=(current.audio, SAMPLING_RATE) if current.audio is not None else None,
            images=current.image,
            output=output,
        )
    except ValueError as error:
        raise invalid(str(error), param) from None
    inputs = {k: v for k, v in inputs.items() if k != "request_index"}
    room = processor.model_max_length - int(inputs["input_ids"].shape[-1]) - reserve
    rows = history_streams(processor, history, max(0, min(max_history_positions, room)))
    layout = processor.layout
    text_row = inputs["input_ids"][0, layout.text_stream].tolist()
    prompt = Prompt(
        inputs=prepend_history(inputs, rows),
        history_positions=len(rows[0]),
        text_tokens=sum(1 for t in text_row if 0 <= t < layout.tokenizer_vocab_size),
        audio_positions=int(inputs["audio_feature_mask"].sum()) if "audio_feature_mask" in inputs else 0,
        image_positions=int(inputs["image_feature_mask"].sum()) if "image_feature_mask" in inputs else 0,
    )
    return prompt


# ----- sampling -----------------------------------------------------------------------------------------------------
def _number(value, name: str, low: float, high: float | None = None, integer: bool = False,
            low_open: bool = False):
    """``value`` checked as a number (an integer with ``integer``) in its range; a 400 naming ``name`` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        kind = "an integer" if integer else "a number"
        raise invalid(f"{name} must be {kind}, got {value!r}", name)
    if (value <= low if low_open else value < low) or (high is not None and value > high):
        bounds = f"{'>' if low_open else '>='} {low:g}" if high is None else \
            f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        raise invalid(f"{name} must be {bounds}, got {value!r}", name)
    return int(value) if integer else float(value)


def decode_settings(
    *,
    temperature=None,
    top_p=None,
    top_k=None,
    seed=None,
    max_tokens=None,
    min_tokens=None,
    default_max_tokens: int,
    limit_max_tokens: int,
    device: torch.device | str = "cpu",
    max_tokens_param: str = "max_completion_tokens",
) -> DecodeSettings:
    """The engine settings of one request from the OpenAI sampling fields.

    - No ``temperature``, ``top_p`` or ``top_k`` given: the release's decoding (temperature 0.9 with top_k 1, i.e.
      greedy; the model's generation config).
    - Any of them given: OpenAI's meaning on all 8 streams: ``temperature`` (default 1.0; 0 is greedy), ``top_p``
      (default 1.0) and ``top_k`` (an extension field, default 0 = off) over the full distribution.
    - ``seed``: the request's own ``torch.Generator``, so a sampled answer is reproducible whatever else the batch
      holds; without it a random seed.
    - ``max_tokens``: decoding steps (one step is one position of the 8 streams, ~85 ms of speech per frame);
      default ``default_max_tokens``, at most ``limit_max_tokens``.
    - ``min_tokens`` (an extension, as in vLLM): steps before the answer may stop (benchmarks use it to make random
      weights answer at a fixed length).
    """
    temperature = _number(temperature, "temperature", 0.0, 2.0)
    top_p = _number(top_p, "top_p", 0.0, 1.0, low_open=True)
    top_k = _number(top_k, "top_k", 0, integer=True)
    seed = _number(seed, "seed", -(1 << 63), integer=True)
    max_tokens = _number(max_tokens, max_tokens_param, 1, integer=True)
    min_tokens = _number(min_tokens, "min_tokens", 0, integer=True)
    if temperature is None and top_p is None and top_k is None:
        sampling = Sampling()  # the release's: greedy through top_k = 1
    elif temperature == 0.0:
        sampling = Sampling(do_sample=False)
    else:
        sampling = Sampling(
            do_sample=True,
            temperature=1.0 if temperature is None else temperature,
            top_k=0 if top_k is None else top_k,
            top_p=1.0 if top_p is None else top_p,
        )
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed % (1 << 63) if seed is not None else secrets.randbits(63))
    steps = max(1, default_max_tokens if max_tokens is None else min(max_tokens, limit_max_tokens))
    if min_tokens is not None and min_tokens > steps:
        raise invalid(f"min_tokens ({min_tokens}) is more than the answer's {steps} steps", "min_tokens")
    return DecodeSettings(text=sampling, max_new_tokens=steps, min_new_tokens=min_tokens or 0, generator=generator)


__all__ = [
    "Turn",
    "Prompt",
    "user_segment",
    "assistant_segment",
    "history_streams",
    "prepend_history",
    "build_prompt",
    "decode_settings",
    "DEFAULT_MAX_HISTORY_POSITIONS",
    "OUTPUT_SPEECH",
]
