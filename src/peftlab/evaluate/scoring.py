"""Scoring a whole table of generations: per-row metrics (`peftlab.evaluate.metrics`) summarised
overall and per source with bootstrap confidence intervals (`peftlab.evaluate.statistics`), from
in-memory rows (`score_table`) or a predictions JSONL file (`load_predictions`, `score_file`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.errors import UserError
from peftlab.evaluate.metrics import score_rows
from peftlab.evaluate.statistics import summarize_table
from peftlab.rundir import json_object, json_type


def score_table(
    predictions: Sequence[str],
    references: Sequence[str],
    sources: Sequence[str] | None = None,
    *,
    bootstrap_samples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Score rows and summarise them overall and (when `sources` is given) per source label."""
    if not predictions:
        raise ValueError("cannot score zero rows")
    return summarize_table(
        score_rows(predictions, references), sources, bootstrap_samples=bootstrap_samples, seed=seed
    )


# ------------------------------------------------------------------------------------------ JSONL input


@dataclass(frozen=True)
class PredictionRows:
    """Rows read from a predictions JSONL file; `sources` is None when no row has ``source_dataset``."""

    predictions: list[str]
    references: list[str]
    sources: list[str] | None


def _parse_line(where: str, line: str) -> dict[str, Any]:
    row = json_object(line, where)
    for key in ("prediction", "reference"):
        if key not in row:
            raise UserError(f"{where}: missing {key!r}")
    for key in ("prediction", "reference", "source_dataset"):
        if key in row and not isinstance(row[key], str):
            raise UserError(f"{where}: {key!r} must be a string, got {json_type(row[key])}")
    return row


def _read_lines(path: Path) -> list[bytes]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return data.removeprefix(b"\xef\xbb\xbf").split(b"\n")


def load_predictions(path: Path | str) -> PredictionRows:
    """Read a JSONL file of ``{"prediction", "reference"[, "source_dataset"]}`` rows.

    Blank lines are skipped. Any problem raises `UserError` naming the file and the 1-based line.
    ``source_dataset`` must be on every row or on none.
    """
    path = Path(path)
    preds: list[str] = []
    refs: list[str] = []
    sources: list[str | None] = []
    first_without_source = 0
    for lineno, raw in enumerate(_read_lines(path), start=1):
        where = f"{path} line {lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"{where}: not valid UTF-8 ({exc.reason})") from None
        if not line.strip():
            continue
        row = _parse_line(where, line)
        preds.append(row["prediction"])
        refs.append(row["reference"])
        sources.append(row.get("source_dataset"))
        if sources[-1] is None and not first_without_source:
            first_without_source = lineno
    if not preds:
        raise UserError(f"{path}: no rows (the file is empty)")
    if all(s is None for s in sources):
        return PredictionRows(preds, refs, None)
    if first_without_source:
        raise UserError(f"{path} line {first_without_source}: missing 'source_dataset' (other rows have it)")
    return PredictionRows(preds, refs, [s for s in sources if s is not None])


def score_file(path: Path | str, *, bootstrap_samples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """`score_table` of a predictions JSONL file (per source when rows carry ``source_dataset``)."""
    rows = load_predictions(path)
    return score_table(
        rows.predictions, rows.references, rows.sources, bootstrap_samples=bootstrap_samples, seed=seed
    )
