"""Benchmark of streamed SNAC decoding: frames/s of each chunk mode, and how close each stream is to one-shot.

Builds the SNAC 24 kHz codec (``SNAC_24KHZ``, the released architecture) with **random weights** in float32, as the
model keeps its codec, and streams answers of ``--frames`` random frames through :class:`MiniOmni2Streamer` exactly
as ``generate`` feeds it (one step at a time, the 7 audio layers delayed; no language model runs). Modes:

- ``stateful``: the default, each frame decoded once (the decoder's state kept per request);
- ``context``: each chunk of 4 re-decoded with 3 + 3 frames of context;
- ``independent``: the release's chunks, decoded alone;
- ``one-shot``: the whole answer decoded in one call at the end (no streaming; the reference).

Each mode runs for 1 request and for each ``--requests`` count R > 1 of concurrent requests in two ways: ``batched``
(one streamer holding the R requests, as one ``generate`` call: the streamer decodes requests that are due together
in one codec call) and ``sequential`` (R streamers of one request, stepped in turn: one codec call per request).
Reported per row: frames/s (all requests' frames / wall time), ms per frame, real-time factor (wall time / seconds of
audio of one request: one frame is 2,048 samples = 85.3 ms at 24 kHz; < 1 keeps up with real time), ms to the first
chunk, and the SNR of each stream against the one-shot decode of its frames (noise off, zero-mean reference; the
lowest over the requests). Timings are the median of ``--repeats`` runs after one untimed warm-up run.
Run ``python benchmarks/bench_codec.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

from mini_omni2.configuration_mini_omni2 import SNAC_24KHZ
from mini_omni2.modeling_mini_omni2 import MiniOmni2Codec
from mini_omni2.streaming_mini_omni2 import CHUNK_MODES, MiniOmni2Streamer, StreamStep
from mini_omni2.token_layout import OUTPUT_SPEECH, TokenLayout

ONE_SHOT = "one-shot"


def snr_db(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    """SNR of ``estimate`` against the zero-mean ``reference`` (a DC offset cannot inflate it)."""
    signal = float(((reference - reference.mean()) ** 2).sum())
    error = float(((reference - estimate) ** 2).sum())
    return math.inf if error == 0 else 10 * math.log10(signal / error)


def build_codec(device: torch.device, seed: int = 0) -> MiniOmni2Codec:
    torch.manual_seed(seed)
    return MiniOmni2Codec(SNAC_24KHZ, TokenLayout()).float().to(device).eval()


def answer_steps(layout: TokenLayout, frames: torch.Tensor) -> torch.Tensor:
    """The (steps, 8) global ids ``generate`` feeds back for a spoken answer of ``frames`` (the stopping step left
    out, as generate leaves it out)."""
    streams, _ = layout.delay_answer([], frames)
    return torch.tensor(streams)[:, :-1].t()


class _Clock:
    def __init__(self, device: torch.device):
        self.device = device
        self.start = 0.0
        self.first_chunk: float | None = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def begin(self) -> None:
        self.sync()
        self.start = time.perf_counter()
        self.first_chunk = None

    def elapsed(self) -> float:
        self.sync()
        return time.perf_counter() - self.start


class _TimedStreamer(MiniOmni2Streamer):
    """Keeps only what the benchmark needs: each request's audio chunks and when the first chunk came."""

    def __init__(self, clock: _Clock, chunk_mode: str):
        super().__init__(chunk_mode=chunk_mode, codec_noise=False)
        self.clock = clock

    def on_event(self, event):
        if event.audio is None:
            return
        if self.clock.first_chunk is None:
            self.clock.first_chunk = self.clock.elapsed()
        self.events.append(event)


def run_streamed(codec, answers: list[torch.Tensor], mode: str, batched: bool, clock: _Clock):
    """Stream every answer through the streamer(s); returns (wall seconds, audio per request)."""
    layout = codec.layout
    steps = [answer_steps(layout, frames) for frames in answers]
    groups = [list(range(len(answers)))] if batched else [[r] for r in range(len(answers))]
    streamers = [_TimedStreamer(clock, mode) for _ in groups]
    clock.begin()
    for streamer, members in zip(streamers, groups):
        streamer.begin(layout=layout, codec=codec, output_kinds=[OUTPUT_SPEECH] * len(members), codec_noise=False)
    for t in range(steps[0].shape[0]):
        for streamer, members in zip(streamers, groups):
            streamer.put(StreamStep(tokens=torch.stack([steps[r][t] for r in members])))
    for streamer in streamers:
        streamer.end()
    wall = clock.elapsed()
    audio = [None] * len(answers)
    for streamer, members in zip(streamers, groups):
        for index, r in enumerate(members):
            audio[r] = streamer.audio(index)
    return wall, audio


def run_one_shot(codec, answers: list[torch.Tensor], batched: bool, clock: _Clock):
    clock.begin()
    if batched:
        waves = list(codec.decode(torch.stack(answers), noise=False))
    else:
        waves = [codec.decode(frames[None], noise=False)[0] for frames in answers]
    wall = clock.elapsed()
    clock.first_chunk = wall
    return wall, [w.float().cpu() for w in waves]


def measure(codec, answers, references, mode: str, batched: bool, repeats: int, clock: _Clock) -> dict:
    walls, firsts, audio = [], [], None
    for _ in range(repeats + 1):  # the first run is the untimed warm-up
        if mode == ONE_SHOT:
            wall, audio = run_one_shot(codec, answers, batched, clock)
        else:
            wall, audio = run_streamed(codec, answers, mode, batched, clock)
        walls.append(wall)
        firsts.append(clock.first_chunk)
    wall, first = statistics.median(walls[1:]), statistics.median(firsts[1:])
    frames = sum(a.shape[0] for a in answers)
    seconds_per_request = answers[0].shape[0] * codec.samples_per_frame / codec.sampling_rate
    snrs = [snr_db(ref, got) for ref, got in zip(references, audio)]
    return {
        "mode": mode,
        "requests": len(answers),
        "calls": "batched" if batched else "sequential",
        "frames_per_s": frames / wall,
        "ms_per_frame": 1000 * wall / frames,
        "rtf": wall / seconds_per_request,
        "first_chunk_ms": 1000 * first,
        "snr_db": min(snrs),
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=48, help="frames per answer (48 = 4.1 s of audio)")
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 4], help="concurrent requests per row")
    parser.add_argument("--modes", nargs="+", default=[*CHUNK_MODES, ONE_SHOT], choices=[*CHUNK_MODES, ONE_SHOT])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (the median is reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.frames < 1 or args.repeats < 1 or min(args.requests) < 1:
        parser.error("--frames, --repeats and --requests must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    codec = build_codec(device, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    size = codec.layout.audio_codebook_size
    clock = _Clock(device)
    results = []
    for count in args.requests:
        answers = [torch.randint(0, size, (args.frames, 7), generator=generator) for _ in range(count)]
        references = [codec.decode(frames[None], noise=False)[0].float().cpu() for frames in answers]
        for mode in args.modes:
            for batched in ([True] if count == 1 else [True, False]):
                row = measure(codec, answers, references, mode, batched, args.repeats, clock)
                results.append(row)
                print(json.dumps(row), file=sys.stderr)

    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"\nmachine: {machine}; SNAC 24 kHz (random weights, float32); {args.frames} frames per answer; "
          f"torch {torch.__version__}; 1-min load average {load_before:.1f} before, {load_after:.1f} after\n")
    print("| mode | requests | calls | frames/s | ms per frame | RTF | first chunk ms | SNR vs one-shot dB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in results:
        snr = "exact" if math.isinf(r["snr_db"]) else f"{r['snr_db']:.1f}"
        print(f"| {r['mode']} | {r['requests']} | {r['calls']} | {r['frames_per_s']:.1f} | {r['ms_per_frame']:.1f} | "
              f"{r['rtf']:.3f} | {r['first_chunk_ms']:.0f} | {snr} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "frames": args.frames, "torch": torch.__version__,
                       "load_average": [load_before, load_after], "results": results}, f, indent=2,
                      default=lambda x: None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
