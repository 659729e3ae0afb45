"""The outputs of ``mini-omni2 eval``: the results JSON and a markdown table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def markdown_table(results: dict[str, Any]) -> str:
    """One results dict of ``evaluate_asr`` / ``evaluate_spoken_qa`` as a markdown table."""
    head = "| model | dataset | config | split | examples |"
    rule = "|---|---|---|---|---:|"
    cells = (f"| {results.get('model', '')} | {results.get('dataset', '')} | {results.get('config') or ''} | "
             f"{results.get('split') or ''} | {results['num_examples']} |")
    metrics = results["metrics"]
    if results["task"] == "asr":
        counts = results["counts"]
        head += " WER % | substitutions | deletions | insertions | reference words | backend |"
        rule += "---:|---:|---:|---:|---:|---|"
        cells += (f" {_percent(metrics['wer'])} | {counts['substitutions']} | {counts['deletions']} | "
                  f"{counts['insertions']} | {counts['reference_words']} | {results['metric_backend']} |")
    else:
        head += " speech-text WER % | accuracy % | empty answers | backend |"
        rule += "---:|---:|---:|---|"
        cells += (f" {_percent(metrics['speech_text_wer'])} | {_percent(metrics['accuracy'])} | "
                  f"{results['num_empty_answers']} | {results['metric_backend'] or ''} |")
    return "\n".join([head, rule, cells]) + "\n"


def write_results(results: dict[str, Any], output: str | Path) -> tuple[Path, Path]:
    """Write the results JSON to ``output`` and its markdown table beside it (``.md``); returns both paths."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    table = output.with_suffix(".md")
    table.write_text(markdown_table(results), encoding="utf-8")
    return output, table


__all__ = ["markdown_table", "write_results"]
