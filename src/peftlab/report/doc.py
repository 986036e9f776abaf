"""A small document model that both renderers (Markdown and HTML) consume.

Sections hold blocks: paragraphs, bullet lists, tables, figures, code and qualitative examples.
All text is plain (unescaped); each renderer escapes it for its own format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Cell:
    """A table cell with optional emphasis and a colour swatch (the model's plot colour)."""

    text: str
    bold: bool = False
    color: str | None = None
    # A second, smaller line (a confidence interval under its score); Markdown puts it after the text.
    sub: str | None = None


CellLike = str | Cell


def cell_text(cell: CellLike) -> str:
    if isinstance(cell, Cell):
        return f"{cell.text} {cell.sub}" if cell.sub else cell.text
    return cell


@dataclass
class Paragraph:
    text: str
    muted: bool = False
    # The one sentence a section leads to (the recommendation): shown emphasised.
    strong: bool = False


@dataclass
class Bullet:
    text: str
    children: list[str] = field(default_factory=list)


@dataclass
class Bullets:
    items: list[Bullet]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[CellLike]]
    # One letter per column: "l" (text) or "r" (numbers).
    align: str
    caption: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Figure:
    # Path relative to the run directory (used by the Markdown report) and the file to embed.
    relative: str
    file: Path
    caption: str


@dataclass
class Code:
    text: str


@dataclass
class Answer:
    label: str
    text: str
    rouge_l: float | None = None
    color: str | None = None


@dataclass
class Example:
    title: str
    prompt: str
    prompt_note: str
    reference: str
    answers: list[Answer]
    # Shown unfolded (the first example); the others start folded in the HTML report.
    open: bool = False


Block = Paragraph | Bullets | Table | Figure | Code | Example


@dataclass
class Section:
    anchor: str
    title: str
    blocks: list[Block] = field(default_factory=list)
    level: int = 2


@dataclass
class Document:
    title: str
    # (label, value) pairs shown under the title.
    meta: list[tuple[str, str]]
    sections: list[Section]
