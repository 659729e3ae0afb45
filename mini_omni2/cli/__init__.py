"""The ``mini-omni2`` command: ``chat`` (answer in text and speech), ``convert`` (original release -> Hub folder) and
``eval`` (ASR word error rate, spoken question answering)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mini-omni2", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    from .chat import add_chat_arguments
    from ..conversion.convert import add_convert_arguments
    from ..evaluation.cli import add_eval_arguments

    add_chat_arguments(commands.add_parser("chat", help="answer a spoken, written or visual prompt"))
    add_convert_arguments(commands.add_parser("convert", help="convert an original checkpoint into a Hub folder"))
    add_eval_arguments(commands.add_parser("eval", help="evaluate: ASR word error rate, spoken question answering"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "chat":
        from .chat import run_chat

        return run_chat(args) or 0
    if args.command == "eval":
        from ..evaluation.cli import run_eval

        return run_eval(args)
    from ..conversion.convert import run_convert

    return run_convert(args) or 0


if __name__ == "__main__":
    sys.exit(main())
