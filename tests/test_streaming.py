"""Streaming: text deltas and audio chunks; chunked decoding equals the one-shot decode (SPEC §7)."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from transformers import LogitsProcessor

from mini_omni2.configuration_mini_omni2 import SNAC_24KHZ
from mini_omni2.streaming_mini_omni2 import (
    MiniOmni2IteratorStreamer,
    MiniOmni2Streamer,
    StreamStep,
    codec_receptive_field,
    default_context_frames,
)

STEPS = 31  # 24 frames: 6 chunks of 4


def snr_db(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    """SNR of ``estimate`` against the zero-mean ``reference`` (a DC offset cannot inflate it)."""
    assert reference.shape == estimate.shape
    signal = ((reference - reference.mean()) ** 2).sum()
    error = ((reference - estimate) ** 2).sum().clamp(min=1e-30)
    return 10 * math.log10(float(signal / error))


class CodesOnly(LogitsProcessor):
    """Audio scores: only codec codes (the random model otherwise emits many specials, sanitized to repeats)."""

    def __init__(self, codebook_size: int):
        self.codebook_size = codebook_size

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.codebook_size :] = float("-inf")
        return scores


@pytest.fixture(scope="module")
def answer(model, processor):
    """Two spoken answers of 24 frames and one text answer, generated once (greedy, codec noise off)."""
    inputs = dict(processor(text=["hello world", "what is your name?", "tell me a story"],
                            output=["speech", "speech", "text"]))
    streamer = MiniOmni2Streamer(processor)
    out = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, codec_noise=False,
                         streamer=streamer, audio_logits_processor=[CodesOnly(model.layout.audio_codebook_size)])
    return inputs, out, streamer


def replay(out, prompt_len: int, streamer: MiniOmni2Streamer, layout, codec, tokens=None, request=0):
    """Put request ``request``'s generated steps into ``streamer`` as generate does (as a batch of one); returns the
    number of steps put when each event came."""
    streamer.begin(layout=layout, codec=codec, output_kinds=[out.output_kinds[request]], codec_noise=False)
    tokens = out.sequences[request : request + 1, :, prompt_len:] if tokens is None else tokens
    lengths = out.generated_lengths[request : request + 1]
    put_of_event = []
    for step in range(tokens.shape[-1]):
        kept = lengths > step
        streamer.put(StreamStep(tokens=tokens[:, :, step], kept=kept, finished=~kept))
        put_of_event += [step + 1] * (len(streamer.events) - len(put_of_event))
    streamer.end()
    return put_of_event


def test_stream_equals_one_shot_decode(answer, processor):
    inputs, out, streamer = answer
    assert out.generated_lengths.tolist() == [STEPS, STEPS, STEPS]
    for r in (0, 1):
        assert out.audio_frames[r].shape == (24, 7)
        assert not out.audio_frames_replaced[r].any()
        assert len(out.audio_frames[r].unique()) > 10
        streamed = streamer.audio(r)
        assert snr_db(out.waveforms[r], streamed) >= 30.0
        chunks = [e for e in streamer.events if e.request == r and e.audio is not None]
        assert [e.frame_start for e in chunks] == list(range(0, 24, 4))
        assert torch.equal(torch.cat([e.frames for e in chunks]), out.audio_frames[r])
        assert all(e.sampling_rate == 24000 for e in chunks)
    assert streamer.audio(2).numel() == 0
    for r in range(3):
        assert streamer.text(r) == processor.decode(out.text_ids[r])
        assert streamer.token_ids(r) == out.text_ids[r].tolist()
        assert [e.final for e in streamer.events if e.request == r][-1]


def test_left_context_alone_is_not_enough(answer, model):
    """SNAC's decoder is non-causal: without lookahead (or in the release's independent chunks) the chunk edges
    differ from the one-shot decode; with the receptive field on both sides they do not."""
    inputs, out, _ = answer
    prompt_len = inputs["input_ids"].shape[-1]
    results = {}
    for name, kwargs in {
        "independent": dict(chunk_mode="independent"),
        "left_only": dict(left_context=3, lookahead=0),
        "context": dict(),
        "context_stride_3": dict(stream_stride=3),
    }.items():
        streamer = MiniOmni2Streamer(**kwargs)
        replay(out, prompt_len, streamer, model.layout, model.codec)
        results[name] = snr_db(out.waveforms[0], streamer.audio(0))
    assert results["context"] >= 60.0 and results["context_stride_3"] >= 60.0
    assert results["independent"] < 30.0
    assert results["left_only"] < 30.0


def test_receptive_field_of_the_codec(model):
    codec = model.codec
    reach = codec_receptive_field(codec)
    assert default_context_frames(codec) == 3
    # measured: changing one frame's codes changes the one-shot decode this far beyond the frame, both ways
    torch.manual_seed(0)
    frames = torch.randint(0, 64, (1, 16, 7))
    base = codec.decode(frames, noise=False)[0]
    changed = frames.clone()
    changed[0, 8] = (changed[0, 8] + 5) % 64
    diff = ((codec.decode(changed, noise=False)[0] - base).abs() > 0).nonzero().flatten()
    spf = codec.samples_per_frame
    measured = max(8 * spf - int(diff.min()), int(diff.max()) + 1 - 9 * spf)
    assert 2 * spf < measured <= reach < 3 * spf
    # the released 24 kHz codec has the same kernels, strides and dilations: the same reach
    from mini_omni2.modeling_mini_omni2 import MiniOmni2Codec
    from mini_omni2.token_layout import TokenLayout

    real = MiniOmni2Codec(SNAC_24KHZ, TokenLayout())
    assert codec_receptive_field(real) == reach
    assert default_context_frames(real) == 3


def test_first_chunk_as_soon_as_its_frames_exist(answer, model):
    inputs, out, _ = answer
    prompt_len = inputs["input_ids"].shape[-1]
    firsts = {}
    for mode in ("context", "independent"):
        streamer = MiniOmni2Streamer(chunk_mode=mode)
        puts = replay(out, prompt_len, streamer, model.layout, model.codec)
        first = next(i for i, e in enumerate(streamer.events) if e.audio is not None)
        firsts[mode] = puts[first]
    # frame k exists after step k + 8; 4 frames (+ 3 of lookahead) are needed
    assert firsts == {"independent": 4 + 7, "context": 4 + 3 + 7}


def test_special_ids_in_streamed_codes(answer, model):
    inputs, out, _ = answer
    prompt_len = inputs["input_ids"].shape[-1]
    layout = model.layout
    tokens = out.sequences[:1, :, prompt_len:].clone()
    tokens[0, 2, 9] = layout.layershift(layout.eoa, 2)  # frame 6 of layer 3
    tokens[0, 0, 1] = layout.layershift(layout.pad_a, 0)  # frame 0 of layer 1
    streamer = MiniOmni2Streamer()
    replay(out, prompt_len, streamer, layout, model.codec, tokens=tokens)
    frames = torch.cat([e.frames for e in streamer.events if e.request == 0 and e.frames is not None])
    expected, replaced = layout.sanitize_frames(layout.undelay(tokens[0, :7] - layout.stream_offsets()[:7, None]))
    assert replaced[6, 2] and replaced[0, 0] and int(replaced.sum()) == 2
    assert torch.equal(frames, expected)
    assert snr_db(model.codec.decode(expected[None], noise=False)[0], streamer.audio(0)) >= 30.0


def test_iterator_streamer_from_another_thread(model, processor):
    inputs = dict(processor(text=["hello world", "what is your name?"], output=["speech", "text"]))
    streamer = MiniOmni2IteratorStreamer(processor, timeout=60)
    result = {}

    def run():
        result["out"] = model.generate(**inputs, max_new_tokens=20, min_new_tokens=20, codec_noise=False,
                                       streamer=streamer)

    thread = threading.Thread(target=run)
    thread.start()
    events = list(streamer)
    thread.join()
    out = result["out"]
    texts = ["".join(e.text or "" for e in events if e.request == r) for r in range(2)]
    assert texts == [processor.decode(out.text_ids[r]) for r in range(2)]
    audio = torch.cat([e.audio for e in events if e.request == 0 and e.audio is not None])
    assert snr_db(out.waveforms[0], audio) >= 30.0
    assert sum(e.final for e in events) == 2


def test_iterator_streamer_raises_the_generate_error(model, processor):
    class Boom(LogitsProcessor):
        def __init__(self):
            self.calls = 0

        def __call__(self, input_ids, scores):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("boom")
            return scores

    inputs = dict(processor(text="hello world", output="speech"))
    streamer = MiniOmni2IteratorStreamer(timeout=60)
    thread = threading.Thread(
        target=lambda: pytest.raises(RuntimeError, model.generate, **inputs, streamer=streamer,
                                     logits_processor=[Boom()], max_new_tokens=10)
    )
    thread.start()
    with pytest.raises(RuntimeError, match="boom"):
        for _ in streamer:
            pass
    thread.join()


def test_streaming_with_codec_noise_and_without_codec(model, processor):
    inputs = dict(processor(text="hello world", output="speech"))
    noisy = MiniOmni2Streamer()
    out = model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, streamer=noisy)
    assert noisy.audio(0).shape == out.waveforms[0].shape and torch.isfinite(noisy.audio(0)).all()
    frames_only = MiniOmni2Streamer()
    out = model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, streamer=frames_only, decode_audio=False)
    chunks = [e for e in frames_only.events if e.frames is not None]
    assert torch.equal(torch.cat([e.frames for e in chunks]), out.audio_frames[0])
    assert all(e.audio is None for e in frames_only.events)  # decode_audio=False: codes only


def test_streamer_argument_checks():
    with pytest.raises(ValueError):
        MiniOmni2Streamer(stream_stride=0)
    with pytest.raises(ValueError):
        MiniOmni2Streamer(chunk_mode="overlap")
    with pytest.raises(ValueError):
        MiniOmni2Streamer(lookahead=-1)
    with pytest.raises(RuntimeError):
        MiniOmni2Streamer().put(torch.zeros(1, 8, dtype=torch.long))
