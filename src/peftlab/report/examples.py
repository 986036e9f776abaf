"""Choose qualitative examples: test rows where the models disagree most, spread across sources.

Per-row ROUGE-L is `rouge_score.RougeScorer(["rougeL"], use_stemmer=False)` F-measure with the
reference as target. Scoring every row of every model is slow in pure Python (an LCS per pair), so
each source contributes at most `CANDIDATES_PER_SOURCE` candidate rows, taken in the order of a
stable hash of their id; within a source candidates are ranked by the spread (max - min) of ROUGE-L
across models, and sources take turns so the examples cover them all. Everything is deterministic.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from rouge_score import rouge_scorer

from peftlab.report.load import BASE, RunData

CANDIDATES_PER_SOURCE = 24
DEFAULT_EXAMPLES = 8
PROMPT_CHARS = 600
USER_TURN = "<start_of_turn>user\n"
END_TURN = "<end_of_turn>"


@dataclass
class ExampleRow:
    row_id: str
    source: str
    prompt: str
    reference: str
    # model -> (prediction, ROUGE-L F-measure)
    answers: dict[str, tuple[str, float]]
    # (the last user message, the number of user turns) as evaluation recorded them; None for older runs
    last_user: tuple[str, int] | None = None

    @property
    def spread(self) -> float:
        scores = [score for _, score in self.answers.values()]
        return max(scores) - min(scores) if scores else 0.0


def last_user_turn(prompt: str) -> tuple[str, int]:
    """The text of the last user turn of a rendered Gemma prompt, and the number of user turns
    (predictions written before evaluation recorded `last_user` themselves)."""
    turns = prompt.count(USER_TURN)
    start = prompt.rfind(USER_TURN)
    if start < 0:
        return prompt.removeprefix("<bos>").strip(), 0
    body = prompt[start + len(USER_TURN) :]
    end = body.find(END_TURN)
    return (body[:end] if end >= 0 else body).strip(), turns


def select_examples(run: RunData, limit: int = DEFAULT_EXAMPLES) -> list[ExampleRow]:
    models = [m for m in run.names if run.predictions.get(m)]
    if not models:
        return []
    by_model = {m: {str(row.get("id")): row for row in run.predictions[m]} for m in models}
    ids = _common_ids(models, by_model)
    by_source: dict[str, list[str]] = {}
    for row_id in ids:
        source = str(_first_row(row_id, models, by_model).get("source_dataset") or "unknown")
        by_source.setdefault(source, []).append(row_id)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    ranked: dict[str, list[ExampleRow]] = {}
    for source in sorted(by_source):
        candidates = sorted(by_source[source], key=_stable_key)[:CANDIDATES_PER_SOURCE]
        rows = [_score_row(row_id, source, models, by_model, scorer) for row_id in candidates]
        ranked[source] = sorted(rows, key=lambda r: (-r.spread, _stable_key(r.row_id)))
    return _round_robin(ranked, limit)


def _common_ids(models: list[str], by_model: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Ids every model answered, in the order of the first model; if none, the largest model's ids."""
    largest = max(models, key=lambda m: len(by_model[m]))
    order = BASE if BASE in models else largest
    common = [i for i in by_model[order] if all(i in by_model[m] for m in models)]
    return common or list(by_model[largest])


def _first_row(
    row_id: str, models: list[str], by_model: dict[str, dict[str, dict[str, Any]]]
) -> dict[str, Any]:
    return next(by_model[m][row_id] for m in models if row_id in by_model[m])


def _stable_key(row_id: str) -> str:
    return hashlib.sha1(row_id.encode("utf-8")).hexdigest()


def _score_row(
    row_id: str,
    source: str,
    models: list[str],
    by_model: dict[str, dict[str, dict[str, Any]]],
    scorer: rouge_scorer.RougeScorer,
) -> ExampleRow:
    first = _first_row(row_id, models, by_model)
    reference = str(first.get("reference") or "")
    answers = {}
    for model in models:
        row = by_model[model].get(row_id)
        if row is not None:
            prediction = str(row.get("prediction") or "")
            answers[model] = (prediction, scorer.score(reference, prediction)["rougeL"].fmeasure)
    last_user = (str(first["last_user"]), int(first.get("user_turns") or 1)) if first.get("last_user") else None
    return ExampleRow(row_id, source, str(first.get("prompt") or ""), reference, answers, last_user)


def _round_robin(ranked: dict[str, list[ExampleRow]], limit: int) -> list[ExampleRow]:
    chosen: list[ExampleRow] = []
    depth = 0
    while len(chosen) < limit and any(depth < len(rows) for rows in ranked.values()):
        for rows in ranked.values():
            if depth < len(rows) and len(chosen) < limit:
                chosen.append(rows[depth])
        depth += 1
    return chosen
