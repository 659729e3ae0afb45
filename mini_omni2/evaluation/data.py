"""Evaluation data: a Hub dataset (``openslr/librispeech_asr``), a local dataset folder or script, or a dataset saved
with ``save_to_disk``; streamed or not; the audio column left encoded for the processor to decode."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterable, Iterator


def _saved_to_disk(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "state.json"))


def load_eval_dataset(
    dataset: str,
    config: str | None = None,
    split: str = "test",
    *,
    streaming: bool = False,
    limit: int | None = None,
    audio_column: str | None = "audio",
):
    """The ``split`` of ``dataset`` (first ``limit`` examples), its audio column as encoded ``{"path", "bytes"}``
    values: the processor decodes them, so no torchcodec is needed and the original files are read as they are."""
    import datasets

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    path = Path(dataset)
    if _saved_to_disk(path):
        if config is not None:
            raise ValueError(f"{dataset} was saved with save_to_disk: it has no configs (got --config {config})")
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{dataset} has no split {split!r}; its splits: {sorted(loaded)}")
            loaded = loaded[split]
        if streaming:
            loaded = loaded.to_iterable_dataset()
    else:
        loaded = datasets.load_dataset(dataset, config, split=split, streaming=streaming)
    columns = loaded.column_names
    if audio_column is not None:
        if columns is not None and audio_column not in columns:
            raise ValueError(f"{dataset} has no audio column {audio_column!r}; its columns: {columns}")
        loaded = loaded.cast_column(audio_column, datasets.Audio(decode=False))
    if limit is not None:
        loaded = loaded.take(limit) if streaming else loaded.select(range(min(limit, len(loaded))))
    return loaded


def require_columns(dataset, *names: str | None) -> None:
    columns = dataset.column_names
    missing = [n for n in names if n is not None and columns is not None and n not in columns]
    if missing:
        raise ValueError(f"the dataset has no column {missing[0]!r}; its columns: {columns}")


def num_examples(dataset) -> int | None:
    try:
        return len(dataset)
    except TypeError:  # a streamed dataset
        return None


def chunks(rows: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Consecutive lists of ``size`` rows (the last may be shorter)."""
    iterator = iter(rows)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def example_id(row: dict, index: int, id_column: str | None) -> Any:
    return row.get(id_column, index) if id_column else index


__all__ = ["load_eval_dataset", "require_columns", "num_examples", "chunks", "example_id"]
