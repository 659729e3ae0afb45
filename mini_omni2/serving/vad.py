"""Server-side turn detection: silero-vad (its model ships inside the pip package) over a 16 kHz stream."""

from __future__ import annotations

import numpy as np
import torch

from ..processing_mini_omni2 import SAMPLING_RATE

#: Samples silero-vad scores at a time at 16 kHz (32 ms).
VAD_WINDOW = 512


class StreamingVAD:
    """Speech starts and ends in a stream of 16 kHz float32 chunks of any size.

    Args:
        model: a silero-vad model of this session alone (it keeps state between windows).
        threshold: speech probability above which a window is speech (OpenAI's ``threshold``, default 0.5).
        silence_ms: silence that ends a turn (OpenAI's ``silence_duration_ms``, default 500).
        offset: the stream position (in samples) of the first sample fed: positions reported are stream positions.
    """

    def __init__(self, model, threshold: float = 0.5, silence_ms: int = 500, offset: int = 0) -> None:
        from silero_vad import VADIterator

        self.iterator = VADIterator(model, threshold=threshold, sampling_rate=SAMPLING_RATE,
                                    min_silence_duration_ms=silence_ms)
        self.offset = offset
        self._pending = np.zeros(0, dtype=np.float32)
        self.speaking = False

    @torch.no_grad()
    def feed(self, samples: np.ndarray) -> list[tuple[str, int]]:
        """Score the new samples; returns ``("start" | "end", stream position in samples)`` events in order."""
        pending = np.concatenate([self._pending, np.asarray(samples, dtype=np.float32)])
        events = []
        usable = len(pending) - len(pending) % VAD_WINDOW
        for start in range(0, usable, VAD_WINDOW):
            found = self.iterator(torch.from_numpy(pending[start : start + VAD_WINDOW].copy()))
            if found:
                kind = "start" if "start" in found else "end"
                self.speaking = kind == "start"
                events.append((kind, self.offset + int(found[kind])))
        self._pending = pending[usable:]
        return events


__all__ = ["StreamingVAD", "VAD_WINDOW"]
