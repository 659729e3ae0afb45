"""Benchmark of ``generate`` at the released sizes (random weights, nothing downloaded).

For each batch size (requests), every request is a spoken question of ~150 Whisper frames answered in speech with
batch parallel decoding (2 rows per request). Reported:

- prefill s: from the ``generate`` call to the first step's tokens (Whisper + CLIP-free prefill of all rows);
- decode steps/s: decoding steps per second after the first, with the time spent decoding streamed audio chunks
  taken out (the model's and generate's own work); "with audio" keeps it in (mean over the steps);
- forward-only steps/s: a bare loop of ``model(...)`` calls of the same shapes (rows, cache length), no sampling,
  no bookkeeping, run before and after generate and averaged: the ceiling for generate (target: >= 95 % of it). On CUDA both are means over the steps
  (the forward loop syncs once at the end); on CPU both are the median step, which resists the bursts of other
  processes on a shared machine;
- first audio s: from the call to the first streamed audio chunk (4 frames, + 3 frames of lookahead, SNAC decoded);
- RTF: wall time of the whole call / seconds of speech of one request (< 1 is faster than real time);
- peak memory: CUDA peak allocated, or the process's peak RSS on CPU (monotonic over the run).

- codec share: the part of the decoding wall time spent decoding the streamed audio (SNAC).

Every request decodes exactly ``--steps`` steps (``min_new_tokens`` bans the stop tokens; random weights would stop
anywhere). ``--dtype auto`` (the default) is bfloat16 where the hardware computes it natively, else float32;
``--int8`` adds torchao int8 weight-only layers to the language model and its head; ``--compile`` compiles the
decoding step (static cache). ``--agreement N`` instead measures how far greedy decoding in bfloat16 (and int8) stays
from float32 over N steps. Run ``python benchmarks/bench_generate.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import numpy as np
import torch

from mini_omni2 import MiniOmni2Config, MiniOmni2ForConditionalGeneration, MiniOmni2Processor
from mini_omni2.modeling_mini_omni2 import resolve_dtype
from mini_omni2.processing_mini_omni2 import SAMPLES_PER_FRAME, SAMPLING_RATE
from mini_omni2.streaming_mini_omni2 import MiniOmni2Streamer
from mini_omni2.tiny import tiny_tokenizer


class TimingStreamer(MiniOmni2Streamer):
    """Streams audio like an application would and records when each step and the first chunk arrived."""

    def __init__(self, codec, device: torch.device, start: float):
        super().__init__(codec=codec)
        self.device = device
        self.start = start
        self.step_times: list[float] = []
        self.first_audio: float | None = None
        self.codec_seconds = 0.0
        self.codec_before: list[float] = []  # codec time spent before each step's timestamp

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def put(self, value):
        self._sync()
        self.step_times.append(time.perf_counter())
        self.codec_before.append(self.codec_seconds)
        began = time.perf_counter()
        super().put(value)
        self._sync()
        if len(self.events) and any(e.audio is not None for e in self.events):
            self.codec_seconds += time.perf_counter() - began
        self.events.clear()

    def on_event(self, event):
        super().on_event(event)
        if event.audio is not None and self.first_audio is None:
            self._sync()
            self.first_audio = time.perf_counter() - self.start


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kib / 2**20


def build(device: torch.device, dtype: torch.dtype, int8: bool = False):
    config = MiniOmni2Config()  # the released sizes
    torch.manual_seed(0)
    model = MiniOmni2ForConditionalGeneration(config).to(dtype=dtype)
    model.codec.float()  # the codec stays float32, as from_pretrained keeps it
    model = model.to(device).eval()
    if int8:
        model.quantize_int8()
    processor = MiniOmni2Processor.from_config(config, tokenizer=tiny_tokenizer())
    return model, processor


def memory_bandwidth_gbps(device: torch.device, megabytes: int = 512) -> float:
    """Read bandwidth: GB/s of summing a tensor much larger than the caches (the median of 7 runs)."""
    x = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    times = []
    for _ in range(8):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        x.sum()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    return x.numel() * 4 / statistics.median(times[1:]) / 1e9


def weight_bytes_per_step(model) -> int:
    """Bytes of weights a decoding step reads while the text runs: the language model's layers and the whole head
    (the speech row's audio slices plus its twin's text slice); the embedding reads 8 rows per row, nothing."""
    layers = model.model.language_model.layers
    tensors = list(layers.parameters()) + [model.lm_head.weight]
    return int(sum(stored_bytes(t) for t in tensors))


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor stores: for a quantized tensor subclass (torchao's int8), those of its inner tensors."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def make_inputs(processor, batch: int, frames: int, device: torch.device, dtype: torch.dtype):
    rng = np.random.default_rng(0)
    samples = (frames - 1) * SAMPLES_PER_FRAME  # L = samples // 320 + 1 frames (SPEC §5)
    audio = [(0.1 * rng.standard_normal(samples)).astype(np.float32) for _ in range(batch)]
    inputs = processor(audio=[(a, SAMPLING_RATE) for a in audio], output=["speech"] * batch)
    inputs.pop("request_index")
    out = {k: v.to(device) for k, v in inputs.items()}
    out["input_features"] = out["input_features"].to(dtype)
    return out


@torch.no_grad()
def forward_only(model, rows: int, prompt_len: int, steps: int, device: torch.device, dtype: torch.dtype) -> float:
    """Steps/s of bare decoding forwards with a cache of the prompt's length (filled with random keys/values)."""
    from transformers.cache_utils import DynamicCache

    text = model.config.text_config
    cache = DynamicCache(config=text)
    shape = (rows, text.num_key_value_heads, prompt_len, text.head_dim)
    for layer in range(text.num_hidden_layers):
        keys = torch.randn(shape, device=device, dtype=dtype)
        cache.update(keys, torch.randn_like(keys), layer)
    layout = model.layout
    ids = (layout.stream_offsets(device) + torch.tensor([layout.pad_a] * 7 + [layout.pad_t], device=device))
    ids = ids[None, :, None].expand(rows, -1, 1).contiguous()
    mask = torch.ones(rows, prompt_len + steps + 1, dtype=torch.long, device=device)
    position = torch.full((rows, 1), prompt_len, dtype=torch.long, device=device)

    speech_rows = torch.arange(0, rows, 2, device=device)  # as the engine asks: audio of the speech rows,
    twin_rows = torch.arange(1, rows, 2, device=device)  # text of their twins (the sliced head)

    def step(t):
        return model(input_ids=ids, attention_mask=mask[:, : prompt_len + t + 1], position_ids=position + t,
                     past_key_values=cache, use_cache=True, logits_to_keep=1, text_logits_rows=twin_rows,
                     audio_logits_rows=speech_rows)

    step(0)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        began = time.perf_counter()
        for t in range(1, steps):
            step(t)
        torch.cuda.synchronize(device)  # one sync at the end: the GPU's own pace
        return (steps - 1) / (time.perf_counter() - began)
    intervals = []
    for t in range(1, steps):
        began = time.perf_counter()
        step(t)
        intervals.append(time.perf_counter() - began)
    return 1.0 / statistics.median(intervals)


def run_generate(model, inputs, steps: int, device: torch.device, compile_decode: bool = False):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    streamer = TimingStreamer(model.codec, device, start)
    options = dict(compile_decode=True) if compile_decode else dict(share_twin_prefill=True)
    out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, streamer=streamer, decode_audio=False,
                         **options)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    times = streamer.step_times
    decode_wall = times[-1] - times[0]
    codec = streamer.codec_before[-1] - streamer.codec_before[0]
    # per-step intervals without the streamed-audio decoding; the median resists other processes' bursts on a CPU
    intervals = [
        (times[i + 1] - times[i]) - (streamer.codec_before[i + 1] - streamer.codec_before[i])
        for i in range(len(times) - 1)
    ]
    if device.type == "cuda":
        lm_rate = (len(times) - 1) / max(decode_wall - codec, 1e-9)
    else:
        lm_rate = 1.0 / statistics.median(intervals)
    frames = out.audio_frames[0].shape[0]
    speech_seconds = frames * model.codec.samples_per_frame / model.codec.sampling_rate
    return {
        "prefill_s": times[0] - start,
        "decode_steps_per_s": lm_rate,
        "decode_steps_per_s_with_audio": (len(times) - 1) / max(decode_wall, 1e-9),
        "codec_share": codec / max(decode_wall, 1e-9),
        "first_audio_s": streamer.first_audio,
        "rtf": wall / speech_seconds if speech_seconds else float("nan"),
        "wall_s": wall,
        "peak_gib": peak_memory_gib(device),
        "steps": int(out.generated_lengths[0]),
    }


@torch.no_grad()
def agreement(steps: int, audio_frames: int, int8: bool) -> list[dict]:
    """How far greedy decoding in bfloat16 (and int8) stays from float32, same random weights, one spoken question.

    free-running: both decode on their own; the first step where any of the 8 tokens differs, and the share of equal
    tokens over all steps (text stream, audio streams). teacher-forced: the other dtype is fed float32's tokens and
    its greedy choice compared at every step (per-step agreement, without the drift that one early difference
    causes in free-running decoding).
    """
    device = torch.device("cpu")
    reference, processor = build(device, torch.float32)
    inputs = make_inputs(processor, 1, audio_frames, device, torch.float32)
    kwargs = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, decode_audio=False)
    base = reference.generate(**inputs, **kwargs)
    prompt_len = inputs["input_ids"].shape[-1]
    fed = base.sequences[:, :, prompt_len:]
    rows = []
    variants = [("bfloat16", False)] + ([("bfloat16 + int8", True)] if int8 else [])
    for name, quantize in variants:
        model, _ = build(device, torch.bfloat16, int8=quantize)
        bf_inputs = dict(inputs, input_features=inputs["input_features"].to(torch.bfloat16))
        other = model.generate(**bf_inputs, **kwargs).sequences[:, :, prompt_len:]
        differs = (other != fed).any(1)[0]
        first = int(differs.nonzero()[0, 0]) if bool(differs.any()) else steps
        forced = teacher_forced(model, bf_inputs, fed, reference)
        rows.append({
            "variant": name, "steps": steps,
            "first_difference_step": first,
            "free_text_equal": float((other[0, 7] == fed[0, 7]).float().mean()),
            "free_audio_equal": float((other[0, :7] == fed[0, :7]).float().mean()),
            "forced_text_equal": forced[0], "forced_audio_equal": forced[1],
            "logit_relative_error": forced[2], "reference_top2_margin": forced[3],
        })
        del model
    return rows


def teacher_forced(model, inputs, fed: torch.Tensor, reference) -> tuple[float, float, float, float]:
    """Feed float32's answer (one request, its twin built as generate does) to ``model`` and compare each step's
    greedy tokens; also the relative error of its logits against float32's (``reference``) on the same inputs, and
    float32's median gap between its best and second-best text logit (random weights leave near ties, which a
    small error flips)."""
    layout = model.layout
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    twin = ids.clone()
    twin[:, : layout.num_audio_layers, -1] = layout.pad_ids()[: layout.num_audio_layers, None].T
    answer = fed[0]
    twin_answer = answer.clone()
    twin_answer[: layout.num_audio_layers] = layout.pad_ids()[: layout.num_audio_layers, None]
    rows = torch.cat([torch.cat([ids, answer[None]], dim=-1), torch.cat([twin, twin_answer[None]], dim=-1)])
    full_mask = torch.ones(2, rows.shape[-1], dtype=torch.long)
    features = inputs["input_features"].repeat(2, 1, 1)
    audio_mask = torch.cat([inputs["audio_feature_mask"]] * 2)
    audio_mask = torch.cat([audio_mask, torch.zeros(2, answer.shape[-1], dtype=torch.bool)], dim=-1)
    out = model(input_ids=rows, attention_mask=full_mask, input_features=features, audio_feature_mask=audio_mask)
    exact = reference(input_ids=rows, attention_mask=full_mask, input_features=features.float(),
                      audio_feature_mask=audio_mask)
    start = ids.shape[-1] - 1
    ours, theirs = out.logits[:, start:-1].float(), exact.logits[:, start:-1].float()
    relative = float((ours - theirs).norm() / theirs.norm())
    top2 = exact.text_logits[1, start:-1].float().topk(2, dim=-1).values
    margin = float((top2[:, 0] - top2[:, 1]).median())
    text = out.text_logits[1, start:-1].argmax(-1)
    audio = out.audio_logits[0, :, start:-1].argmax(-1) + layout.stream_offsets()[: layout.num_audio_layers, None]
    text_target = answer[layout.text_stream]
    keep = text_target != layout.pad_t  # after eot the text is forced, not predicted
    text_equal = float((text == text_target)[keep].float().mean()) if bool(keep.any()) else float("nan")
    return text_equal, float((audio == answer[: layout.num_audio_layers]).float().mean()), relative, margin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="model dtype (auto: bfloat16 where the hardware computes it natively, else float32); "
                             "the codec stays float32")
    parser.add_argument("--int8", action="store_true", help="torchao int8 weight-only language model and head")
    parser.add_argument("--compile", action="store_true", help="compile the decoding step (static cache)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="requests per call")
    parser.add_argument("--steps", type=int, default=None, help="decoding steps per call (default 256 CUDA, 24 CPU)")
    parser.add_argument("--audio-frames", type=int, default=150, help="Whisper frames of each spoken prompt")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed generate calls first (batch 1, 16 steps; with --compile each batch size and "
                             "--steps, so that the timed calls run compiled graphs)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--agreement", type=int, default=None, metavar="STEPS",
                        help="measure bfloat16 (and with --int8, int8) greedy agreement with float32 instead")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if args.agreement:
        rows = agreement(args.agreement, args.audio_frames, args.int8)
        print("| variant | steps | first differing step | free-running text equal | free-running audio equal "
              "| teacher-forced text equal | teacher-forced audio equal | logit relative error "
              "| float32 top-2 text margin |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['variant']} | {r['steps']} | {r['first_difference_step']} | {100 * r['free_text_equal']:.1f} % "
                  f"| {100 * r['free_audio_equal']:.1f} % | {100 * r['forced_text_equal']:.1f} % "
                  f"| {100 * r['forced_audio_equal']:.1f} % | {100 * r['logit_relative_error']:.2f} % "
                  f"| {r['reference_top2_margin']:.4f} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
        return 0

    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    steps = args.steps or (256 if device.type == "cuda" else 24)
    if steps < 15:
        print("note: fewer than 15 steps: the first audio chunk only comes when the answer ends", file=sys.stderr)

    began = time.perf_counter()
    model, processor = build(device, dtype, int8=args.int8)
    print(f"built the released sizes ({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters, random) "
          f"in {time.perf_counter() - began:.1f} s; dtype {dtype}{' + int8' if args.int8 else ''}", file=sys.stderr)
    for _ in range(args.warmup):  # compiled: the timed calls' own shapes (a static cache of another length recompiles)
        for batch in args.batch_sizes if args.compile else [1]:
            warm_inputs = make_inputs(processor, batch, args.audio_frames, device, dtype)
            run_generate(model, warm_inputs, steps if args.compile else 16, device, args.compile)

    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    results = []
    for batch in args.batch_sizes:
        inputs = make_inputs(processor, batch, args.audio_frames, device, dtype)
        prompt_len = inputs["input_ids"].shape[-1]
        # the forward-only loop runs before and after generate, and the two are averaged: a drift of the machine's
        # speed (other processes, clocks) then biases neither side
        fwd_before = forward_only(model, 2 * batch, prompt_len, steps, device, dtype)
        gen = run_generate(model, inputs, steps, device, args.compile)
        fwd = 0.5 * (fwd_before + forward_only(model, 2 * batch, prompt_len, steps, device, dtype))
        row = {"batch": batch, "rows": 2 * batch, "prompt_len": prompt_len, **gen, "forward_only_steps_per_s": fwd,
               "generate_vs_forward": gen["decode_steps_per_s"] / fwd}
        results.append(row)
        print(json.dumps(row), file=sys.stderr)

    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    bandwidth = memory_bandwidth_gbps(device)
    step_bytes = weight_bytes_per_step(model)
    print(f"\nmemory bandwidth {bandwidth:.1f} GB/s (read); weights read per step {step_bytes / 1e9:.2f} GB: a "
          f"bandwidth-bound step cannot exceed {bandwidth * 1e9 / step_bytes:.1f} steps/s")
    variant = str(dtype).replace("torch.", "") + (" + int8" if args.int8 else "") + (" + compile" if args.compile else "")
    print(f"\nmachine: {machine}; {variant}; {steps} steps; prompt {args.audio_frames} audio frames; "
          f"torch {torch.__version__}; 1-min load average {load_before:.1f} before, {load_after:.1f} after\n")
    print("| requests | rows | prefill s | decode steps/s | with audio | codec share | forward-only steps/s "
          "| generate / forward | first audio s | RTF | peak memory GiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        first = f"{r['first_audio_s']:.2f}" if r["first_audio_s"] is not None else "-"
        print(f"| {r['batch']} | {r['rows']} | {r['prefill_s']:.2f} | {r['decode_steps_per_s']:.2f} | "
              f"{r['decode_steps_per_s_with_audio']:.2f} | {100 * r['codec_share']:.0f} % | "
              f"{r['forward_only_steps_per_s']:.2f} | {100 * r['generate_vs_forward']:.1f} % | {first} | "
              f"{r['rtf']:.2f} | {r['peak_gib']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "variant": variant, "steps": steps, "bandwidth_gbps": bandwidth,
                       "weight_bytes_per_step": step_bytes, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
