"""Stateful streaming SNAC decoding: every frame decoded once, the stream equal to the one-shot decode (noise off)."""

from __future__ import annotations

import math

import pytest
import torch

from mini_omni2.codec_streaming_mini_omni2 import CodecStreamingError, StreamingCodecDecoder
from mini_omni2.configuration_mini_omni2 import SNAC_24KHZ
from mini_omni2.modeling_mini_omni2 import MiniOmni2Codec
from mini_omni2.streaming_mini_omni2 import (
    MiniOmni2Streamer,
    StreamStep,
    codec_receptive_field,
    default_context_frames,
)
from mini_omni2.token_layout import TokenLayout

EXACT_DB = 90.0
PIECES = (1, 3, 4, 2, 1)  # 11 frames fed unevenly


def snr_db(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    """SNR of ``estimate`` against the zero-mean ``reference`` (a DC offset cannot inflate it)."""
    assert reference.shape == estimate.shape
    signal = ((reference - reference.mean()) ** 2).sum()
    error = ((reference - estimate) ** 2).sum().clamp(min=1e-30)
    return 10 * math.log10(float(signal / error))


@pytest.fixture(scope="module")
def snac_24khz():
    """The released SNAC 24 kHz architecture with random weights (float32, as the model keeps its codec)."""
    torch.manual_seed(0)
    return MiniOmni2Codec(SNAC_24KHZ, TokenLayout()).eval()


@pytest.fixture(params=["tiny", "snac_24khz"])
def codec(request, model, snac_24khz):
    return model.codec if request.param == "tiny" else snac_24khz


def random_frames(codec, count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, codec.layout.audio_codebook_size, (count, 7), generator=generator)


def answer_steps(layout: TokenLayout, frames: torch.Tensor) -> torch.Tensor:
    """The (steps, 8) global ids generate feeds back for a spoken answer of ``frames`` (the eoa step left out)."""
    streams, _ = layout.delay_answer([], frames)
    return torch.tensor(streams)[:, :-1].t()


def stream_answer(streamer: MiniOmni2Streamer, codec, frames_per_request: list[torch.Tensor], noise: bool = False):
    """Feed the answers step by step as generate does; returns the number of steps put when each event came."""
    layout = codec.layout
    steps = [answer_steps(layout, frames) for frames in frames_per_request]
    streamer.begin(layout=layout, codec=codec, output_kinds=["speech"] * len(steps), codec_noise=noise)
    put_of_event = []
    for t in range(steps[0].shape[0]):
        streamer.put(StreamStep(tokens=torch.stack([s[t] for s in steps])))
        put_of_event += [t + 1] * (len(streamer.events) - len(put_of_event))
    streamer.end()
    return put_of_event


def test_stream_in_uneven_pieces_equals_the_one_shot_decode(codec):
    frames = random_frames(codec, sum(PIECES))
    one_shot = codec.decode(frames[None], noise=False)[0]
    decoder = StreamingCodecDecoder(codec, noise=False)
    # the right-hand reach, from the modules: 4,757 samples, 3 frames, for the 24 kHz decoder and the tiny one
    assert decoder.delay_samples == codec_receptive_field(codec) == 4757
    assert decoder.lookahead_frames == default_context_frames(codec) == 3
    stream = decoder.stream()
    pieces, fed = [], 0
    for count in PIECES:
        pieces.append(stream.push(frames[fed : fed + count]))
        fed += count
        # exactly the samples no later frame can change come out
        assert stream.samples == max(fed * codec.samples_per_frame - decoder.delay_samples, 0)
        if stream.samples:
            assert snr_db(one_shot[: stream.samples], torch.cat(pieces)) >= EXACT_DB
    pieces.append(stream.flush())
    streamed = torch.cat(pieces)
    assert streamed.shape == one_shot.shape
    assert snr_db(one_shot, streamed) >= EXACT_DB


def test_lookahead_is_the_fewest_frames_that_make_a_chunk_exact(model):
    """Frame stop+2 still reaches into a chunk ending at frame stop, frame stop+3 does not: 3 frames of lookahead."""
    codec = model.codec
    spf = codec.samples_per_frame
    frames = random_frames(codec, 12)
    one_shot = codec.decode(frames[None], noise=False)[0]
    stop = 4
    lookahead = StreamingCodecDecoder(codec).lookahead_frames
    for later, reaches in ((stop + lookahead - 1, True), (stop + lookahead, False)):
        changed = frames.clone()
        changed[later] = (changed[later] + 7) % codec.layout.audio_codebook_size
        chunk = codec.decode(changed[None], noise=False)[0, : stop * spf]
        difference = float((chunk - one_shot[: stop * spf]).abs().max())
        assert difference > 1e-6 if reaches else difference < 1e-7  # the reach's far end is weak but not 0


def count_decoder_inputs(codec):
    """Forward hooks counting the samples (times the batch) that the decoder's Snake layers and the quantizer's
    output projections see."""
    from snac.layers import Snake1d

    snac = codec.snac
    modules = [m for m in snac.decoder.modules() if isinstance(m, Snake1d)]
    modules += [q.out_proj for q in snac.quantizer.quantizers]
    seen = {"samples": 0}

    def hook(module, args, output):
        seen["samples"] += args[0].shape[0] * args[0].shape[-1]

    handles = [m.register_forward_hook(hook) for m in modules]
    return seen, handles


def test_each_frame_goes_through_the_decoder_once(model):
    codec = model.codec
    frames = random_frames(codec, 24)
    counts = {}
    for name in ("one_shot", "decoder", "stateful", "context"):
        seen, handles = count_decoder_inputs(codec)
        try:
            if name == "one_shot":
                codec.decode(frames[None], noise=False)
            elif name == "decoder":
                stream = StreamingCodecDecoder(codec).stream()
                for k in range(0, 24, 5):
                    stream.push(frames[k : k + 5])
                stream.flush()
            else:
                stream_answer(MiniOmni2Streamer(chunk_mode=name), codec, [frames])
        finally:
            for handle in handles:
                handle.remove()
        counts[name] = seen["samples"]
    assert counts["decoder"] == counts["stateful"] == counts["one_shot"]
    # 3 + 4 + 3 frames decoded for each chunk of 4 in the middle
    assert counts["context"] > 2 * counts["one_shot"]


def test_default_streamer_is_stateful_frame_aligned_and_exact(snac_24khz):
    codec = snac_24khz
    frames = random_frames(codec, 12)
    one_shot = codec.decode(frames[None], noise=False)[0]
    streamer = MiniOmni2Streamer()
    assert streamer.chunk_mode == "stateful"
    puts = stream_answer(streamer, codec, [frames])
    chunks = [e for e in streamer.events if e.audio is not None]
    assert [e.frame_start for e in chunks] == [0, 4, 8]
    assert all(e.audio.shape == (4 * codec.samples_per_frame,) for e in chunks)
    assert torch.equal(torch.cat([e.frames for e in chunks]), frames)
    assert snr_db(one_shot, streamer.audio(0)) >= EXACT_DB
    # latency (docs/generation.md): frame k exists after step k + 8; a chunk of 4 frames waits for 3 more
    assert streamer.lookahead == 3 and streamer.left_context == 0
    first = next(i for i, e in enumerate(streamer.events) if e.audio is not None)
    assert puts[first] == 4 + 3 + 7 == 14


def test_several_requests_in_step_are_decoded_together_and_each_exact(model):
    codec = model.codec
    answers = [random_frames(codec, 10, seed) for seed in (1, 2)]
    streamer = MiniOmni2Streamer()
    stream_answer(streamer, codec, answers)
    for r, frames in enumerate(answers):
        chunks = [e for e in streamer.events if e.request == r and e.audio is not None]
        assert [e.frame_start for e in chunks] == [0, 4]  # the last chunk holds the 6 remaining frames
        assert snr_db(codec.decode(frames[None], noise=False)[0], streamer.audio(r)) >= EXACT_DB
    # a batched call equals one call per stream
    decoder = StreamingCodecDecoder(codec)
    together = [decoder.stream(), decoder.stream()]
    batched = decoder.push(together, torch.stack(answers))
    for r, frames in enumerate(answers):
        alone = decoder.stream().push(frames)
        assert batched[r].shape == alone.shape and snr_db(alone, batched[r]) >= EXACT_DB


@pytest.mark.parametrize("lookahead, starts", [(0, [0, 4, 8, 12]), (2, [0, 4, 8])])
def test_short_lookahead_sends_provisional_chunk_ends(model, lookahead, starts):
    """Below 3 frames of lookahead a chunk leaves earlier; its last samples are decoded as if the answer ended there,
    and the next chunk goes on from the exact state."""
    codec = model.codec
    spf = codec.samples_per_frame
    delay = StreamingCodecDecoder(codec).delay_samples
    frames = random_frames(codec, 13)
    one_shot = codec.decode(frames[None], noise=False)[0]
    streamer = MiniOmni2Streamer(lookahead=lookahead)
    puts = stream_answer(streamer, codec, [frames])
    chunks = [e for e in streamer.events if e.audio is not None]
    assert [e.frame_start for e in chunks] == starts  # the last chunk: the frames left at the end
    assert puts[next(i for i, e in enumerate(streamer.events) if e.audio is not None)] == 4 + lookahead + 7
    assert streamer.audio(0).shape == one_shot.shape
    if lookahead == 0:
        assert snr_db(one_shot, streamer.audio(0)) < 30.0  # provisional ends differ (a little, at 2 frames)
    for event in chunks:
        start, stop = event.frame_start * spf, event.frame_start * spf + event.audio.shape[0]
        final = stop if event is chunks[-1] else (event.frame_start + 4 + lookahead) * spf - delay
        assert snr_db(one_shot[start:final], event.audio[: final - start]) >= EXACT_DB  # what was final is exact


def test_stream_with_noise(model):
    codec = model.codec
    frames = random_frames(codec, 9)
    quiet = codec.decode(frames[None], noise=False)[0]
    stream = StreamingCodecDecoder(codec, noise=True).stream()
    noisy = torch.cat([stream.push(frames[:5]), stream.push(frames[5:]), stream.flush()])
    assert noisy.shape == quiet.shape and torch.isfinite(noisy).all()
    assert snr_db(quiet, noisy) < EXACT_DB  # SNAC's learned noise was added


def test_codecs_that_cannot_be_streamed_exactly_are_refused(model):
    from mini_omni2.tiny import tiny_config

    config = dict(tiny_config().codec_config, attn_window_size=4, decoder_dim=64)
    with_attention = MiniOmni2Codec(config, model.layout)
    with pytest.raises(CodecStreamingError, match="LocalMHA.*local attention.*chunk_mode='context'"):
        StreamingCodecDecoder(with_attention)
    streamer = MiniOmni2Streamer()
    with pytest.raises(ValueError, match="LocalMHA"):
        streamer.begin(layout=model.layout, codec=with_attention, output_kinds=["speech"], codec_noise=False)
    MiniOmni2Streamer(chunk_mode="context").begin(layout=model.layout, codec=with_attention, output_kinds=["speech"])
    with pytest.raises(TypeError, match="MiniOmni2Codec"):
        StreamingCodecDecoder(model.codec.snac)


def test_stream_argument_checks(model):
    codec = model.codec
    decoder = StreamingCodecDecoder(codec)
    stream = decoder.stream()
    with pytest.raises(ValueError, match="frames"):
        stream.push(torch.zeros(2, 3, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="codes only"):
        stream.push(torch.full((1, 7), codec.layout.audio_codebook_size))
    ahead = decoder.stream()
    ahead.push(random_frames(codec, 2))
    with pytest.raises(ValueError, match="same number of frames"):
        decoder.push([stream, ahead], random_frames(codec, 2)[None].expand(2, -1, -1))
    with pytest.raises(ValueError, match="belongs"):
        StreamingCodecDecoder(codec).push([stream], random_frames(codec, 1)[None])
    ahead.flush()
    with pytest.raises(ValueError, match="flushed"):
        ahead.push(random_frames(codec, 1))


def test_streaming_module_is_saved_with_the_remote_code(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "codec_streaming_mini_omni2.py").exists()


def test_streams_share_one_decoder_per_codec():
    """A server opens a stream per request: they share the codec's decoder (weights prepared once), which is rebuilt
    only when the codec's weights change."""
    from mini_omni2.tiny import tiny_model

    codec = tiny_model(seed=5).codec
    first = StreamingCodecDecoder.shared(codec, noise=False)
    assert StreamingCodecDecoder.shared(codec, noise=False) is first
    assert StreamingCodecDecoder.shared(codec, noise=True) is not first
    with torch.no_grad():
        next(codec.snac.decoder.parameters()).mul_(2.0)
    assert StreamingCodecDecoder.shared(codec, noise=False) is not first
