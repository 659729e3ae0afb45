"""The ``mini-omni2`` command: ``chat`` (answer in text and speech), ``serve`` (the OpenAI-compatible voice server),
``convert`` (original release -> Hub folder) and ``eval`` (ASR word error rate, spoken question answering)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mini-omni2", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    from .chat import add_chat_arguments
    from .serve import add_serve_arguments
    from ..conversion.convert import add_convert_arguments
    from ..evaluation.cli import add_eval_arguments

    add_chat_arguments(commands.add_parser("chat", help="answer a spoken, written or visual prompt"))
    add_serve_arguments(commands.add_parser("serve", help="serve the OpenAI-compatible API and a voice web page"))
    add_convert_arguments(commands.add_parser("convert", help="convert an original checkpoint into a Hub folder"))
    add_eval_arguments(commands.add_parser("eval", help="evaluate: ASR word error rate, spoken question answering"))
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "chat":
        from .chat import run_chat

        return run_chat(args) or 0
    if args.command == "serve":
        from .serve import run_serve

        return run_serve(args)
    if args.command == "eval":
        from ..evaluation.cli import run_eval

        return run_eval(args)
    from ..conversion.convert import run_convert

    return run_convert(args) or 0


def main(argv: list[str] | None = None) -> int:
    """Run a command. Bad input (ValueError, TypeError, including ConversionError) and files that cannot be read or
    written (OSError) end in one ``error:`` line on stderr and exit status 2, without a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, TypeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
