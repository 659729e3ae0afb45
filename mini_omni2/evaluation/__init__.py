"""Evaluation of Mini-Omni2 models (``mini-omni2 eval``): ASR word error rate on the papers' protocol and spoken
question answering. See ``docs/evaluation.md``."""

from .data import load_eval_dataset
from .metrics import WordErrors, contains_answer, whisper_normalizer, word_error_rate
from .report import markdown_table, write_results
from .tasks import evaluate_asr, evaluate_spoken_qa

__all__ = [
    "evaluate_asr",
    "evaluate_spoken_qa",
    "load_eval_dataset",
    "word_error_rate",
    "whisper_normalizer",
    "contains_answer",
    "WordErrors",
    "markdown_table",
    "write_results",
]
