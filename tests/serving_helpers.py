"""Helpers of the serving tests: raw HTTP calls, references from ``generate``, audio conversions."""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request

import numpy as np
import soundfile
import soxr
from transformers import LogitsProcessor

from mini_omni2.serving.audio import float_to_pcm16

NAME = "tiny-random"


def http_request(url: str, data: bytes | None = None, content_type: str = "application/json", method: str | None = None):
    """(status, parsed JSON or text) of one request; error statuses are returned, not raised."""
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    if data is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode("utf-8", "replace")


def post_json(url: str, body) -> tuple[int, dict]:
    return http_request(url, json.dumps(body).encode())


def health(base: str) -> dict:
    return http_request(base + "/health")[1]


def wait_until_idle(base: str, timeout: float = 20.0) -> dict:
    """Poll /health until no row is decoding and no request is waiting; the last report."""
    deadline = time.monotonic() + timeout
    while True:
        report = health(base)
        if report["rows_in_use"] == 0 and report["active_requests"] == 0:
            return report
        if time.monotonic() > deadline:
            raise AssertionError(f"the server is still busy: {report}")
        time.sleep(0.05)


#: Greedy choices closer than this are float-rounding ties: a batch of another shape may pick the other id.
TIE_MARGIN = 1e-5


class MarginRecorder(LogitsProcessor):
    """Records the smallest gap between the best and the second-best score of every greedy choice."""

    def __init__(self) -> None:
        self.margin = float("inf")

    def __call__(self, input_ids, scores):
        top = scores.float().topk(2, dim=-1).values
        self.margin = min(self.margin, float((top[:, 0] - top[:, 1]).min()))
        return scores


def reference_with_margin(model, processor, max_tokens: int, **request):
    """The greedy answer of ``generate`` alone (codec noise off): (text, pcm16 samples or None, smallest margin of
    its text and audio choices)."""
    text_margin, audio_margin = MarginRecorder(), MarginRecorder()
    out = model.generate(**processor(**request), max_new_tokens=max_tokens, do_sample=False, codec_noise=False,
                         logits_processor=[text_margin], audio_logits_processor=[audio_margin])
    wave = out.waveforms[0]
    pcm = None if wave is None else np.frombuffer(float_to_pcm16(wave.numpy()), dtype="<i2")
    return processor.decode(out.text_ids[0]), pcm, min(text_margin.margin, audio_margin.margin)


def reference(model, processor, max_tokens: int, **request):
    """The greedy answer of ``generate`` alone: (text, pcm16 samples or None). The server decodes in batches of other
    shapes (and shares the twin's prefill), so its greedy answer equals this one only where no choice is a rounding
    tie: a reference with a tie fails here, naming it, rather than as a mismatch later."""
    text, pcm, margin = reference_with_margin(model, processor, max_tokens, **request)
    assert margin > TIE_MARGIN, f"the reference of {request} has a float-rounding tie ({margin:.1e}): change the prompt"
    return text, pcm


def pcm_of(chunks_b64: list[str]) -> np.ndarray:
    return np.frombuffer(b"".join(base64.b64decode(c) for c in chunks_b64), dtype="<i2")


def assert_same_pcm(got: np.ndarray, expected: np.ndarray) -> None:
    """Streamed pcm16 equals the one-shot decode of ``generate`` up to float rounding (1 LSB)."""
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert len(got) > 0
    assert int(np.abs(got.astype(np.int32) - expected.astype(np.int32)).max()) <= 1


def wav_b64(path) -> str:
    return base64.b64encode(open(path, "rb").read()).decode()


def png_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def pcm24k_of_wav(path) -> bytes:
    """A wav file as the realtime API's 24 kHz pcm16 bytes."""
    samples, rate = soundfile.read(str(path), dtype="float32")
    return float_to_pcm16(soxr.resample(samples, rate, 24000))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
