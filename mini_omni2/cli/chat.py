"""``mini-omni2 chat``: answer one spoken, written and/or visual prompt in text (printed) and speech (a wav file)."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from ..streaming_mini_omni2 import MiniOmni2Streamer, StreamEvent
from .loading import TINY_RANDOM, TINY_RANDOM_MAX_NEW_TOKENS, ModelLoadError, load, warn_tiny_random
from ..token_layout import OUTPUTS, OUTPUT_SPEECH



def add_chat_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = "Answer a prompt (speech, text and/or an image) in text and speech."
    parser.add_argument(
        "--model",
        required=True,
        help=f"Hub id or folder of a converted model, or {TINY_RANDOM!r} (a tiny model with random weights, offline)",
    )
    parser.add_argument("--audio", default=None, help="spoken prompt: an audio file (any rate, resampled to 16 kHz)")
    parser.add_argument("--image", default=None, help="an image file (Mini-Omni2 only)")
    parser.add_argument("--text", default=None, help="written prompt")
    parser.add_argument("--output", default=OUTPUT_SPEECH, choices=list(OUTPUTS), help="answer kind (default speech)")
    parser.add_argument("--out", default="answer.wav", help="wav file for a spoken answer (default answer.wav)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="decoding steps at most (default 1024; 128 for tiny-random)"
    )
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (release: 0.9)")
    parser.add_argument("--top-k", type=int, default=None, help="top-k (release: 1, i.e. greedy; 0 disables)")
    parser.add_argument("--top-p", type=float, default=None, help="top-p (release: 1.0)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding")
    parser.add_argument("--seed", type=int, default=0, help="random seed (sampling and the codec's noise)")
    parser.add_argument("--no-batch-parallel", action="store_true", help="speech answers from a single row")
    parser.add_argument("--no-codec-noise", action="store_true", help="decode speech without SNAC's noise")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model dtype")
    parser.add_argument("--quiet", action="store_true", help="print only the answer")
    return parser


class _PrintingStreamer(MiniOmni2Streamer):
    """Prints the text as it comes (the progress) and notes when the first audio chunk was ready."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.audio_seconds = 0.0
        self.started = time.perf_counter()
        self.first_audio = None

    def on_event(self, event: StreamEvent) -> None:
        super().on_event(event)
        if event.text:
            print(event.text, end="", flush=True)
        if event.audio is not None and event.sampling_rate:
            if self.first_audio is None:
                self.first_audio = time.perf_counter() - self.started
            self.audio_seconds += event.audio.numel() / event.sampling_rate


def run_chat(args: argparse.Namespace) -> int:
    if args.audio is None and args.text is None and args.image is None:
        print("error: give at least one of --audio, --text, --image", file=sys.stderr)
        return 2
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    if args.model == TINY_RANDOM:
        warn_tiny_random(
            f" (and it stops after {TINY_RANDOM_MAX_NEW_TOKENS} steps unless --max-new-tokens says otherwise)"
        )
    log(f"loading {args.model} ...")
    try:
        model, processor = load(args.model, args.device, args.dtype)
    except ModelLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    device = next(model.parameters()).device
    try:
        inputs = processor(text=args.text, audio=args.audio, images=args.image, output=args.output)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    inputs = {k: v.to(device) for k, v in inputs.items()}
    wants_speech = args.output == OUTPUT_SPEECH
    if wants_speech and model.codec is None:
        print("error: this model has no codec, it cannot speak; use --output text", file=sys.stderr)
        return 2

    gen_kwargs = {}
    if args.max_new_tokens is not None:
        gen_kwargs["max_new_tokens"] = args.max_new_tokens
    elif args.model == TINY_RANDOM:
        gen_kwargs["max_new_tokens"] = TINY_RANDOM_MAX_NEW_TOKENS  # random weights rarely stop on their own
    if args.greedy:
        gen_kwargs["do_sample"] = False
    for name in ("temperature", "top_k", "top_p"):
        if getattr(args, name) is not None:
            gen_kwargs[name] = getattr(args, name)
    torch.manual_seed(args.seed)
    streamer = _PrintingStreamer(processor)
    started = time.perf_counter()
    out = model.generate(
        **inputs,
        streamer=streamer,
        batch_parallel=not args.no_batch_parallel,
        codec_noise=not args.no_codec_noise,
        **gen_kwargs,
    )
    elapsed = time.perf_counter() - started
    print()  # end of the streamed text line
    text = processor.decode(out.text_ids[0])
    steps = int(out.generated_lengths[0])
    rate = steps / max(elapsed, 1e-9)
    log(f"[{steps} steps in {elapsed:.2f} s, {rate:.1f} steps/s, stopped by {out.finish_reasons[0]}]")
    if not streamer.text(0) and text:
        print(text)
    if wants_speech:
        import soundfile

        wave = out.waveforms[0]
        audio = wave.detach().cpu().float().numpy() if wave is not None else None
        if audio is None or audio.size == 0:
            log("the answer has no audio frames (it stopped before the first frame); nothing written")
            return 1
        soundfile.write(args.out, audio, out.sampling_rate)
        log(
            f"wrote {args.out}: {audio.size / out.sampling_rate:.2f} s at {out.sampling_rate} Hz"
            + (f", first audio chunk after {streamer.first_audio:.2f} s" if streamer.first_audio is not None else "")
        )
    return 0


__all__ = ["add_chat_arguments", "run_chat", "load", "TINY_RANDOM"]
