"""``mini-omni2 chat``: answer one spoken, written and/or visual prompt in text (printed) and speech (a wav file)."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from ..streaming_mini_omni2 import MiniOmni2Streamer, StreamEvent
from ..token_layout import OUTPUTS, OUTPUT_SPEECH

TINY_RANDOM = "tiny-random"
TINY_RANDOM_MAX_NEW_TOKENS = 128


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


def resolve_device(name: str | None) -> torch.device:
    """The torch device of ``--device`` (default: cuda if available, else cpu), refused if this torch cannot use it."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a torch device ({error})") from None
    if device.type == "cpu":
        return device
    backends = {
        "cuda": (torch.cuda.is_available, torch.cuda.device_count),
        "mps": (torch.backends.mps.is_available, lambda: 1),
        "xpu": (lambda: hasattr(torch, "xpu") and torch.xpu.is_available(), lambda: torch.xpu.device_count()),
    }
    if device.type not in backends:
        raise ValueError(f"--device {name!r}: use cpu, cuda, cuda:N, mps or xpu")
    available, count = backends[device.type]
    if not available():
        raise ValueError(
            f"--device {name!r}: this torch ({torch.__version__}) cannot use {device.type} here; use --device cpu"
        )
    if device.index is not None and device.index >= count():
        raise ValueError(f"--device {name!r}: there are only {count()} {device.type} devices")
    return device


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


def load_processor(model_id: str):
    """The processor: the tiny one for ``tiny-random``, else ``from_pretrained`` (cheap: loaded first, to check the
    prompt before the model)."""
    if model_id == TINY_RANDOM:
        from ..tiny import tiny_processor

        return tiny_processor()
    from ..processing_mini_omni2 import MiniOmni2Processor

    return MiniOmni2Processor.from_pretrained(model_id)


def load_model(model_id: str, device: str | torch.device | None = None, dtype: str | None = None):
    """The model on ``device`` in eval mode: the random tiny one for ``tiny-random``, else ``from_pretrained``."""
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    if model_id == TINY_RANDOM:
        from ..tiny import tiny_model

        model = tiny_model()
        if dtype:
            model = model.to(getattr(torch, dtype))
    else:
        from ..modeling_mini_omni2 import MiniOmni2ForConditionalGeneration

        kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
        model = MiniOmni2ForConditionalGeneration.from_pretrained(model_id, **kwargs)
    return model.to(device).eval()


def load(model_id: str, device: str | None = None, dtype: str | None = None):
    """Model and processor: the random tiny ones for ``tiny-random``, else ``from_pretrained``."""
    return load_model(model_id, device, dtype), load_processor(model_id)


def _cannot_load(model_id: str, error: Exception) -> int:
    print(f"error: cannot load {model_id!r}: {error}", file=sys.stderr)
    if os.path.isfile(os.path.join(model_id, "lit_model.pth")):
        print(
            f"hint: {model_id} is an original release; convert it first: "
            f"mini-omni2 convert --source {model_id} --output {model_id.rstrip('/')}-hf",
            file=sys.stderr,
        )
    return 2


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
        print(
            "WARNING: --model tiny-random is a tiny model with RANDOM weights: it runs offline, but its answer is "
            f"noise (and it stops after {TINY_RANDOM_MAX_NEW_TOKENS} steps unless --max-new-tokens says otherwise).",
            file=sys.stderr,
            flush=True,
        )
    try:
        processor = load_processor(args.model)
    except (OSError, ValueError) as error:
        return _cannot_load(args.model, error)
    inputs = processor(text=args.text, audio=args.audio, images=args.image, output=args.output)
    log(f"loading {args.model} ...")
    try:
        model = load_model(args.model, device, args.dtype)
    except (OSError, ValueError) as error:
        return _cannot_load(args.model, error)
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


__all__ = [
    "add_chat_arguments",
    "run_chat",
    "load",
    "load_model",
    "load_processor",
    "resolve_device",
    "check_output_file",
    "TINY_RANDOM",
]
