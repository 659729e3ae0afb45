"""The scores of ``mini-omni2 eval``: Whisper's English text normalizer and the word error rate.

The papers report LibriSpeech WER on Whisper-normalized text. The WER is corpus-level (all errors / all reference
words), computed by the ``evaluate`` library's ``wer`` metric where it loads (it is fetched from the Hub) and by
``jiwer`` otherwise; ``evaluate``'s metric is itself built on jiwer, and where both are available they are computed
and must agree.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

logger = logging.getLogger(__name__)

#: Where Whisper's British -> American spelling table (``normalizer.json``) comes from by default.
WHISPER_SPELLING_REPO = "openai/whisper-small"
SPELLING_FILE = "normalizer.json"
#: Relative tolerance between evaluate's and jiwer's WER (both count the same edits; only float rounding differs).
AGREEMENT_TOLERANCE = 1e-9


def load_spelling_mapping(source: str | Path | None = WHISPER_SPELLING_REPO) -> tuple[dict[str, str], str | None]:
    """Whisper's English spelling table and where it came from.

    ``source``: a ``normalizer.json`` file, a folder holding one, a Hub repo id whose ``normalizer.json`` is
    downloaded (default ``openai/whisper-small``), or ``None``/``"none"`` for no table. A Hub table that cannot be
    had (offline) gives an empty table and a warning: the rest of the normalizer still applies.
    """
    if source is None or str(source).lower() == "none":
        return {}, None
    path = Path(source)
    if path.is_dir():
        path = path / SPELLING_FILE
    if path.is_file():
        return _read_mapping(path), str(path)
    if path.suffix == ".json" or path.exists():
        raise ValueError(f"spelling mapping file not found: {source}")
    from huggingface_hub import hf_hub_download

    try:
        downloaded = hf_hub_download(str(source), SPELLING_FILE)
    except Exception as error:  # offline, or no such file: the normalizer without the table
        logger.warning("Whisper's spelling table could not be had from %s (%s); normalizing without it", source,
                       type(error).__name__)
        return {}, None
    return _read_mapping(Path(downloaded)), f"{source}/{SPELLING_FILE}"


def _read_mapping(path: Path) -> dict[str, str]:
    mapping = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise ValueError(f"{path} is not a spelling table (a JSON object of strings)")
    return mapping


def whisper_normalizer(spelling: str | Path | None = WHISPER_SPELLING_REPO) -> tuple[Callable[[str], str], dict]:
    """transformers' ``EnglishTextNormalizer`` (Whisper's) and a description of it for the results file."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    mapping, origin = load_spelling_mapping(spelling)
    info = {"name": "whisper_english", "spelling_mapping": origin, "spelling_entries": len(mapping)}
    return EnglishTextNormalizer(mapping), info


@dataclass
class WordErrors:
    """Corpus-level word errors of predictions against references (normalized text)."""

    wer: float
    substitutions: int
    deletions: int
    insertions: int
    hits: int
    reference_words: int
    backend: str

    def to_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=None)
def load_wer_metric():
    """``evaluate.load("wer")``, or ``None`` where it does not load (it is fetched from the Hub)."""
    try:
        import evaluate

        return evaluate.load("wer")
    except Exception as error:  # offline or no evaluate: jiwer alone
        logger.info("evaluate's wer metric did not load (%s: %s); using jiwer", type(error).__name__, error)
        return None


def word_error_rate(references: Sequence[str], predictions: Sequence[str], backend: str = "auto") -> WordErrors:
    """Corpus WER of ``predictions`` against ``references`` (both already normalized), with its edit counts.

    ``backend``: ``"evaluate"`` (its ``wer`` metric; an error if it does not load), ``"jiwer"``, or ``"auto"``
    (evaluate where it loads, else jiwer). The counts always come from ``jiwer.process_words``; evaluate's WER must
    equal the one they give.
    """
    import jiwer

    if backend not in ("auto", "evaluate", "jiwer"):
        raise ValueError(f"backend must be 'auto', 'evaluate' or 'jiwer', got {backend!r}")
    references, predictions = list(references), list(predictions)
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    if not references:
        raise ValueError("no references to score")
    empty = [k for k, r in enumerate(references) if not r.strip()]
    if empty:
        raise ValueError(f"references must not be empty (examples {empty[:5]}); drop them before scoring")
    counts = jiwer.process_words(references, predictions)
    wer = float(counts.wer)
    used = "jiwer"
    metric = load_wer_metric() if backend != "jiwer" else None
    if backend == "evaluate" and metric is None:
        raise RuntimeError("evaluate's wer metric does not load here (it is fetched from the Hub); use backend='jiwer'")
    if metric is not None:
        computed = float(metric.compute(references=references, predictions=predictions))
        if abs(computed - wer) > AGREEMENT_TOLERANCE * max(1.0, wer):
            raise RuntimeError(f"evaluate's WER {computed} and jiwer's {wer} disagree")
        wer, used = computed, "evaluate"
    return WordErrors(wer=float(wer), substitutions=counts.substitutions, deletions=counts.deletions,
                      insertions=counts.insertions, hits=counts.hits,
                      reference_words=counts.substitutions + counts.deletions + counts.hits, backend=used)


def contains_answer(answer: str, references: Sequence[str]) -> bool:
    """Whether a normalized answer contains any normalized reference as a whole-word sequence."""
    padded = f" {answer.strip()} "
    return any(ref.strip() and f" {ref.strip()} " in padded for ref in references)


__all__ = [
    "WordErrors",
    "word_error_rate",
    "whisper_normalizer",
    "load_spelling_mapping",
    "load_wer_metric",
    "contains_answer",
    "WHISPER_SPELLING_REPO",
]
