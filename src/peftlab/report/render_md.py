"""Render a `Document` as GitHub-flavoured Markdown (figures linked from plots/, not embedded)."""

from __future__ import annotations

import re
from html import escape as html_escape

from peftlab.report.doc import (
    Block,
    Bullets,
    Cell,
    CellLike,
    Code,
    Document,
    Example,
    Figure,
    Paragraph,
    Section,
    Table,
)

# Backslash, emphasis, table pipes, code spans, HTML tags, and underscores that start or end a word.
_SPECIAL = re.compile(r"([\\*|`]|<(?=[A-Za-z/!?])|(?<!\w)_|_(?!\w))")


def escape(text: str) -> str:
    """Make plain text literal in Markdown (emphasis, tables, inline HTML, links); newlines become spaces."""
    return _SPECIAL.sub(lambda m: "\\" + m.group(0), text).replace("\n", " ")


def fence(text: str, info: str = "text") -> str:
    """A fenced code block whose fence is longer than any backtick run inside `text`."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{info}\n{text.rstrip()}\n{ticks}"


def render_markdown(doc: Document) -> str:
    parts = [f"# {escape(doc.title)}", "\n".join(f"- **{escape(k)}:** {escape(v)}" for k, v in doc.meta)]
    parts.append("Contents: " + " · ".join(f"[{escape(s.title)}](#{s.anchor})" for s in doc.sections))
    for section in doc.sections:
        parts.append(_section(section))
    return "\n\n".join(parts) + "\n"


def _section(section: Section) -> str:
    lines = [f'{"#" * section.level} {escape(section.title)} <a id="{section.anchor}"></a>']
    lines += [_block(block) for block in section.blocks]
    return "\n\n".join(lines)


def _block(block: Block) -> str:
    if isinstance(block, Paragraph):
        if block.strong:
            return f"**{escape(block.text)}**"
        return f"*{escape(block.text)}*" if block.muted else escape(block.text)
    if isinstance(block, Bullets):
        return _bullets(block)
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Figure):
        return f"![{escape(block.caption)}]({block.relative})\n\n*{escape(block.caption)}*"
    if isinstance(block, Code):
        return fence(block.text, "bash")
    return _example(block)


def _bullets(block: Bullets) -> str:
    lines = []
    for item in block.items:
        lines.append(f"- {escape(item.text)}")
        lines += [f"  - {escape(child)}" for child in item.children]
    return "\n".join(lines)


def _cell(cell: CellLike) -> str:
    if isinstance(cell, Cell):
        text = escape(cell.text)
        text = f"**{text}**" if cell.bold and text else text
        return f"{text} {escape(cell.sub)}" if cell.sub else text
    return escape(cell)


def _table(table: Table) -> str:
    lines = []
    if table.caption:
        lines += [f"**{escape(table.caption)}**", ""]
    lines.append("| " + " | ".join(escape(h) for h in table.headers) + " |")
    lines.append("|" + "|".join("---:" if a == "r" else ":---" for a in table.align) + "|")
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
    if table.notes:
        lines += ["", *(f"{escape(note)}  " for note in table.notes)]
    return "\n".join(lines).rstrip()


def _example(example: Example) -> str:
    """A collapsible block (GitHub renders <details>); the first example starts unfolded."""
    parts = [
        f"<details{' open' if example.open else ''}><summary><b>{_html(example.title)}</b></summary>",
        f"**Prompt** ({escape(example.prompt_note)}):",
        fence(example.prompt),
        "**Reference:**",
        fence(example.reference),
    ]
    for answer in example.answers:
        score = f" — ROUGE-L {answer.rouge_l:.3f}" if answer.rouge_l is not None else ""
        parts += [f"**{escape(answer.label)}**{score}:", fence(answer.text or "(empty)")]
    parts.append("</details>")
    return "\n\n".join(parts)


def _html(text: str) -> str:
    return html_escape(text, quote=False)
