"""Benchmark of the server: 1, 2, 4 and 8 concurrent streaming clients, spoken questions answered in speech.

A model of the released sizes (``MiniOmni2Config()``, random weights, nothing downloaded; ``--tiny`` for the tiny
random model, to smoke-test the script) is served in this process by a real uvicorn server on loopback
(:class:`~mini_omni2.serving.background.BackgroundServer`); each client is the official ``openai`` SDK streaming
``POST /v1/chat/completions`` with a spoken question (``--question-seconds`` of noise, wav) and
``modalities=["text", "audio"]`` (pcm16). Every answer decodes exactly ``--steps`` steps (the ``min_tokens``
extension keeps random weights from stopping early). All clients of a round start together. Reported per round:

- first audio s: from sending the request to the first audio byte received (mean and worst client);
- audio s/s: seconds of audio received per second per client, from its first audio byte to its last (the mean and
  the slowest client; >= 1 keeps up with real-time playback);
- steps/s: aggregate decoding steps per second (all clients' steps / the round's wall time) and the engine's own
  steps per second (a step advances every row of the batch);
- late chunks: audio chunks that arrived after a player started at the first byte would have run dry (a gap);
- dropped chunks: audio expected from the answer's steps (``steps - 7`` frames of 2,048 samples) but not received.

Run ``python benchmarks/bench_serve.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import platform
import statistics
import sys
import threading
import time

import numpy as np
import soundfile
import torch

#: Samples of one codec frame at 24 kHz (SPEC §7) and the delay of the last audio layer (frames = steps - 7).
SAMPLES_PER_FRAME, AUDIO_RATE, NUM_AUDIO_LAYERS = 2048, 24000, 7


def build(tiny: bool, device: str, dtype: str):
    from mini_omni2 import MiniOmni2Config, MiniOmni2ForConditionalGeneration, MiniOmni2Processor
    from mini_omni2.modeling_mini_omni2 import resolve_dtype
    from mini_omni2.tiny import tiny_model, tiny_processor, tiny_tokenizer

    torch_dtype = resolve_dtype(dtype, device)
    if tiny:
        model, processor = tiny_model(), tiny_processor()
    else:
        config = MiniOmni2Config()  # the released sizes
        torch.manual_seed(0)
        model = MiniOmni2ForConditionalGeneration(config)
        processor = MiniOmni2Processor.from_config(config, tokenizer=tiny_tokenizer())
    model = model.to(torch_dtype)
    model.codec.float()  # the codec stays float32, as from_pretrained keeps it
    return model.to(device).eval(), processor


def question_wav(seconds: float) -> str:
    """A 'spoken' question: noise at 16 kHz, as a base64 wav (the model's weights are random anyway)."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    soundfile.write(buffer, (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32), 16000,
                    format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode()


def one_client(client, model_name: str, question: str, steps: int, start: threading.Barrier, out: dict) -> None:
    start.wait()
    sent = time.perf_counter()
    arrivals: list[tuple[float, int]] = []  # (time, samples) per audio chunk
    stream = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": [{"type": "input_audio",
                                                 "input_audio": {"data": question, "format": "wav"}}]}],
        modalities=["text", "audio"], audio={"voice": "alloy", "format": "pcm16"}, stream=True,
        max_completion_tokens=steps, extra_body={"min_tokens": steps}, temperature=0,
    )
    for chunk in stream:
        for choice in chunk.choices:
            audio = choice.delta.audio
            if audio is not None and audio.data:
                arrivals.append((time.perf_counter(), len(base64.b64decode(audio.data)) // 2))
    out.update(sent=sent, end=time.perf_counter(), arrivals=arrivals)


def late_chunks(arrivals: list[tuple[float, int]]) -> int:
    """Chunks that arrived after a player started at the first chunk had played everything before them."""
    if not arrivals:
        return 0
    start, played, late = arrivals[0][0], 0, 0
    for arrival, samples in arrivals:
        if arrival > start + played / AUDIO_RATE + 1e-3:
            late += 1
            start = arrival - played / AUDIO_RATE  # the player waits (a gap), then goes on
        played += samples
    return late


def run_round(server, state, client, model_name: str, clients: int, question: str, steps: int) -> dict:
    barrier = threading.Barrier(clients)
    results = [{} for _ in range(clients)]
    threads = [threading.Thread(target=one_client, args=(client, model_name, question, steps, barrier, r))
               for r in results]
    engine_steps = state.worker.steps
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    engine_steps = state.worker.steps - engine_steps
    first, rates, late, dropped = [], [], 0, 0
    expected = max(steps - NUM_AUDIO_LAYERS, 0) * SAMPLES_PER_FRAME
    for r in results:
        arrivals = r["arrivals"]
        received = sum(samples for _, samples in arrivals)
        first.append(arrivals[0][0] - r["sent"] if arrivals else float("nan"))
        span = arrivals[-1][0] - arrivals[0][0] if len(arrivals) > 1 else float("nan")
        rates.append(received / AUDIO_RATE / span if span == span and span > 0 else float("nan"))
        late += late_chunks(arrivals)
        dropped += max(0, -(-(expected - received) // (SAMPLES_PER_FRAME * 4)))  # in chunks of 4 frames
    return {
        "clients": clients,
        "first_audio_mean_s": statistics.fmean(first),
        "first_audio_max_s": max(first),
        "audio_s_per_s_mean": statistics.fmean(rates),
        "audio_s_per_s_min": min(rates),
        "aggregate_steps_per_s": clients * steps / wall,
        "engine_steps_per_s": engine_steps / wall,
        "late_chunks": late,
        "dropped_chunks": dropped,
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,2,4,8", help="concurrent clients per round (default 1,2,4,8)")
    parser.add_argument("--steps", type=int, default=64, help="decoding steps of every answer (default 64)")
    parser.add_argument("--question-seconds", type=float, default=3.0, help="length of the spoken question (3 s)")
    parser.add_argument("--tiny", "--model-tiny-random", action="store_true",
                        help="the tiny random model instead of the released sizes (smoke test)")
    parser.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default torch's)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    import openai

    from mini_omni2.serving.app import create_app
    from mini_omni2.serving.background import BackgroundServer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    counts = [int(c) for c in args.clients.split(",")]
    if args.steps <= NUM_AUDIO_LAYERS:
        parser.error(f"--steps must be more than {NUM_AUDIO_LAYERS} (the audio layers' delay) to produce audio")
    model, processor = build(args.tiny, device, args.dtype)
    param = next(model.parameters())
    size = "tiny random" if args.tiny else "released sizes, random weights"
    print(f"built the model ({size}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters) on "
          f"{param.device} in {str(param.dtype).replace('torch.', '')}", file=sys.stderr)
    name = "bench"
    app = create_app(model, processor, name, max_batch_rows=2 * max(counts), max_queue=max(counts),
                     random_weights=True)
    question = question_wav(args.question_seconds)
    if device.startswith("cuda"):
        machine = torch.cuda.get_device_name(torch.device(device))
    else:
        machine = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    results = []
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=3600)
        state = app.state.server
        run_round(server, state, client, name, 1, question, NUM_AUDIO_LAYERS + 4)  # warm-up
        for clients in counts:
            results.append(run_round(server, state, client, name, clients, question, args.steps))
            r = results[-1]
            print(f"{clients} clients: first audio {r['first_audio_mean_s']:.2f} s, {r['audio_s_per_s_mean']:.2f} "
                  f"audio s/s, {r['aggregate_steps_per_s']:.1f} steps/s", file=sys.stderr)
    print(f"\nmachine: {machine}; dtype {str(param.dtype).replace('torch.', '')}; {size}; {args.steps} steps; "
          f"question {args.question_seconds:g} s; torch {torch.__version__}\n")
    print("| clients | first audio s (mean / max) | audio s/s per client (mean / min) | aggregate steps/s "
          "| engine steps/s | late chunks | dropped chunks |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['clients']} | {r['first_audio_mean_s']:.2f} / {r['first_audio_max_s']:.2f} "
              f"| {r['audio_s_per_s_mean']:.2f} / {r['audio_s_per_s_min']:.2f} | {r['aggregate_steps_per_s']:.1f} "
              f"| {r['engine_steps_per_s']:.1f} | {r['late_chunks']} | {r['dropped_chunks']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "dtype": str(param.dtype), "steps": args.steps, "model": size,
                       "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
