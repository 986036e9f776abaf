"""Qualitative examples section of the report: the selected test rows (`report.examples`) with each
model's answer next to the reference, long texts shortened.
"""

from __future__ import annotations

from typing import Any

from peftlab.report import fmt
from peftlab.report.doc import Answer, Example, Paragraph
from peftlab.report.examples import PROMPT_CHARS, last_user_turn, select_examples
from peftlab.report.fmt import display
from peftlab.report.load import RunData
from peftlab.report.sections.cells import Colors

ANSWER_CHARS = 1500


# ------------------------------------------------------------------------------------------ examples


def example_blocks(run: RunData, colors: Colors) -> list[Any]:
    rows = select_examples(run)
    if not rows:
        return [Paragraph("No predictions found (eval/<model>/predictions.jsonl).", muted=True)]
    blocks: list[Any] = [
        Paragraph(
            "Test rows where the models' ROUGE-L differs most, taken in turn from each source "
            "(ROUGE-L F-measure against the reference is shown per answer). Click an example to unfold it; "
            "long texts scroll inside their box."
        )
    ]
    for number, row in enumerate(rows, start=1):
        prompt, turns = row.last_user or last_user_turn(row.prompt)
        note = "last user turn" + (f" of {turns}" if turns > 1 else "")
        if len(prompt) > PROMPT_CHARS:
            note += f", shortened from {len(prompt):,} characters"
        answers = [
            Answer(display(m), fmt.truncate(text, ANSWER_CHARS), score, colors.get(m))
            for m, (text, score) in row.answers.items()
        ]
        blocks.append(
            Example(
                title=f"Example {number} · {row.source} · id {row.row_id}",
                prompt=fmt.truncate(prompt, PROMPT_CHARS),
                prompt_note=note,
                reference=fmt.truncate(row.reference, ANSWER_CHARS),
                answers=answers,
                open=number == 1,
            )
        )
    return blocks
