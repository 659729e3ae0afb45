"""``mini-omni2 serve``: the OpenAI-compatible voice server (chat completions, transcriptions, realtime, a web page)."""

from __future__ import annotations

import argparse
import sys

from ..engine_mini_omni2 import LISTEN_CATCH_UP_FRAMES, check_catch_up_frames
from .loading import TINY_RANDOM, TINY_RANDOM_MAX_NEW_TOKENS, ModelLoadError, describe, load, warn_tiny_random


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = (
        "Serve a model over HTTP: POST /v1/chat/completions, POST /v1/audio/transcriptions, GET /v1/realtime "
        "(WebSocket), a browser voice page at /, GET /health, GET /v1/models. See docs/serving.md."
    )
    parser.add_argument(
        "--model", required=True,
        help=f"Hub id or folder of a converted model, or {TINY_RANDOM!r} (a tiny model with random weights, offline)",
    )
    parser.add_argument("--served-model-name", default=None,
                        help="the id clients pass as `model` (default: --model as given)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="model dtype; auto: bfloat16 where the device computes it natively, else float32")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--max-batch-rows", type=int, default=16,
                        help="rows decoded per step at most; a spoken answer takes 2 (default 16)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting for rows at most; more are answered 429 (default 64)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="decoding steps of an answer when the request sets none (default 1024; "
                             f"{TINY_RANDOM_MAX_NEW_TOKENS} for tiny-random)")
    parser.add_argument("--max-history", type=int, default=512,
                        help="positions of earlier turns kept in a prompt at most (default 512)")
    parser.add_argument("--no-codec-noise", action="store_true",
                        help="decode speech without SNAC's learned noise (deterministic audio)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds in-flight answers get to finish at shutdown (default 30)")
    parser.add_argument("--duplex", action="store_true",
                        help="spoken realtime answers listen for 'stop omni' and stop when the model hears it "
                             "(needs a model whose listening row was trained, docs/duplex.md)")
    parser.add_argument("--duplex-threshold", type=float,
                        help="P(irq) that commits an interruption (default: the model's listen_rule, else 0.5)")
    parser.add_argument("--duplex-min-frames", type=int,
                        help="consecutive frames (85 ms each) at the threshold before it commits "
                             "(default: the model's listen_rule, else 1)")
    parser.add_argument("--duplex-catch-up-frames", type=int, default=LISTEN_CATCH_UP_FRAMES,
                        help="microphone frames the listening row reads in one decoding step at most when decoding "
                             f"falls behind real time (default {LISTEN_CATCH_UP_FRAMES}; 1: never catch up)")
    parser.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    return parser


def duplex_rule(args: argparse.Namespace, config):
    """``--duplex``'s rule: ``--duplex-threshold`` / ``--duplex-min-frames`` where given, else the model's own
    (``config.listen_rule``, chosen on validation clips when its listening row was trained; else, or with ``config``
    None, the argmax)."""
    from ..engine_mini_omni2 import ListenRule

    if not args.duplex:
        return None
    own = ListenRule.for_config(config)
    return ListenRule(own.threshold if args.duplex_threshold is None else args.duplex_threshold,
                      own.min_frames if args.duplex_min_frames is None else args.duplex_min_frames)


def build_app(args: argparse.Namespace):
    """Load the model and build the application (split from :func:`run_serve` for tests)."""
    from ..serving.app import create_app

    duplex_rule(args, None)  # a bad --duplex-* value is refused before the model loads
    check_catch_up_frames(args.duplex_catch_up_frames, "--duplex-catch-up-frames")
    random_weights = args.model == TINY_RANDOM
    if random_weights:
        warn_tiny_random(" (use it to try the server, not the model)")
        if args.duplex:
            print("warning: --duplex with random weights: the listening row interrupts answers at random",
                  file=sys.stderr, flush=True)
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    model, processor = load(args.model, args.device, args.dtype)
    print(describe(model), file=sys.stderr, flush=True)
    duplex = duplex_rule(args, model.config)
    max_tokens = args.max_tokens or (TINY_RANDOM_MAX_NEW_TOKENS if random_weights else 1024)
    return create_app(
        model, processor, args.served_model_name or args.model,
        max_batch_rows=args.max_batch_rows, max_queue=args.max_queue, codec_noise=not args.no_codec_noise,
        default_max_tokens=max_tokens, max_history_positions=args.max_history, random_weights=random_weights,
        shutdown_timeout=args.shutdown_timeout, duplex=duplex,
        duplex_catch_up_frames=args.duplex_catch_up_frames,
    )


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    if args.max_batch_rows < 1:
        print(f"error: --max-batch-rows must be >= 1, got {args.max_batch_rows}", file=sys.stderr)
        return 2
    if args.max_queue < 0:
        print(f"error: --max-queue must be >= 0, got {args.max_queue}", file=sys.stderr)
        return 2
    try:
        app = build_app(args)
    except (ModelLoadError, ValueError) as error:  # ValueError: a bad --duplex-* value
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"serving on http://{args.host}:{args.port} (voice page at /, OpenAI API under /v1)", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=int(args.shutdown_timeout) + 5)
    return 0


__all__ = ["add_serve_arguments", "run_serve", "build_app"]
