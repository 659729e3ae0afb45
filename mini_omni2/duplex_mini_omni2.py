"""Duplex interruption (extension, docs/duplex.md): what the listening row hears, and running it step by step.

While the model speaks, a *listening row* beside the speaking rows takes one frame of the incoming audio per decoding
step (one codec frame = 2,048 samples at 24 kHz = 85.3 ms = one step) and its text logits, restricted to
``irq``/``n_irq``, say whether the user interrupts. The ids and layouts are :class:`~.token_layout.TokenLayout`'s
(``build_listen_prompt``, ``listen_step``, ``read_listen_state``); this file has

- :class:`MiniOmni2ListenFrontEnd`: microphone chunks of any size and rate -> whole frames as they complete, either
  log-mel feature vectors (``listen_input="features"``, for the model's ``listen_projector``) or the codec's 7 codes
  (``listen_input="codec"``, SNAC's encoder run on windows with context, so the codes equal a one-shot encode);
- :class:`MiniOmni2Listener`: runs listening rows alone, one step per frame with a KV cache, exactly as a decoding
  engine runs them beside the speaking rows (the reference for the engine, and what the benchmark evaluates).

Shipped as remote code: imports only torch, transformers, numpy and siblings; soxr (librosa's resampler, installed
with it) is imported only when a stream's rate differs from the codec's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from .token_layout import LISTEN_CODEC, LISTEN_FEATURES, LISTEN_INPUTS, TokenLayout

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
        sampling_rate: int = 24000,
        frame_samples: int = 2048,
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
    """Listening rows run alone, one step per incoming frame with a KV cache, as the decoding engine runs them.

    ``start(batch_size)`` prefills ``batch_size`` listening prompts; each ``step(frames)`` feeds one frame per row
    (``(B, feature_dim)`` features or ``(B, 7)`` codes, as :class:`MiniOmni2ListenFrontEnd` gives them) with the
    state ``n_irq`` (the row ends at the first ``irq`` it commits to) and returns P(irq) per row from the text logits
    restricted to ``irq``/``n_irq`` (:meth:`TokenLayout.listen_irq_probability`). Rows that must wait for a frame are
    simply not stepped: a step is only taken with a frame for every row.

    ``window_frames``: when the rows hold this many frames they restart (a new prompt, then the last
    ``refeed_frames`` frames fed again without reading them), so rows never grow longer than those trained on.
    """

    def __init__(self, model, window_frames: int | None = None, refeed_frames: int = 0):
        self.model = model
        self.config = model.config
        self.layout: TokenLayout = self.config.token_layout
        if window_frames is not None and not 0 <= refeed_frames < window_frames:
            raise ValueError(f"need 0 <= refeed_frames ({refeed_frames}) < window_frames ({window_frames})")
        self.window_frames = window_frames
        self.refeed_frames = refeed_frames
        self.cache = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _inputs(self, frames: torch.Tensor | None, batch_size: int) -> dict:
        """Model inputs of one step (``frames`` (B, ...)) or of the prompt (``frames`` None)."""
        layout = self.layout
        if frames is None:
            ids = torch.tensor(layout.build_listen_prompt().streams, dtype=torch.long)
            return {"input_ids": ids[None].expand(batch_size, -1, -1).to(self.device)}
        if self.config.listen_input == LISTEN_FEATURES:
            dim = self.config.listen_feature_dim
            if frames.ndim != 2 or frames.shape[1] != dim:
                raise ValueError(f"feature frames must have shape (batch, {dim}), got {tuple(frames.shape)}")
            ids = torch.tensor(layout.listen_step(None), dtype=torch.long)[None, :, None].expand(batch_size, -1, 1)
            return {
                "input_ids": ids.to(self.device),
                "listen_features": frames[:, None].to(self.device, torch.float32),
                "listen_feature_mask": torch.ones(batch_size, 1, dtype=torch.bool, device=self.device),
            }
        ids = torch.tensor([layout.listen_step(frame) for frame in frames], dtype=torch.long)
        return {"input_ids": ids[:, :, None].to(self.device)}

    def _forward(self, inputs: dict) -> torch.Tensor:
        out = self.model(**inputs, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.text_logits[:, -1]

    @torch.no_grad()
    def start(self, batch_size: int = 1) -> None:
        """New listening rows: prefill their prompts."""
        from transformers import DynamicCache

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.cache = DynamicCache(config=self.config.text_config)
        self._recent: list[torch.Tensor] = []  # the last `refeed_frames` frames
        self._row_frames = 0
        self._forward(self._inputs(None, batch_size))

    def _feed(self, frames: torch.Tensor) -> torch.Tensor:
        self._row_frames += 1
        if self.refeed_frames:
            self._recent = (self._recent + [frames])[-self.refeed_frames :]
        return self._forward(self._inputs(frames, self.batch_size))

    @torch.no_grad()
    def step(self, frames: torch.Tensor) -> torch.Tensor:
        """Feed one frame per row; return P(irq) per row, shape (B,)."""
        if self.cache is None:
            raise ValueError("call start(batch_size) first")
        frames = torch.as_tensor(frames)
        if frames.shape[0] != self.batch_size:
            raise ValueError(f"got {frames.shape[0]} frames for {self.batch_size} rows")
        if self.window_frames is not None and self._row_frames >= self.window_frames:
            refeed = self._recent
            self.start(self.batch_size)
            for previous in refeed:
                self._feed(previous)
        logits = self._feed(frames)
        return self.layout.listen_irq_probability(logits).cpu()

    @torch.no_grad()
    def run(self, frames: torch.Tensor) -> torch.Tensor:
        """P(irq) of every frame of a batch of streams (B, T, ...) run step by step from a fresh start: (B, T)."""
        frames = torch.as_tensor(frames)
        self.start(frames.shape[0])
        probabilities = [self.step(frames[:, t]) for t in range(frames.shape[1])]
        return torch.stack(probabilities, dim=1) if probabilities else torch.zeros(frames.shape[0], 0)


__all__ = ["MiniOmni2ListenFrontEnd", "MiniOmni2Listener", "codec_encoder_receptive_field"]
