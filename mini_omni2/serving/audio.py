"""Audio in and out of the server: decoding uploads, the API's 24 kHz pcm16, wav answers, streaming resampling.

Decoding uses soundfile (libsndfile: wav, flac, ogg/opus, mp3); resampling uses soxr (a streaming resampler for the
realtime API's 24 kHz pcm16 -> Whisper's 16 kHz). The model hears 16 kHz (``processing_mini_omni2.SAMPLING_RATE``)
and speaks at its codec's rate (24 kHz for SNAC).
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import soundfile
import soxr

from ..processing_mini_omni2 import MAX_AUDIO_SECONDS, SAMPLING_RATE
from .errors import invalid

#: The sampling rate of the OpenAI APIs' raw ``pcm16`` audio (realtime input and output, chat ``pcm16`` output).
API_PCM_RATE = 24000
#: Encoded input formats accepted (``input_audio.format``); ``pcm16`` is raw little-endian 16-bit mono at 24 kHz.
INPUT_AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "pcm16")
#: Output formats of chat completions (``audio.format``).
OUTPUT_AUDIO_FORMATS = ("wav", "pcm16")


def b64decode(data: str, param: str) -> bytes:
    """Strict base64 (a data URL's payload or plain base64) -> bytes; a 400 naming ``param`` otherwise."""
    if not isinstance(data, str) or not data:
        raise invalid(f"{param} must be a non-empty base64 string", param)
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{param} is not valid base64", param, "invalid_base64") from None


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_audio(data: bytes, fmt: str | None, param: str, max_seconds: float = MAX_AUDIO_SECONDS):
    """Encoded audio -> (mono float32 samples, sampling rate); 400s for an unsupported format, unreadable data, silence
    of zero length, or more than ``max_seconds`` (the Whisper window the model hears)."""
    if fmt is not None and fmt not in INPUT_AUDIO_FORMATS:
        raise invalid(
            f"audio format {fmt!r} is not supported; use one of {', '.join(INPUT_AUDIO_FORMATS)}", param,
            "unsupported_audio_format",
        )
    if fmt == "pcm16":
        samples, rate = pcm16_to_float(data, param), API_PCM_RATE
    else:
        try:
            samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
            raise invalid(f"could not decode the audio of {param} ({fmt or 'unknown format'}): {error}", param,
                          "invalid_audio") from None
        samples = samples.mean(axis=1)
    if samples.size == 0:
        raise invalid(f"the audio of {param} is empty", param, "invalid_audio")
    if not np.isfinite(samples).all():
        raise invalid(f"the audio of {param} has NaN or infinite samples", param, "invalid_audio")
    seconds = samples.size / rate
    if seconds > max_seconds:
        raise invalid(
            f"the audio of {param} is {seconds:.1f} s long; the model hears at most {max_seconds:g} s", param,
            "audio_too_long",
        )
    return samples.astype(np.float32, copy=False), int(rate)


def to_model_rate(samples: np.ndarray, rate: int) -> np.ndarray:
    """Mono float32 at ``rate`` -> 16 kHz float32 (soxr)."""
    if rate == SAMPLING_RATE:
        return samples
    return soxr.resample(samples, rate, SAMPLING_RATE).astype(np.float32, copy=False)


def pcm16_to_float(data: bytes, param: str = "audio") -> np.ndarray:
    if len(data) % 2:
        raise invalid(f"{param}: pcm16 audio must have an even number of bytes, got {len(data)}", param,
                      "invalid_audio")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(samples) -> bytes:
    """Float samples in [-1, 1] (numpy or a CPU tensor) -> little-endian 16-bit PCM (clipped)."""
    samples = np.asarray(samples, dtype=np.float32)
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def wav_bytes(samples, rate: int) -> bytes:
    """A 16-bit PCM wav file of mono float samples."""
    buffer = io.BytesIO()
    soundfile.write(buffer, np.asarray(samples, dtype=np.float32), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


class PCM16Resampler:
    """A stream of the API's 24 kHz pcm16 chunks -> 16 kHz float32 chunks, without edges between chunks (soxr)."""

    def __init__(self, in_rate: int = API_PCM_RATE, out_rate: int = SAMPLING_RATE) -> None:
        self.in_rate, self.out_rate = in_rate, out_rate
        self._stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32")
        self._odd = b""  # a byte left over from an odd-length chunk

    def __call__(self, data: bytes, last: bool = False) -> np.ndarray:
        data = self._odd + data
        cut = len(data) - len(data) % 2
        self._odd = data[cut:]
        samples = np.frombuffer(data[:cut], dtype="<i2").astype(np.float32) / 32768.0
        return self._stream.resample_chunk(samples, last=last)


__all__ = [
    "API_PCM_RATE",
    "INPUT_AUDIO_FORMATS",
    "OUTPUT_AUDIO_FORMATS",
    "b64decode",
    "b64encode",
    "decode_audio",
    "to_model_rate",
    "pcm16_to_float",
    "float_to_pcm16",
    "wav_bytes",
    "PCM16Resampler",
]
