"""Streaming for Mini-Omni2: text deltas and audio chunks of every request while ``generate`` runs.

The streamers follow transformers' ``BaseStreamer`` protocol (``put``/``end``); ``generate`` also calls ``begin``
(what each request answers, the codec) and, on an error, ``abort``.

Audio chunks. A frame (7 codes) exists once layer 7 has produced its code, i.e. 8 steps after layer 1's; every
``stream_stride`` frames (default 4, as in the release) a chunk of that many frames is sent. SNAC's decoder is
convolutional and *non-causal* (symmetric padding): an output sample depends on the codes up to
:func:`codec_receptive_field` samples on either side (4,757 samples = 2.3 frames for the 24 kHz model, whose decoder
has the same kernels, strides and dilations as the tiny test codec). Three ways to decode the chunks
(``chunk_mode``):

- ``"stateful"`` (default): each request has a :class:`~.codec_streaming_mini_omni2.CodecStream` that keeps every
  decoder layer's state, so each frame goes through SNAC once; a chunk is sent once its samples are final, i.e.
  ``lookahead`` frames later (the decoder's right-hand reach in whole frames: 3 for SNAC 24 kHz). The stream equals
  the one-shot decode up to float rounding when the codec's noise is off.
- ``"context"``: each chunk is decoded on its own with ``left_context`` previous frames and ``lookahead`` following
  frames (both default to the receptive field in whole frames, 3 and 3), then they are dropped: also equal to the
  one-shot decode, but every frame goes through SNAC ``(stride + left_context + lookahead) / stride`` times (2.5).
- ``"independent"``: the release's chunking (each chunk decoded alone, no overlap): wrong near every chunk edge.

A ``lookahead`` below the exact one trades exactness for latency: the chunk's last samples are then provisional
(decoded as if the answer ended there). This file is shipped as remote code: it imports only torch, transformers and
siblings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from queue import Queue
from typing import Any

import torch
from torch import nn
from transformers.generation.streamers import BaseStreamer

from .codec_streaming_mini_omni2 import CodecStream, StreamingCodecDecoder
from .token_layout import OUTPUT_SPEECH, TokenLayout

CHUNK_MODES = ("stateful", "context", "independent")


@dataclass
class StreamStep:
    """One decoding step of a batch, as ``generate`` puts it into a streamer.

    Args:
        tokens: (N, 8) global ids fed back at this step (audio layers 1..7, then text), one row per request.
        kept: (N,) whether the step belongs to the request's answer (False once it finished, and for the step whose
            layer-7 ``eoa`` / text-row ``eot`` stopped it).
        finished: (N,) whether the request is finished after this step.
        cancelled: (N,) whether the request was cancelled at this step: its stream ends without the audio that was
            still waiting for its lookahead (nothing generated after a cancel or an interruption is streamed).
    """

    tokens: torch.Tensor
    kept: torch.Tensor | None = None
    finished: torch.Tensor | None = None
    cancelled: torch.Tensor | None = None


@dataclass
class StreamEvent:
    """A piece of one request's answer.

    Args:
        request: index of the request (input row).
        text: new text, decoded with the streamer's tokenizer (``None`` without a tokenizer or without new text).
        token_ids: the new text token ids.
        audio: a 1-D float32 waveform chunk on the CPU at ``sampling_rate`` (``None`` without a codec or audio).
        frames: the chunk's codec frames (n, 7) (sanitized local codes), ``None`` if this event carries no audio.
        frame_start: index of the chunk's first frame in the answer.
        sampling_rate: the codec's sampling rate.
        final: the request's last event.
    """

    request: int
    text: str | None = None
    token_ids: list[int] = field(default_factory=list)
    audio: torch.Tensor | None = None
    frames: torch.Tensor | None = None
    frame_start: int | None = None
    sampling_rate: int | None = None
    final: bool = False


def codec_receptive_field(codec: Any) -> int:
    """Samples on either side of an output sample that SNAC's decoder looks at (an upper bound), from its modules.

    Walks the decoder in order: a convolution reaches ``max(padding, (kernel - 1) * dilation - padding)`` steps of its
    rate, a transposed convolution (upsampling by its stride) its padding at the new rate, a local attention its
    window. Codes enter at the latent rate (``hop_length`` samples a step) and are constant within a frame.
    """
    snac = getattr(codec, "snac", codec)
    scale = float(snac.hop_length)
    reach = 0.0
    for module in snac.decoder.modules():
        if isinstance(module, nn.ConvTranspose1d):
            stride, kernel = module.stride[0], module.kernel_size[0]
            padding, dilation = module.padding[0], module.dilation[0]
            scale /= stride
            right = (kernel - 1) * dilation - padding - (stride - 1)
            reach += max(padding, right, 0) * scale
        elif isinstance(module, nn.Conv1d):
            kernel, dilation, padding = module.kernel_size[0], module.dilation[0], module.padding[0]
            reach += max(padding, (kernel - 1) * dilation - padding, 0) * scale
        elif type(module).__name__ == "LocalMHA":
            reach += float(module.window_size) * scale
    return int(math.ceil(reach))


def default_context_frames(codec: Any) -> int:
    """Frames of context on each side for a chunked decode to equal the one-shot decode (3 for SNAC 24 kHz)."""
    return int(math.ceil(codec_receptive_field(codec) / codec.samples_per_frame))


class _Request:
    def __init__(self, kind: str):
        self.kind = kind
        self.layers: list[list[int]] | None = None
        self.frames: list[torch.Tensor] = []  # sanitized (7,) local codes
        self.emitted = 0  # frames already sent as audio
        self.token_ids: list[int] = []
        self.text_done = False
        self.printed = 0  # characters of decoded text already sent
        self.finished = False
        self.stream: CodecStream | None = None  # chunk_mode="stateful": the codec's state for this answer
        self.wave: torch.Tensor | None = None  # final samples decoded but not sent yet, from sample ``wave_start``
        self.wave_start = 0

    def take_samples(self, new: torch.Tensor) -> None:
        """Keep the stream's new final samples, less those already sent as provisional ones."""
        first = self.stream.samples - new.shape[-1]  # index of new[0] in the answer
        new = new[max(self.wave_start - first, 0) :]
        self.wave = new if self.wave is None else torch.cat([self.wave, new])

    def send_samples(self, stop: int) -> torch.Tensor:
        """The samples up to ``stop`` (final ones, then the stream's provisional tail if needed)."""
        count = stop - self.wave_start
        wave, have = self.wave, 0 if self.wave is None else self.wave.shape[-1]
        if have < count:
            tail = self.stream.peek()[: count - have]
            wave = tail if wave is None else torch.cat([wave, tail])
        self.wave, self.wave_start = wave[count:], stop
        return wave[:count]


class MiniOmni2Streamer(BaseStreamer):
    """Streams the text and speech of every request of a ``generate`` call.

    Args:
        tokenizer: decodes text deltas (a tokenizer or the processor; anything with ``decode(ids)``); without it the
            events carry token ids only.
        stream_stride (`int`): frames per audio chunk (4 = 341 ms, the release's).
        left_context (`int`, *optional*): frames decoded before a chunk and dropped; default: the codec's receptive
            field in frames (:func:`default_context_frames`, 3 for SNAC 24 kHz).
            Only for ``chunk_mode="context"`` (a stateful stream holds the whole past; independent chunks have none).
        lookahead (`int`, *optional*): frames that must exist after a chunk before it is sent; default: the fewest
            that make the chunk exact (``"stateful"``: the decoder's right-hand reach in frames,
            :attr:`StreamingCodecDecoder.lookahead_frames`; ``"context"``: as ``left_context``; 3 for SNAC 24 kHz;
            ``"independent"``: 0). Fewer make the chunk's end provisional. The last chunk of an answer needs none.
        chunk_mode (`str`): ``"stateful"`` (default: every frame decoded once, the decoder's state kept per
            request), ``"context"`` (each chunk re-decoded with ``left_context`` + ``lookahead`` frames) or
            ``"independent"`` (the release: each chunk decoded alone).
        codec_noise (`bool`, *optional*): SNAC's noise when decoding chunks; default: ``generate``'s ``codec_noise``.
        codec (*optional*): the codec for the chunks; default: the model's (none when ``generate`` is called with
            ``decode_audio=False``: then events carry frames only). Give it to stream audio but skip the one-shot
            decode at the end.
        decode_kwargs: passed to ``tokenizer.decode`` (default ``skip_special_tokens=True``).

    Override :meth:`on_event` to consume events; by default they are collected in ``events`` and
    :meth:`text`/:meth:`audio` join them per request.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        stream_stride: int = 4,
        left_context: int | None = None,
        lookahead: int | None = None,
        chunk_mode: str = "stateful",
        codec_noise: bool | None = None,
        codec: Any = None,
        **decode_kwargs: Any,
    ):
        if stream_stride < 1:
            raise ValueError(f"stream_stride must be >= 1, got {stream_stride}")
        if chunk_mode not in CHUNK_MODES:
            raise ValueError(f"chunk_mode must be one of {CHUNK_MODES}, got {chunk_mode!r}")
        for name, value in (("left_context", left_context), ("lookahead", lookahead)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.tokenizer = tokenizer
        self.stream_stride = stream_stride
        self._left_context = left_context
        self._lookahead = lookahead
        self.chunk_mode = chunk_mode
        self._codec_noise = codec_noise
        self.codec_noise = codec_noise
        decode_kwargs.setdefault("skip_special_tokens", True)
        self.decode_kwargs = decode_kwargs
        self.layout: TokenLayout | None = None
        self._codec = codec
        self.codec = codec
        self.requests: list[_Request] = []
        self.events: list[StreamEvent] = []
        self.error: BaseException | None = None
        self._default_context = 0
        self.decoder: StreamingCodecDecoder | None = None

    # ----- the generate protocol -----------------------------------------------------------------------------
    def begin(
        self,
        layout: TokenLayout,
        codec: Any = None,
        output_kinds: list[str] | None = None,
        codec_noise: bool = True,
        num_requests: int | None = None,
    ) -> None:
        """Start a stream: the layout, the codec (``None``: frames only) and each request's output kind."""
        if output_kinds is None:
            output_kinds = [OUTPUT_SPEECH] * (num_requests or 1)
        self.layout = layout
        self.codec = self._codec if self._codec is not None else codec
        self.codec_noise = self._codec_noise if self._codec_noise is not None else codec_noise
        self.decoder = None
        if self.codec is None:
            self._default_context = 0
        elif self.chunk_mode == "stateful":  # refuses a codec it cannot stream exactly
            self.decoder = StreamingCodecDecoder.shared(self.codec, noise=bool(self.codec_noise))
            self._default_context = self.decoder.lookahead_frames
        else:
            self._default_context = default_context_frames(self.codec)
        self.requests = [_Request(kind) for kind in output_kinds]
        for request in self.requests:
            if request.kind == OUTPUT_SPEECH:
                request.layers = [[] for _ in range(layout.num_audio_layers)]
                request.stream = self.decoder.stream() if self.decoder is not None else None
        self.events = []
        self.error = None

    @property
    def left_context(self) -> int:
        """Frames re-decoded before each chunk (``chunk_mode="context"`` only)."""
        if self.chunk_mode != "context":
            return 0
        if self._left_context is not None:
            return self._left_context
        return self._default_context

    @property
    def lookahead(self) -> int:
        """Frames that must exist after a chunk before it is sent."""
        if self.chunk_mode == "independent":
            return 0
        if self._lookahead is not None:
            return self._lookahead
        return self._default_context

    def put(self, value: StreamStep | torch.Tensor) -> None:
        """Take one step: a :class:`StreamStep` or a (N, 8) tensor of global ids (all kept)."""
        if self.layout is None:
            raise RuntimeError("call begin(layout, codec, output_kinds) first (generate does)")
        if not isinstance(value, StreamStep):
            value = StreamStep(tokens=torch.as_tensor(value))
        tokens = value.tokens.detach().cpu()
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.shape != (len(self.requests), self.layout.num_streams):
            expected = (len(self.requests), self.layout.num_streams)
            raise ValueError(f"expected tokens of shape {expected}, got {tuple(tokens.shape)}")
        kept = [True] * len(self.requests) if value.kept is None else value.kept.cpu().tolist()
        finished = [False] * len(self.requests) if value.finished is None else value.finished.cpu().tolist()
        cancelled = [False] * len(self.requests) if value.cancelled is None else value.cancelled.cpu().tolist()
        offsets = self.layout.stream_offsets()
        local = (tokens - offsets).tolist()
        jobs: list[tuple[int, int, int]] = []
        finishing: list[int] = []
        for r, request in enumerate(self.requests):
            if request.finished:
                continue
            if kept[r]:
                self._take_text(r, request, int(tokens[r, self.layout.text_stream]))
                if request.layers is not None:
                    for i, layer in enumerate(request.layers):
                        layer.append(local[r][i])
                    self._new_frames(request)
                    jobs += self._plan_chunks(r, request, final=False)
            if finished[r]:
                jobs += self._close(r, request, flush_audio=not cancelled[r])
                finishing.append(r)
        self._run_chunks(jobs)
        for r in finishing:
            self.on_event(StreamEvent(request=r, final=True))

    def end(self) -> None:
        """Flush every request (text remainder, last audio chunk) and close the stream."""
        jobs: list[tuple[int, int, int]] = []
        finishing = [r for r, request in enumerate(self.requests) if not request.finished]
        for r in finishing:
            jobs += self._close(r, self.requests[r])
        self._run_chunks(jobs)
        for r in finishing:
            self.on_event(StreamEvent(request=r, final=True))
        self.on_end()

    def abort(self, error: BaseException) -> None:
        """``generate`` failed: remember the error (the iterator streamer raises it in the consumer)."""
        self.error = error
        self.on_end()

    # ----- hooks ---------------------------------------------------------------------------------------------
    def on_event(self, event: StreamEvent) -> None:
        """Called for each event; the default collects them in ``self.events``."""
        self.events.append(event)

    def on_end(self) -> None:
        """Called once when the stream ends."""

    # ----- results of the default hooks ----------------------------------------------------------------------
    def text(self, request: int = 0) -> str:
        return "".join(e.text for e in self.events if e.request == request and e.text)

    def token_ids(self, request: int = 0) -> list[int]:
        return [t for e in self.events if e.request == request for t in e.token_ids]

    def audio(self, request: int = 0) -> torch.Tensor:
        chunks = [e.audio for e in self.events if e.request == request and e.audio is not None]
        return torch.cat(chunks) if chunks else torch.zeros(0)

    # ----- internals -----------------------------------------------------------------------------------------
    def _take_text(self, r: int, request: _Request, token: int) -> None:
        layout = self.layout
        if request.text_done:
            return
        if token == layout.eot:
            request.text_done = True
            return
        if not 0 <= token < layout.tokenizer_vocab_size:
            return
        request.token_ids.append(token)
        text = None
        if self.tokenizer is not None:
            decoded = self.tokenizer.decode(request.token_ids, **self.decode_kwargs)
            if decoded.endswith("\ufffd"):  # an incomplete character: wait for its next bytes
                text = ""
            else:
                text = decoded[request.printed :]
                request.printed = len(decoded)
        self.on_event(StreamEvent(request=r, text=text, token_ids=[token]))

    def _new_frames(self, request: _Request) -> None:
        layout = self.layout
        available = len(request.layers[0]) - layout.num_audio_layers
        while len(request.frames) < available:
            k = len(request.frames)
            frame = torch.tensor([request.layers[i][k + i + 1] for i in range(layout.num_audio_layers)])
            if request.frames:  # sanitize exactly as TokenLayout.sanitize_frames does on the whole answer
                fixed, _ = layout.sanitize_frames(torch.stack([request.frames[-1], frame]))
                frame = fixed[1]
            else:
                frame, _ = layout.sanitize_frames(frame[None])
                frame = frame[0]
            request.frames.append(frame)

    def _plan_chunks(self, r: int, request: _Request, final: bool) -> list[tuple[int, int, int]]:
        """The chunks (request, first frame, end frame) that can be sent now; marks them as sent."""
        jobs = []
        total = len(request.frames)
        while True:
            remaining = total - request.emitted
            if final:
                if remaining <= 0:
                    return jobs
                count = remaining
            elif remaining >= self.stream_stride + self.lookahead:
                count = self.stream_stride
            else:
                return jobs
            jobs.append((r, request.emitted, request.emitted + count))
            request.emitted += count

    def _run_chunks(self, jobs: list[tuple[int, int, int]]) -> None:
        """Decode the chunks (request, first frame, end frame) and send them."""
        if not jobs:
            return
        audio: dict[tuple[int, int, int], torch.Tensor] = {}
        if self.decoder is not None:
            audio = self._stateful_audio(jobs)
        elif self.codec is not None:
            audio = self._windowed_audio(jobs)
        rate = int(self.codec.sampling_rate) if self.codec is not None else None
        for job in jobs:
            r, start, stop = job
            frames = torch.stack(self.requests[r].frames[start:stop])
            self.on_event(
                StreamEvent(request=r, audio=audio.get(job), frames=frames, frame_start=start, sampling_rate=rate)
            )

    def _stateful_audio(self, jobs: list[tuple[int, int, int]]) -> dict[tuple[int, int, int], torch.Tensor]:
        """Feed each request with a chunk due its frames not decoded yet (and end the finished ones' streams), then
        cut the chunks from the final samples.

        Requests that have decoded as many frames (a batch's requests move in step) share one batched codec call:
        measured on a 2-core CPU with SNAC 24 kHz, pieces of 4 frames of 4 requests cost about as much per frame in
        one call as in 4 calls (batching saves the weights' reads, loses cache locality), and on a GPU one call
        saves the kernel launches of the others. Frames are fed when a chunk is due rather than one per step: on a
        CPU a call of 4 frames costs per frame about 60 % of 4 calls of 1 (every call reads all the weights).
        """
        decoder, spf = self.decoder, self.decoder.samples_per_frame
        groups: dict[tuple[int, int, bool], list[int]] = {}
        for r in dict.fromkeys(job[0] for job in jobs):
            request = self.requests[r]
            stream = request.stream
            if stream.frames < len(request.frames) or (request.finished and not stream.flushed):
                groups.setdefault((stream.frames, len(request.frames), request.finished), []).append(r)
        for (done, total, finished), members in groups.items():
            streams = [self.requests[r].stream for r in members]
            if total > done:
                frames = torch.stack([torch.stack(self.requests[r].frames[done:total]) for r in members])
                for r, wave in zip(members, decoder.push(streams, frames)):
                    self.requests[r].take_samples(wave)
            if finished:
                for r, wave in zip(members, decoder.flush(streams)):
                    self.requests[r].take_samples(wave)
        audio = {}
        for job in jobs:
            r, start, stop = job
            audio[job] = self.requests[r].send_samples(stop * spf).float().cpu()
        return audio

    def _windowed_audio(self, jobs: list[tuple[int, int, int]]) -> dict[tuple[int, int, int], torch.Tensor]:
        """Decode each chunk with its context windows ("context", "independent"), windows of the same shape in one
        codec call (a batch's requests move in step)."""
        windows = {}
        for job in jobs:
            r, start, stop = job
            frames = self.requests[r].frames
            low = max(0, start - self.left_context)
            high = min(len(frames), stop + self.lookahead)
            windows[job] = (low, high)
        audio: dict[tuple[int, int, int], torch.Tensor] = {}
        spf = self.codec.samples_per_frame
        groups: dict[tuple[int, int, int], list] = {}
        for job, (low, high) in windows.items():
            r, start, stop = job
            groups.setdefault((high - low, start - low, stop - low), []).append(job)
        for (_, first, last), members in groups.items():
            batch = torch.stack([torch.stack(self.requests[job[0]].frames[slice(*windows[job])]) for job in members])
            waves = self.codec.decode(batch, noise=bool(self.codec_noise))
            for job, wave in zip(members, waves):
                audio[job] = wave[first * spf : last * spf].float().cpu()
        return audio

    def _close(self, r: int, request: _Request, flush_audio: bool = True) -> list[tuple[int, int, int]]:
        """Finish a request: its text remainder now, its last chunks to decode (none when it was cancelled)."""
        if self.tokenizer is not None and request.token_ids:
            decoded = self.tokenizer.decode(request.token_ids, **self.decode_kwargs)
            if len(decoded) > request.printed:
                self.on_event(StreamEvent(request=r, text=decoded[request.printed :]))
                request.printed = len(decoded)
        request.finished = True
        if request.layers is None or not flush_audio:
            return []
        return self._plan_chunks(r, request, final=True)


class MiniOmni2IteratorStreamer(MiniOmni2Streamer):
    """A :class:`MiniOmni2Streamer` to iterate over from another thread while ``generate`` runs.

    ``for event in streamer: ...`` yields :class:`StreamEvent` objects until the stream ends. ``timeout`` (seconds)
    bounds each wait; on timeout ``queue.Empty`` is raised. If ``generate`` fails, its error is raised in the consumer.

    Example::

        streamer = MiniOmni2IteratorStreamer(processor, timeout=60)
        thread = Thread(target=model.generate, kwargs=dict(**inputs, streamer=streamer))
        thread.start()
        for event in streamer:
            ...
    """

    _STOP = object()

    def __init__(self, tokenizer: Any = None, timeout: float | None = None, **kwargs: Any):
        super().__init__(tokenizer, **kwargs)
        self.queue: Queue = Queue()
        self.timeout = timeout

    def on_event(self, event: StreamEvent) -> None:
        self.queue.put(event, timeout=self.timeout)

    def on_end(self) -> None:
        self.queue.put(self._STOP, timeout=self.timeout)

    def __iter__(self):
        return self

    def __next__(self) -> StreamEvent:
        item = self.queue.get(timeout=self.timeout)
        if item is self._STOP:
            if self.error is not None:
                raise self.error
            raise StopIteration
        return item


__all__ = [
    "StreamStep",
    "StreamEvent",
    "MiniOmni2Streamer",
    "MiniOmni2IteratorStreamer",
    "codec_receptive_field",
    "default_context_frames",
    "CHUNK_MODES",
]
