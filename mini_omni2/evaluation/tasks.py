"""The two evaluations of ``mini-omni2 eval``: ASR word error rate, and spoken question answering (does the voice say
what the text says; are the answers right). Both run the model through :class:`~mini_omni2.MiniOmni2Pipeline`."""

from __future__ import annotations

from typing import Any, Callable

from ..token_layout import OUTPUT_ASR, OUTPUT_SPEECH
from .data import chunks, example_id, num_examples, require_columns
from .metrics import contains_answer, whisper_normalizer, word_error_rate


def _progress(total: int | None, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="example", disable=not enabled)


def _normalizer(normalizer) -> tuple[Callable[[str], str], dict]:
    return normalizer if normalizer is not None else whisper_normalizer()


def _check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def evaluate_asr(
    pipe,
    dataset,
    *,
    audio_column: str = "audio",
    text_column: str = "text",
    id_column: str | None = "id",
    batch_size: int = 8,
    truncate_audio: bool = True,
    normalizer: tuple[Callable[[str], str], dict] | None = None,
    metric_backend: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Transcribe every example (``output="asr"``) and score the corpus WER on Whisper-normalized text.

    Returns the results dict of ``mini-omni2 eval asr`` (``docs/evaluation.md``): ``metrics.wer`` (a fraction),
    the edit ``counts``, the ``metric_backend``, the ``normalizer`` and every example's texts.
    """
    normalize, normalizer_info = _normalizer(normalizer)
    batch_size = _check_batch_size(batch_size)
    require_columns(dataset, audio_column, text_column)
    records = []
    with _progress(num_examples(dataset), "asr", progress) as bar:
        for chunk in chunks(dataset, batch_size):
            requests = [{"audio": row[audio_column], "output": OUTPUT_ASR} for row in chunk]
            answers = pipe(requests, batch_size=batch_size, truncate_audio=truncate_audio)
            for row, answer in zip(chunk, answers):
                reference = row[text_column]
                if not isinstance(reference, str):
                    raise ValueError(f"the {text_column!r} column must hold strings, got {type(reference).__name__}")
                records.append({
                    "id": example_id(row, len(records), id_column),
                    "reference": reference,
                    "prediction": answer["text"],
                    "reference_normalized": normalize(reference),
                    "prediction_normalized": normalize(answer["text"]),
                })
            bar.update(len(chunk))
    scored = [r for r in records if r["reference_normalized"].strip()]
    if not scored:
        raise ValueError("no example has a reference text left after normalization")
    errors = word_error_rate([r["reference_normalized"] for r in scored], [r["prediction_normalized"] for r in scored],
                             backend=metric_backend)
    counts = errors.to_dict()
    return {
        "task": "asr",
        "num_examples": len(records),
        "num_scored": len(scored),
        "metrics": {"wer": counts.pop("wer")},
        "metric_backend": counts.pop("backend"),
        "counts": counts,
        "normalizer": normalizer_info,
        "batch_size": batch_size,
        "truncate_audio": truncate_audio,
        "examples": records,
    }


def evaluate_spoken_qa(
    pipe,
    dataset,
    *,
    audio_column: str | None = "audio",
    question_column: str | None = None,
    answer_column: str | None = "answers",
    id_column: str | None = "id",
    batch_size: int = 8,
    truncate_audio: bool = True,
    normalizer: tuple[Callable[[str], str], dict] | None = None,
    metric_backend: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Answer every question in speech, transcribe the spoken answer with the same model, and score

    - ``speech_text_wer``: the corpus WER of the transcript of the speech against the model's own text answer (does
      the voice say what the text says), over the answers whose normalized text is not empty;
    - ``accuracy``: the fraction of answers whose normalized text contains one of the normalized references
      (``answer_column``: a string or a list of strings; no accuracy without it).

    The questions are the ``audio_column`` (speech), or the ``question_column`` (text) when given.
    """
    normalize, normalizer_info = _normalizer(normalizer)
    batch_size = _check_batch_size(batch_size)
    if question_column is not None:
        audio_column = None
    if audio_column is None and question_column is None:
        raise ValueError("give the questions' audio column or a question (text) column")
    require_columns(dataset, audio_column, question_column, answer_column)
    max_seconds = pipe.processor.max_audio_seconds
    records, truncated = [], 0
    with _progress(num_examples(dataset), "spoken-qa", progress) as bar:
        for chunk in chunks(dataset, batch_size):
            questions = [
                {"text": row[question_column]} if question_column else {"audio": row[audio_column]} for row in chunk
            ]
            answers = pipe([dict(q, output=OUTPUT_SPEECH) for q in questions], batch_size=batch_size,
                           truncate_audio=truncate_audio)
            for answer in answers:
                if answer.get("audio") is None:
                    raise ValueError("the model gave no speech (no codec, or decode_audio=False): it cannot be scored")
                truncated += len(answer["audio"]) > max_seconds * answer["sampling_rate"]
            heard = pipe([{"audio": (a["audio"], a["sampling_rate"]), "output": OUTPUT_ASR} for a in answers],
                         batch_size=batch_size, truncate_audio=True)
            for row, answer, transcript in zip(chunk, answers, heard):
                references = row[answer_column] if answer_column else None
                if isinstance(references, str):
                    references = [references]
                normalized = normalize(answer["text"])
                record = {
                    "id": example_id(row, len(records), id_column),
                    "question": row[question_column] if question_column else None,
                    "answer": answer["text"],
                    "transcript": transcript["text"],
                    "answer_normalized": normalized,
                    "transcript_normalized": normalize(transcript["text"]),
                    "speech_seconds": len(answer["audio"]) / answer["sampling_rate"],
                    "references": references,
                    "correct": None if references is None else contains_answer(normalized, [normalize(r) for r in references]),
                }
                records.append(record)
            bar.update(len(chunk))
    spoken = [r for r in records if r["answer_normalized"].strip()]
    metrics: dict[str, Any] = {"speech_text_wer": None, "accuracy": None}
    counts, backend = None, None
    if spoken:
        errors = word_error_rate([r["answer_normalized"] for r in spoken], [r["transcript_normalized"] for r in spoken],
                                 backend=metric_backend)
        counts = errors.to_dict()
        metrics["speech_text_wer"], backend = counts.pop("wer"), counts.pop("backend")
    judged = [r["correct"] for r in records if r["correct"] is not None]
    if judged:
        metrics["accuracy"] = sum(judged) / len(judged)
    return {
        "task": "spoken-qa",
        "num_examples": len(records),
        "num_scored": len(spoken),
        "num_empty_answers": len(records) - len(spoken),
        "num_speech_truncated_for_asr": int(truncated),
        "metrics": metrics,
        "metric_backend": backend,
        "counts": counts,
        "normalizer": normalizer_info,
        "batch_size": batch_size,
        "truncate_audio": truncate_audio,
        "examples": records,
    }


__all__ = ["evaluate_asr", "evaluate_spoken_qa"]
