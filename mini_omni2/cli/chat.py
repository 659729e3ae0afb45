"""``mini-omni2 chat``: answer one spoken, written and/or visual prompt in text (printed) and speech (a wav file)."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from ..streaming_mini_omni2 import MiniOmni2Streamer, StreamEvent
from ..token_layout import OUTPUTS, OUTPUT_SPEECH
from .loading import (
    TINY_RANDOM,
    TINY_RANDOM_MAX_NEW_TOKENS,
    describe,
    load_model,
    load_processor,
    resolve_device,
    warn_tiny_random,
)

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def check_output_file(path: str) -> None:
    """Refuse, before any work, a wav path that cannot be written: a folder, a missing or unwritable folder, or an
    extension soundfile cannot write."""
    import soundfile

    if os.path.isdir(path):
        raise ValueError(f"--out {path!r} is a folder; give a file name such as {os.path.join(path, 'answer.wav')!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--out {path!r}: the folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"--out {path!r} is not writable")
    extension = os.path.splitext(path)[1].lstrip(".").upper()
    if extension not in soundfile.available_formats():
        writable = ", ".join(f".{f.lower()}" for f in ("WAV", "FLAC", "OGG") if f in soundfile.available_formats())
        raise ValueError(f"--out {path!r}: soundfile cannot write {extension or 'files without an extension'}; use {writable}")


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
        "--max-new-tokens", type=_positive_int, default=None,
        help="decoding steps at most (default 1024; 128 for tiny-random)",
    )
    parser.add_argument("--temperature", type=_positive_float, default=None, help="sampling temperature (release: 0.9)")
    parser.add_argument("--top-k", type=_non_negative_int, default=None, help="top-k (release: 1, i.e. greedy; 0 disables)")
    parser.add_argument("--top-p", type=_probability, default=None, help="top-p in (0, 1] (release: 1.0)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding")
    parser.add_argument("--seed", type=int, default=0, help="random seed (sampling and the codec's noise)")
    parser.add_argument("--no-batch-parallel", action="store_true", help="speech answers from a single row")
    parser.add_argument("--no-codec-noise", action="store_true", help="decode speech without SNAC's noise")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="model dtype (default auto: bfloat16 where the device computes it natively, else float32)",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the answer")
    return parser


class _PrintingStreamer(MiniOmni2Streamer):
    """Prints the text as it comes (the progress) and notes when the first audio chunk was ready."""

    def __init__(self, tokenizer, codec=None):
        super().__init__(tokenizer, codec=codec)
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
    """The chat command. Everything that can be checked before the model is loaded is checked first: the device,
    the wav path (speech answers), and the prompt (with the processor). Bad input raises ValueError/TypeError, which
    the ``mini-omni2`` command prints as one ``error:`` line."""
    if args.audio is None and args.text is None and args.image is None:
        raise ValueError("give at least one of --audio, --text, --image")
    wants_speech = args.output == OUTPUT_SPEECH
    device = resolve_device(args.device)
    if wants_speech:
        check_output_file(args.out)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    if args.model == TINY_RANDOM:
        warn_tiny_random(
            f" (and it stops after {TINY_RANDOM_MAX_NEW_TOKENS} steps unless --max-new-tokens says otherwise)"
        )
    processor = load_processor(args.model)  # a ModelLoadError (a ValueError) becomes one error line
    inputs = processor(text=args.text, audio=args.audio, images=args.image, output=args.output)
    log(f"loading {args.model} ...")
    model = load_model(args.model, device, args.dtype)
    log(describe(model))
    inputs = {k: v.to(device) for k, v in inputs.items()}
    if wants_speech and model.codec is None:
        raise ValueError("this model has no codec, it cannot speak; use --output text")

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
    # the streamed chunks are the answer's audio (each frame decoded once): no second decode at the end
    streamer = _PrintingStreamer(processor, codec=model.codec if wants_speech else None)
    started = time.perf_counter()
    out = model.generate(
        **inputs,
        streamer=streamer,
        batch_parallel=not args.no_batch_parallel,
        codec_noise=not args.no_codec_noise,
        decode_audio=False,
        share_twin_prefill=not args.no_batch_parallel,
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

        audio = streamer.audio(0).numpy()
        if audio.size == 0:
            log("the answer has no audio frames (it stopped before the first frame); nothing written")
            return 1
        sampling_rate = model.codec.sampling_rate
        soundfile.write(args.out, audio, sampling_rate)
        log(
            f"wrote {args.out}: {audio.size / sampling_rate:.2f} s at {sampling_rate} Hz"
            + (f", first audio chunk after {streamer.first_audio:.2f} s" if streamer.first_audio is not None else "")
        )
    return 0


__all__ = ["add_chat_arguments", "run_chat", "check_output_file", "TINY_RANDOM"]
