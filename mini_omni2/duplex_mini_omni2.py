"""Duplex interruption (extension, docs/duplex.md): what the listening row hears, and running it step by step.

While the model speaks, a *listening row* beside the speaking rows takes one frame of the incoming audio per decoding
step (one codec frame = 2,048 samples at 24 kHz = 85.3 ms = one step) and its text logits, restricted to
``irq``/``n_irq``, say whether the user interrupts. The ids and layouts are :class:`~.token_layout.TokenLayout`'s
(``build_listen_prompt``, ``listen_step``, ``read_listen_state``); this file has

- :class:`MiniOmni2ListenFrontEnd`: microphone chunks of any size and rate -> whole frames as they complete, either
  log-mel feature vectors (``listen_input="features"``, for the model's ``listen_projector``) or the codec's 7 codes
  (``listen_input="codec"``, SNAC's encoder run on windows with context, so the codes equal a one-shot encode);
- :class:`MiniOmni2Listener`: listening rows alone on the decoding engine (its ``ListenGroup``), every frame's
  P(irq) read: what the benchmark evaluates;
- :class:`DuplexSession`: a spoken conversation on the decoding engine: microphone chunks in, text deltas, speech
  chunks and events (``speaking``, ``interrupted``, ``listening``) out; its listening row is the engine's
  :class:`~.engine_mini_omni2.ListenGroup`.

Shipped as remote code: imports only torch, transformers, numpy and siblings; soxr (librosa's resampler, installed
with it) is imported only when a stream's rate differs from the codec's.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .configuration_mini_omni2 import SNAC_24KHZ, codec_frame_samples
from .engine_mini_omni2 import (
    DecodeGroup,
    DecodeSettings,
    EngineGroup,
    ListenGroup,
    ListenRule,
    MiniOmni2Engine,
    LISTEN_CATCH_UP_FRAMES,
    check_catch_up_frames,
    check_listen_window,
    output_kinds,
)
from .streaming_mini_omni2 import MiniOmni2Streamer, StreamEvent
from .token_layout import LISTEN_CODEC, LISTEN_FEATURES, LISTEN_INPUTS, OUTPUT_SPEECH, TokenLayout

#: Whisper's log-mel scaling without its per-clip maximum (not causal): ``(log10(max(mel, 1e-10)) + 4) / 4``.
LOG_MEL_FLOOR = 1e-10


def codec_encoder_receptive_field(codec: Any) -> int:
    """Samples on either side of a latent step that SNAC's encoder looks at (an upper bound), from its modules.

    Walks the encoder in order: a convolution reaches ``max(padding, (kernel - 1) * dilation - padding)`` of its input
    steps, a strided one then lowers the rate, a local attention reaches its window (5,268 samples for SNAC 24 kHz).
    """
    snac = getattr(codec, "snac", codec)
    scale, reach = 1.0, 0.0
    for module in snac.encoder.modules():
        if isinstance(module, nn.Conv1d):
            kernel, dilation, padding = module.kernel_size[0], module.dilation[0], module.padding[0]
            reach += max(padding, (kernel - 1) * dilation - padding, 0) * scale
            scale *= module.stride[0]
        elif type(module).__name__ == "LocalMHA":
            reach += float(module.window_size) * scale
    return int(math.ceil(reach))


def _as_mono_float(chunk: Any) -> np.ndarray:
    """A microphone chunk -> mono float32: 1-D, or 2-D (samples, channels); int16 PCM is scaled to [-1, 1)."""
    if isinstance(chunk, torch.Tensor):
        chunk = chunk.detach().cpu().numpy()
    array = np.asarray(chunk)
    if array.dtype == np.int16:
        array = array.astype(np.float32) / 32768.0
    elif not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"audio chunks must be float or int16 PCM, got dtype {array.dtype}")
    if array.ndim == 2:
        array = array.mean(axis=1)
    if array.ndim != 1:
        raise ValueError(f"audio chunks must be 1-D (mono) or 2-D (samples, channels), got shape {array.shape}")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise ValueError("audio chunk contains NaN or infinite samples")
    return array


class MiniOmni2ListenFrontEnd:
    """Streaming front end of the listening row: audio chunks of any size and rate in, whole frames out.

    ``feed(chunk, sampling_rate)`` returns the frames completed by that chunk (possibly none); ``flush()`` ends the
    stream (a last partial frame is dropped unless ``pad_partial=True``). Chunks are resampled to the
    codec's rate with a streaming resampler (soxr), so any chunking gives the same frames as the whole signal fed at
    once. Frames are

    - ``listen_input="features"``: float32 vectors (n, ``feature_dim``): each frame's causal log-mel columns (non
      centred STFT windows that end inside the frame, the earlier samples from the previous frames; no lookahead),
      the ``context_frames - 1`` previous frames' columns stacked in front (zeros before the start);
    - ``listen_input="codec"``: int64 codes (n, 7) in the token layout's frame order (SPEC §7). SNAC's encoder is
      not causal: frame k is encoded on a window of ``left_context_frames`` before it and ``lookahead_frames`` after
      it (default: its receptive field rounded up to frames, 3 and 3 at 24 kHz), so the codes equal a one-shot
      encode of the whole signal; frame k is therefore out ``lookahead_frames`` frames (256 ms) late.
    """

    def __init__(
        self,
        listen_input: str,
        sampling_rate: int = SNAC_24KHZ["sampling_rate"],
        frame_samples: int = codec_frame_samples(SNAC_24KHZ),
        feature_config: dict | None = None,
        codec: Any = None,
        left_context_frames: int | None = None,
        lookahead_frames: int | None = None,
    ):
        if listen_input not in LISTEN_INPUTS:
            raise ValueError(f"listen_input must be one of {LISTEN_INPUTS}, got {listen_input!r}")
        self.listen_input = listen_input
        self.sampling_rate = int(sampling_rate)
        self.frame_samples = int(frame_samples)
        if listen_input == LISTEN_FEATURES:
            if feature_config is None:
                raise ValueError("listen_input='features' needs feature_config (the config's listen_feature_config)")
            self._init_features(dict(feature_config))
        else:
            codec = getattr(codec, "codec", codec)
            if codec is None or not hasattr(codec, "encode"):
                raise ValueError("listen_input='codec' needs the model's codec (a model without one cannot listen)")
            if int(codec.sampling_rate) != self.sampling_rate or int(codec.samples_per_frame) != self.frame_samples:
                raise ValueError("the codec's rate and frame size differ from the front end's")
            self.codec = codec
            context = int(math.ceil(codec_encoder_receptive_field(codec) / self.frame_samples))
            self.left_context_frames = context if left_context_frames is None else int(left_context_frames)
            self.lookahead_frames = context if lookahead_frames is None else int(lookahead_frames)
            if self.left_context_frames < 0 or self.lookahead_frames < 0:
                raise ValueError("left_context_frames and lookahead_frames must be >= 0")
        self.reset()

    @classmethod
    def from_config(cls, config, codec: Any = None, **kwargs) -> "MiniOmni2ListenFrontEnd":
        """The front end of a :class:`~.configuration_mini_omni2.MiniOmni2Config` (``codec``: the model or its codec)."""
        return cls(
            config.listen_input,
            sampling_rate=config.listen_sampling_rate,
            frame_samples=config.listen_frame_samples,
            feature_config=config.listen_feature_config,
            codec=codec,
            **kwargs,
        )

    # ----- features ------------------------------------------------------------------------------------------------
    def _init_features(self, features: dict) -> None:
        from transformers.audio_utils import mel_filter_bank

        self.n_fft, self.hop_length = int(features["n_fft"]), int(features["hop_length"])
        self.num_mel_bins, self.context_frames = int(features["num_mel_bins"]), int(features["context_frames"])
        seconds = float(features.get("running_mean_seconds", 0.0))
        # per-frame weight of the running mean that is subtracted (0: none); a time constant of `seconds`
        self._mean_rate = 0.0 if seconds <= 0 else 1.0 - math.exp(-self.frame_samples / (self.sampling_rate * seconds))
        if self.frame_samples % self.hop_length or self.n_fft < self.hop_length:
            raise ValueError("hop_length must divide the frame and be <= n_fft")
        self.columns_per_frame = self.frame_samples // self.hop_length
        banks = mel_filter_bank(
            num_frequency_bins=self.n_fft // 2 + 1,
            num_mel_filters=self.num_mel_bins,
            min_frequency=float(features["f_min"]),
            max_frequency=float(features["f_max"]),
            sampling_rate=self.sampling_rate,
            norm="slaney",
            mel_scale="slaney",
        )
        self._mel = torch.from_numpy(np.asarray(banks, dtype=np.float32))  # (freq, mels)
        self._window = torch.hann_window(self.n_fft, periodic=True)

    @property
    def feature_dim(self) -> int | None:
        """Width of a feature frame (``num_mel_bins * columns_per_frame * context_frames``); None for codec input."""
        if self.listen_input != LISTEN_FEATURES:
            return None
        return self.num_mel_bins * self.columns_per_frame * self.context_frames

    def _log_mel(self, frames: torch.Tensor) -> torch.Tensor:
        """Whole frames (n, frame_samples) after the running history -> log-mel vectors (n, mels * columns)."""
        signal = torch.cat([self._history, frames.reshape(-1)])
        self._history = signal[signal.numel() - (self.n_fft - self.hop_length) :]
        spec = torch.stft(signal, self.n_fft, self.hop_length, window=self._window, center=False, return_complex=True)
        mel = self._mel.T @ spec.abs().pow(2)  # (mels, n * columns)
        log_mel = (mel.clamp(min=LOG_MEL_FLOOR).log10() + 4.0) / 4.0
        columns = log_mel.T.reshape(frames.shape[0], self.columns_per_frame, self.num_mel_bins)
        if self._mean_rate:
            columns = self._subtract_running_mean(columns)
        return columns.reshape(frames.shape[0], self.columns_per_frame * self.num_mel_bins)

    def _subtract_running_mean(self, columns: torch.Tensor) -> torch.Tensor:
        """Causal mean normalisation: subtract each mel bin's exponential running mean over frames (this one
        included), which removes stationary noise colour and the input level."""
        out = torch.empty_like(columns)
        for k in range(columns.shape[0]):
            current = columns[k].mean(dim=0)
            self._mean = current if self._mean is None else self._mean + self._mean_rate * (current - self._mean)
            out[k] = columns[k] - self._mean
        return out

    def _stack_context(self, vectors: torch.Tensor) -> torch.Tensor:
        if self.context_frames == 1:
            return vectors
        padded = torch.cat([self._previous, vectors])
        self._previous = padded[padded.shape[0] - (self.context_frames - 1) :]
        windows = padded.unfold(0, self.context_frames, 1)  # (n, dim, context)
        return windows.permute(0, 2, 1).reshape(vectors.shape[0], -1)

    # ----- codec ---------------------------------------------------------------------------------------------------
    def _encode_ready(self, final: bool) -> torch.Tensor:
        """Codes of the frames whose lookahead has arrived (all of them when ``final``)."""
        received = self._audio.numel() // self.frame_samples + self._dropped
        ready = received if final else received - self.lookahead_frames
        if ready <= self._encoded:
            return torch.zeros(0, 7, dtype=torch.long)
        start = max(self._encoded - self.left_context_frames, 0)
        stop = min(ready + self.lookahead_frames, received)
        window = self._audio[(start - self._dropped) * self.frame_samples : (stop - self._dropped) * self.frame_samples]
        codes = self.codec.encode(window[None])[0].cpu()
        out = codes[self._encoded - start : ready - start]
        self._encoded = ready
        keep_from = max(self._encoded - self.left_context_frames, 0)  # drop audio no later window needs
        self._audio = self._audio[(keep_from - self._dropped) * self.frame_samples :]
        self._dropped = keep_from
        return out

    # ----- the stream ----------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new stream (a new sampling rate may be used)."""
        self._rate: int | None = None
        self._resampler = None
        self._pending = np.zeros(0, dtype=np.float32)  # samples at the codec's rate not yet in a whole frame
        self._flushed = False
        if self.listen_input == LISTEN_FEATURES:
            self._history = torch.zeros(self.n_fft - self.hop_length)
            self._previous = torch.zeros(self.context_frames - 1, self.num_mel_bins * self.columns_per_frame)
            self._mean: torch.Tensor | None = None
        else:
            self._audio = torch.zeros(0)  # whole frames still needed as context, from frame index `_dropped`
            self._dropped = 0
            self._encoded = 0

    def _resample(self, samples: np.ndarray, last: bool) -> np.ndarray:
        if self._rate == self.sampling_rate:
            return samples
        if self._resampler is None:
            import soxr

            self._resampler = soxr.ResampleStream(self._rate, self.sampling_rate, 1, dtype="float32")
        return np.asarray(self._resampler.resample_chunk(samples, last=last), dtype=np.float32)

    def _frames_of(self, samples: np.ndarray, final: bool, pad_partial: bool = False) -> torch.Tensor:
        self._pending = np.concatenate([self._pending, samples])
        partial = final and self._pending.size % self.frame_samples > 0
        if partial:  # zeros up to a whole frame, as SNAC pads a one-shot encode
            pad = self.frame_samples - self._pending.size % self.frame_samples
            self._pending = np.concatenate([self._pending, np.zeros(pad, dtype=np.float32)])
        whole = self._pending.size // self.frame_samples * self.frame_samples
        frames = torch.from_numpy(self._pending[:whole].copy()).view(-1, self.frame_samples)
        self._pending = self._pending[whole:]
        if self.listen_input == LISTEN_FEATURES:
            out = self._stack_context(self._log_mel(frames)) if frames.shape[0] else torch.zeros(0, self.feature_dim)
        else:
            self._audio = torch.cat([self._audio, frames.reshape(-1)])
            out = self._encode_ready(final)
        return out[:-1] if partial and not pad_partial else out

    def feed(self, chunk: Any, sampling_rate: int) -> torch.Tensor:
        """Take a chunk (1-D, or 2-D (samples, channels); float or int16) at ``sampling_rate``; return new frames."""
        if self._flushed:
            raise ValueError("this stream was flushed; call reset() to start a new one")
        if not isinstance(sampling_rate, (int, np.integer)) or sampling_rate <= 0:
            raise ValueError(f"sampling_rate must be a positive int, got {sampling_rate!r}")
        if self._rate is None:
            self._rate = int(sampling_rate)
        elif int(sampling_rate) != self._rate:
            raise ValueError(f"this stream is at {self._rate} Hz, got a chunk at {sampling_rate} Hz; reset() first")
        with torch.no_grad():
            return self._frames_of(self._resample(_as_mono_float(chunk), last=False), final=False)

    def flush(self, pad_partial: bool = False) -> torch.Tensor:
        """End the stream: the remaining frames (the codec's lookahead frames are released).

        A last partial frame is dropped (its samples still serve as the codec's right context, zero-padded as in a
        one-shot SNAC encode), unless ``pad_partial``: then it is a frame of its own, zero-padded. Dropping it is the
        default because a frame that ends in digital silence is unlike any frame of a live stream.
        """
        if self._flushed:
            raise ValueError("this stream was already flushed; call reset() to start a new one")
        tail = np.zeros(0, dtype=np.float32)
        if self._rate is not None:
            tail = self._resample(tail, last=True)
        self._flushed = True
        with torch.no_grad():
            return self._frames_of(tail, final=True, pad_partial=pad_partial)

    def frames(self, audio: Any, sampling_rate: int, pad_partial: bool = False) -> torch.Tensor:
        """All frames of a whole signal (a fresh stream: ``reset``, ``feed``, ``flush``); the stream is left reset."""
        self.reset()
        frames = torch.cat([self.feed(audio, sampling_rate), self.flush(pad_partial)])
        self.reset()
        return frames

    def num_frames(self, num_samples: int, sampling_rate: int, pad_partial: bool = False) -> int:
        """Frames a whole signal of ``num_samples`` at ``sampling_rate`` gives: its length at the codec's rate
        (``ceil(num_samples * rate / sampling_rate)`` samples out of the resampler) in whole frames."""
        resampled = math.ceil(num_samples * self.sampling_rate / sampling_rate)
        whole = resampled // self.frame_samples
        return whole + int(pad_partial and resampled % self.frame_samples > 0)

    @property
    def frame_seconds(self) -> float:
        return self.frame_samples / self.sampling_rate

    @property
    def latency_frames(self) -> int:
        """Frames a frame waits for after it has been heard: the codec's lookahead, 0 for features."""
        return self.lookahead_frames if self.listen_input == LISTEN_CODEC else 0


class MiniOmni2Listener:
    """Listening rows alone, each stream of frames from a fresh row: the engine's
    :class:`~.engine_mini_omni2.ListenGroup` rows (one per stream, batched), with a rule that never commits, so that
    every frame's P(irq) is read. What the benchmark evaluates is therefore exactly what a session runs.

    ``window_frames`` / ``refeed_frames``: rows hand over to fresh rows as in :class:`~.engine_mini_omni2.ListenGroup`.
    ``catch_up_frames``: frames each row reads per step (default 1: a stream is scored one frame a step, as a
    session that keeps up with the microphone hears it; more: fewer, wider steps, the same P(irq) up to rounding).
    """

    def __init__(self, model, window_frames: int | None = None, refeed_frames: int = 0, catch_up_frames: int = 1):
        check_listen_window(window_frames, refeed_frames)
        check_catch_up_frames(catch_up_frames)
        self.model = model
        self.window_frames = window_frames
        self.refeed_frames = refeed_frames
        self.catch_up_frames = catch_up_frames

    @torch.no_grad()
    def run(self, frames: torch.Tensor) -> torch.Tensor:
        """P(irq) of every frame of a batch of streams (B, T, ...) (``(B, T, feature_dim)`` features or
        ``(B, T, 7)`` codes, as :class:`MiniOmni2ListenFrontEnd` gives them): (B, T)."""
        frames = torch.as_tensor(frames)
        engine = MiniOmni2Engine(self.model)
        report_only = ListenRule(0.5, frames.shape[1] + 1)  # no row commits: every frame is read
        rows = []
        for stream in frames:
            row = ListenGroup(self.model, rule=report_only, window_frames=self.window_frames,
                              refeed_frames=self.refeed_frames, catch_up_frames=self.catch_up_frames)
            row.push(stream)
            rows.append(engine.add(row))
        while engine.has_work() and not engine.idle:
            engine.step()
        probabilities = [[p for part in row.chain() for p in part.probabilities] for row in rows]
        return torch.tensor(probabilities, dtype=torch.float32).reshape(frames.shape[:2])


# ----------------------------------------------------------------------------------------------------------------
# a duplex conversation on the decoding engine
# ----------------------------------------------------------------------------------------------------------------
#: The kinds of :class:`DuplexEvent`.
DUPLEX_EVENTS = ("speaking", "text", "audio", "interrupted", "listening")


@dataclass
class DuplexEvent:
    """What a :class:`DuplexSession` reports.

    Args:
        type: ``"speaking"`` (an answer started), ``"text"`` (a text delta), ``"audio"`` (a speech chunk),
            ``"interrupted"`` (the listening row committed to ``irq``: the answer stops here) or ``"listening"``
            (the session listens again; ``reason``: ``"finished"`` once the answer has been heard to its end,
            ``"interrupted"``, ``"cancelled"`` or ``"error"``).
        text, token_ids: a text delta.
        audio, sampling_rate: a speech chunk (1-D float32).
        frame: ``interrupted``: the microphone frame (since the answer started) whose P(irq) committed the row.
        step: ``interrupted``: the decoding step of the answer that was cut (``None``: it had ended already and the
            interruption stops its playback).
        probability: ``interrupted``: that frame's P(irq).
        error: ``listening`` after an ``"error"``.
    """

    type: str
    text: str | None = None
    token_ids: list[int] | None = None
    audio: torch.Tensor | None = None
    sampling_rate: int | None = None
    frame: int | None = None
    step: int | None = None
    probability: float | None = None
    reason: str | None = None
    error: BaseException | None = None


class _SessionStreamer(MiniOmni2Streamer):
    """The answer's stream events, forwarded to the session."""

    def __init__(self, session: "DuplexSession", tokenizer: Any, **kwargs: Any):
        super().__init__(tokenizer, **kwargs)
        self.session = session

    def on_event(self, event: StreamEvent) -> None:
        self.session.on_answer_event(event)


class DuplexSession:
    """A spoken conversation with interruption ("stop omni", docs/duplex.md), on the decoding engine.

    :meth:`respond` starts a spoken answer (a :class:`~.engine_mini_omni2.DecodeGroup`) and, beside it, a listening
    row (:class:`~.engine_mini_omni2.ListenGroup`) that hears what :meth:`feed` gives it: microphone chunks of any
    size and rate, through the model's streaming front end (:meth:`MiniOmni2Model.listen_front_end`). Each frame of
    the microphone is one listening position, read one a step, or several in one step while the row catches up on
    a slow engine (``catch_up_frames``); when the row commits to ``irq`` (:class:`~.engine_mini_omni2.ListenRule`)
    the answer's rows are cancelled in that same step and nothing generated after it is streamed. The row keeps
    listening after the answer's last step until it has heard as many frames as the answer spoke (one frame of
    speech = one frame of microphone = 85.3 ms): the answer is still playing until then, and "stop omni" may still
    stop its playback.

    Events (:class:`DuplexEvent`) go to ``on_event`` (called from the thread that steps the engine) or are collected
    for :meth:`events`.

    Args:
        model: a model with a listening row (``listen_input`` "features" needs its trained ``listen_projector``).
        tokenizer: decodes text deltas (the processor or its tokenizer; ``None``: token ids only).
        engine: the decoding engine to run on (default: a new one, stepped by :meth:`step`). A server passes its own
            and steps it in its thread; then give ``submit`` too.
        rule: when the row commits to ``irq`` (default: the model's own rule, ``config.listen_rule``, else
            P(irq) >= 0.5 on one frame).
        settings: the answer's :class:`~.engine_mini_omni2.DecodeSettings` (default: the release's sampling).
        on_event: receives every event instead of :meth:`events`.
        submit: hands groups to the engine (default ``engine.add``, from the thread that steps it).
        streamer_kwargs: options of the answer's :class:`~.streaming_mini_omni2.MiniOmni2Streamer`.
        window_frames, refeed_frames: a listening row fed ``window_frames`` frames hands over to a fresh one that
            hears the last ``refeed_frames`` again (:class:`~.engine_mini_omni2.ListenGroup`); the default 168 / 24
            (14.3 s / 2 s) keeps rows within the proof's training rows (up to 176 frames). ``None``: one row.
        catch_up_frames: the most microphone frames the row reads in one engine step when decoding falls behind
            real time (:data:`~.engine_mini_omni2.LISTEN_CATCH_UP_FRAMES`; 1: never catch up).
    """

    def __init__(
        self,
        model,
        tokenizer: Any = None,
        engine: MiniOmni2Engine | None = None,
        rule: ListenRule | None = None,
        settings: DecodeSettings | None = None,
        on_event: Callable[[DuplexEvent], None] | None = None,
        submit: Callable[[EngineGroup], None] | None = None,
        streamer_kwargs: dict | None = None,
        window_frames: int | None = 168,
        refeed_frames: int = 24,
        catch_up_frames: int = LISTEN_CATCH_UP_FRAMES,
    ) -> None:
        check_listen_window(window_frames, refeed_frames)
        check_catch_up_frames(catch_up_frames)
        self.window_frames, self.refeed_frames = window_frames, refeed_frames
        self.catch_up_frames = catch_up_frames
        self.model = model
        self.config = model.config
        self.layout: TokenLayout = self.config.token_layout
        self.tokenizer = tokenizer
        self.engine = engine if engine is not None else MiniOmni2Engine(model)
        self.rule = rule or ListenRule.for_config(model.config)
        self.settings = settings
        self.on_event = on_event
        self.submit = submit or self.engine.add
        self.streamer_kwargs = dict(streamer_kwargs or {})
        self.front_end = model.listen_front_end()
        self.speaking_group: EngineGroup | None = None
        self.listen_group: ListenGroup | None = None
        self.spoken_frames = 0  # frames of speech streamed by the current answer
        self.state = "listening"
        self._events: list[DuplexEvent] = []
        self._lock = threading.Lock()
        self._feed_lock = threading.Lock()  # the front end: fed by one thread, reset by the engine's at respond()

    # ----- answers ---------------------------------------------------------------------------------------------------
    def respond(self, inputs: dict[str, torch.Tensor], settings: DecodeSettings | None = None,
                speaking: EngineGroup | None = None) -> EngineGroup:
        """Start a spoken answer to ``inputs`` (the processor's output for one request with a speech answer), and
        its listening row. A server that builds the answer's group itself passes it as ``speaking`` (then
        ``inputs`` is ignored). Returns the answer's group."""
        if self.state != "listening":
            raise RuntimeError("the session is already answering: cancel() it or wait for its 'listening' event")
        if speaking is None:
            input_ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
            if input_ids is None or input_ids.ndim != 3 or input_ids.shape[0] != 1:
                raise ValueError("respond takes the inputs of one request (input_ids of shape (1, 8, seq))")
            kinds = output_kinds(self.layout, input_ids)
            if kinds[0] != OUTPUT_SPEECH:
                raise ValueError(f"a duplex answer is spoken: the prompt asks for a {kinds[0]} answer; build it with "
                                 "a speech-out task (e.g. A1A2, T1A2)")
            streamer = _SessionStreamer(self, self.tokenizer, **self.streamer_kwargs)
            speaking = DecodeGroup(self.layout, dict(inputs), settings or self.settings or DecodeSettings(),
                                   streamer=streamer, codec=getattr(self.model, "codec", None))
        self.speaking_group = speaking
        self.spoken_frames = 0
        with self._feed_lock:
            self.front_end.reset()  # the row hears the microphone from the answer's start
        self.listen_group = ListenGroup(self.model, speaking=speaking, rule=self.rule, on_interrupt=self._interrupted,
                                        window_frames=self.window_frames, refeed_frames=self.refeed_frames,
                                        catch_up_frames=self.catch_up_frames)
        self.state = "speaking"
        self._emit(DuplexEvent("speaking"))
        self.submit(self.listen_group)  # first: it advances before its speaking rows anyway, and joins with them
        self.submit(speaking)
        return speaking

    def cancel(self) -> None:
        """Stop the answer and its listening row at the next step boundary (``listening`` with reason
        ``"cancelled"``)."""
        if self.state == "listening":
            return
        listen = self.listen_group.current() if self.listen_group is not None else None
        for group in (self.speaking_group, listen):
            if group is not None and not group.done:
                group.cancel()
        self._back_to_listening("cancelled")

    # ----- the microphone ------------------------------------------------------------------------------------------
    def feed(self, chunk: Any, sampling_rate: int) -> int:
        """Microphone audio (any size and rate; float or int16; mono or (samples, channels)). While an answer plays,
        its complete frames go to the listening row; otherwise nobody hears them (the front end restarts with each
        answer, so the row hears the microphone from the answer's start). Returns the frames completed by the chunk."""
        with self._feed_lock:
            frames = self.front_end.feed(chunk, sampling_rate)
            listen = self.listen_group
            if len(frames) and listen is not None and self.state == "speaking":
                listen.push(frames)  # to the row that listens now (ListenGroup.current())
        self.poll()
        return len(frames)

    # ----- running -------------------------------------------------------------------------------------------------
    def step(self) -> list[DuplexEvent]:
        """One engine step when there is something to compute (the session's own engine), then the events since the
        last call (when no ``on_event`` takes them)."""
        if self.engine.has_work() and not self.engine.idle:
            self.engine.step()
        self.poll()
        return self.events()

    def poll(self) -> None:
        """Act on the groups' state: a failed answer, and the end of listening once the answer has been heard."""
        speaking, listen = self.speaking_group, self.listen_group
        if self.state != "speaking" or speaking is None or listen is None:
            return
        listen = listen.current()
        if speaking.error is not None:
            listen.finish()
            self._back_to_listening("error", speaking.error)
        elif listen.error is not None:
            self._back_to_listening("error", listen.error)
        elif speaking.done and listen.interrupted_at is None and listen.heard_total >= self.spoken_frames:
            listen.finish()
            self._back_to_listening("finished")

    def events(self) -> list[DuplexEvent]:
        """The events collected since the last call (empty with ``on_event``)."""
        with self._lock:
            events, self._events = self._events, []
        return events

    # ----- callbacks (the engine's thread) -------------------------------------------------------------------------
    def on_answer_event(self, event: StreamEvent) -> None:
        """A stream event of the answer (``_SessionStreamer``; a server's own streamer may call it too)."""
        self.track_answer(event)
        if event.text or event.token_ids:
            self._emit(DuplexEvent("text", text=event.text, token_ids=list(event.token_ids)))
        if event.audio is not None and event.audio.numel():
            self._emit(DuplexEvent("audio", audio=event.audio, sampling_rate=event.sampling_rate))

    def track_answer(self, event: StreamEvent) -> None:
        """Count the answer's streamed frames of speech (the listening row listens until it has heard as many)."""
        if event.frames is not None:
            self.spoken_frames += int(event.frames.shape[0])

    def _interrupted(self, listen: ListenGroup) -> None:
        if self.listen_group is None or listen is not self.listen_group.current() or self.state != "speaking":
            return
        self._emit(DuplexEvent("interrupted", frame=listen.interrupted_at, step=listen.interrupted_step,
                               probability=listen.probabilities[-1]))
        self._back_to_listening("interrupted")

    def _back_to_listening(self, reason: str, error: BaseException | None = None) -> None:
        self.state = "listening"
        self._emit(DuplexEvent("listening", reason=reason, error=error))

    def _emit(self, event: DuplexEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)
            return
        with self._lock:
            self._events.append(event)


__all__ = [
    "MiniOmni2ListenFrontEnd",
    "MiniOmni2Listener",
    "DuplexSession",
    "DuplexEvent",
    "DUPLEX_EVENTS",
    "codec_encoder_receptive_field",
]
