"""``mini-omni2 eval asr`` and ``mini-omni2 eval spoken-qa``: load a model and a dataset, run the evaluation, print
the markdown table, write the results JSON (and the table beside it), and optionally add them to a model card."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

logger = logging.getLogger(__name__)

TASKS = ("asr", "spoken-qa")


def _common_arguments(parser: argparse.ArgumentParser, default_dataset: str | None) -> None:
    parser.add_argument("--model", required=True, help="Hub id or folder of a Mini-Omni2 model")
    parser.add_argument("--dataset", required=default_dataset is None, default=default_dataset,
                        help="Hub id, local dataset folder/script, or a folder written by save_to_disk"
                        + (f" (default {default_dataset})" if default_dataset else ""))
    parser.add_argument("--config", default=None, help="dataset config (LibriSpeech: clean or other)")
    parser.add_argument("--split", default="test", help="dataset split (default test)")
    parser.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    parser.add_argument("--batch-size", type=int, default=8, help="requests per generate call (default 8)")
    parser.add_argument("--output", default=None, help="results JSON to write (the markdown table goes beside it)")
    parser.add_argument("--audio-column", default="audio", help="the audio column (default audio)")
    parser.add_argument("--id-column", default="id", help="the example id column, recorded per example (default id)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="decoding steps at most per answer")
    parser.add_argument("--generate-kwargs", type=json.loads, default=None, metavar="JSON",
                        help='more arguments of generate as JSON, e.g. \'{"do_sample": false}\'')
    parser.add_argument("--no-truncate-audio", action="store_true",
                        help="refuse audio over the encoder's 30 s instead of keeping its first 30 s")
    parser.add_argument("--spelling-mapping", default=None, metavar="SOURCE",
                        help="Whisper's spelling table for the normalizer: a normalizer.json, a Hub id holding one "
                             "(default openai/whisper-small), or 'none'")
    parser.add_argument("--metric-backend", default="auto", choices=("auto", "evaluate", "jiwer"),
                        help="WER from evaluate's metric where it loads (auto), or from jiwer")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", help="model dtype: auto (the checkpoint's), float32, bfloat16, ...")
    parser.add_argument("--card", default=None, metavar="FOLDER",
                        help="add the results to the model card (model-index) of this saved model folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = "Evaluate a Mini-Omni2 model: ASR word error rate, or spoken question answering."
    tasks = parser.add_subparsers(dest="eval_task", required=True)
    asr = tasks.add_parser("asr", help="word error rate of transcriptions (LibriSpeech protocol of the papers)")
    _common_arguments(asr, "openslr/librispeech_asr")
    asr.add_argument("--text-column", default="text", help="the reference transcript column (default text)")
    qa = tasks.add_parser("spoken-qa", help="answers in speech: speech-vs-text WER and answer accuracy")
    _common_arguments(qa, None)
    qa.add_argument("--question-column", default=None, help="text questions (default: the audio column's speech)")
    qa.add_argument("--answer-column", default="answers",
                    help="reference answers (a string or a list); 'none' for no accuracy (default answers)")
    return parser


def build_pipeline(model: str, device: str | None = None, dtype: Any = "auto", generate_kwargs: dict | None = None):
    """A :class:`MiniOmni2Pipeline` of a saved model (this package's classes, no remote code)."""
    import torch

    from .. import MiniOmni2ForConditionalGeneration, MiniOmni2Pipeline, MiniOmni2Processor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = MiniOmni2ForConditionalGeneration.from_pretrained(model, dtype=dtype)
    processor = MiniOmni2Processor.from_pretrained(model)
    return MiniOmni2Pipeline(model=loaded, processor=processor, device=device, dtype=dtype,
                             generate_kwargs=generate_kwargs or {})


def run_evaluation(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``mini-omni2 eval`` from parsed arguments; returns the results dict."""
    from .data import load_eval_dataset, require_columns
    from .metrics import WHISPER_SPELLING_REPO, whisper_normalizer
    from .tasks import evaluate_asr, evaluate_spoken_qa

    generate_kwargs = dict(args.generate_kwargs or {})
    if args.max_new_tokens is not None:
        generate_kwargs["max_new_tokens"] = args.max_new_tokens
    text_questions = args.eval_task == "spoken-qa" and args.question_column is not None
    dataset = load_eval_dataset(args.dataset, args.config, args.split, streaming=args.streaming, limit=args.limit,
                                audio_column=None if text_questions else args.audio_column)
    text_column = args.text_column if args.eval_task == "asr" else None
    answer_column = None if args.eval_task == "asr" or args.answer_column.lower() == "none" else args.answer_column
    question_column = args.question_column if args.eval_task == "spoken-qa" else None
    require_columns(dataset, None if text_questions else args.audio_column, text_column, answer_column, question_column)
    normalizer = whisper_normalizer(args.spelling_mapping or WHISPER_SPELLING_REPO)
    pipe = build_pipeline(args.model, args.device, args.dtype, generate_kwargs)
    common = dict(audio_column=args.audio_column, id_column=args.id_column, batch_size=args.batch_size,
                  truncate_audio=not args.no_truncate_audio, normalizer=normalizer, metric_backend=args.metric_backend,
                  progress=not args.no_progress)
    if args.eval_task == "asr":
        results = evaluate_asr(pipe, dataset, text_column=text_column, **common)
    else:
        results = evaluate_spoken_qa(pipe, dataset, question_column=question_column, answer_column=answer_column,
                                     **common)
    head = {"task": results.pop("task"), "model": args.model, "dataset": args.dataset, "config": args.config,
            "split": args.split, "streaming": args.streaming, "limit": args.limit, "generate_kwargs": generate_kwargs}
    return {**head, **results}


def run_eval(args: argparse.Namespace) -> int:
    from .report import markdown_table, write_results

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        results = run_evaluation(args)
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(markdown_table(results), end="")
    if args.output:
        json_path, table_path = write_results(results, args.output)
        print(f"wrote {json_path} and {table_path}")
    if args.card:
        from ..hub_mini_omni2 import add_eval_results

        print(f"updated {add_eval_results(args.card, results)}")
    return 0


__all__ = ["add_eval_arguments", "run_eval", "run_evaluation", "build_pipeline"]
