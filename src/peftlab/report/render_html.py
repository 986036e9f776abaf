"""Render a `Document` as one self-contained HTML page.

Figures are embedded as base64 PNG data URIs and the stylesheet is inline, so the file opens
anywhere with no network access and references no external resource. All text is escaped.
"""

from __future__ import annotations

import base64
from html import escape

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

CSS = """
:root { --ink:#1f2328; --muted:#59636e; --line:#d8dee4; --soft:#f6f8fa; --accent:#0b5cad; }
* { box-sizing: border-box; }
body { margin:0; color:var(--ink); background:#fff; font:15px/1.55 -apple-system, BlinkMacSystemFont,
  "Segoe UI", "Helvetica Neue", Arial, "Noto Sans", "DejaVu Sans", sans-serif; }
.wrap { max-width:1180px; margin:0 auto; padding:0 28px; }
header.top { background:linear-gradient(135deg,#0d2b4e,#174a7c); color:#fff; padding:26px 0 20px; }
header.top h1 { margin:0 0 12px; font-size:26px; font-weight:650; letter-spacing:-.01em; }
dl.meta { display:grid; grid-template-columns:max-content 1fr; gap:3px 16px; margin:0; font-size:14px; }
dl.meta dt { color:#a9c4e4; font-weight:600; }
dl.meta dd { margin:0; color:#f2f6fb; overflow-wrap:anywhere; }
nav.toc { position:sticky; top:0; z-index:2; background:rgba(255,255,255,.96); border-bottom:1px solid var(--line);
  padding:9px 0; font-size:13.5px; }
nav.toc a { color:var(--accent); text-decoration:none; margin-right:16px; white-space:nowrap; }
nav.toc a:hover { text-decoration:underline; }
main { padding-bottom:48px; }
section { padding-top:10px; }
h2 { font-size:21px; margin:30px 0 12px; padding-bottom:6px; border-bottom:2px solid var(--line); }
h3 { font-size:16px; margin:22px 0 8px; }
p { margin:8px 0; }
p.muted, .note { color:var(--muted); }
.note { font-size:12.5px; margin:4px 0 0; }
section#findings > ul { background:#f3f8fd; border:1px solid #cfe0f3; border-left:4px solid var(--accent);
  border-radius:6px; padding:14px 18px 14px 36px; margin:10px 0; }
section#findings li { margin:4px 0; }
section#findings li li { margin:2px 0; font-size:14px; }
.table-wrap { overflow-x:auto; margin:12px 0 18px; }
.caption { font-weight:600; font-size:14px; margin:16px 0 6px; }
table { border-collapse:collapse; font-size:13.5px; min-width:40%; }
th, td { padding:6px 11px; border-bottom:1px solid var(--line); vertical-align:top; }
th { background:var(--soft); font-weight:600; text-align:left; border-bottom:2px solid var(--line);
  vertical-align:bottom; line-height:1.3; }
td:first-child { white-space:nowrap; }
td.r, th.r { text-align:right; }
td.r { font-variant-numeric:tabular-nums; white-space:nowrap; }
tbody tr:nth-child(even) td { background:#fbfcfd; }
tbody tr:hover td { background:#f1f6fc; }
td b { font-weight:700; }
.dot { display:inline-block; width:10px; height:10px; border-radius:50%; margin-right:7px;
  vertical-align:baseline; }
figure { margin:18px 0 26px; }
figure img { max-width:100%; height:auto; border:1px solid var(--line); border-radius:6px; display:block; }
figcaption { color:var(--muted); font-size:13px; margin-top:6px; }
pre.code { background:#0f1720; color:#e6edf3; padding:12px 16px; border-radius:6px; overflow-x:auto;
  font:13px/1.5 ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace; }
.example { border:1px solid var(--line); border-radius:8px; margin:12px 0; overflow:hidden; }
.example > summary { margin:0; padding:9px 14px; background:var(--soft); font-weight:650; font-size:14.5px;
  cursor:pointer; }
.example[open] > summary { border-bottom:1px solid var(--line); }
.label { font-size:12.5px; color:var(--muted); font-weight:700; margin-bottom:4px; display:flex;
  justify-content:space-between; gap:8px; }
.example .top { display:grid; grid-template-columns:1fr 1fr; border-bottom:1px solid var(--line); }
.example .top > div { padding:10px 14px; }
.example .prompt { background:#fffdf5; border-right:1px solid var(--line); }
.example .reference { background:#f4fbf4; }
.answers { display:grid; gap:10px; padding:12px 14px 14px; grid-template-columns:repeat(var(--columns), minmax(0, 1fr)); }
.answer { padding:8px 12px 10px; border:1px solid var(--line); border-top:3px solid #999; border-radius:5px; }
.score { font-variant-numeric:tabular-nums; font-weight:600; }
.text { white-space:pre-wrap; overflow-wrap:anywhere; font-size:13px; line-height:1.45; max-height:15em;
  overflow-y:auto; }
.name { white-space:nowrap; }
.sub { display:block; color:var(--muted); font-size:11.5px; }
p.verdict { font-weight:650; font-size:16px; background:#f3f8fd; border-left:4px solid var(--accent);
  padding:10px 14px; border-radius:4px; margin:14px 0; }
section#recommendation ul { margin:8px 0; padding-left:22px; }
@media (max-width: 900px) {
  .wrap { padding:0 14px; }
  header.top h1 { font-size:21px; }
  dl.meta { font-size:13px; }
  nav.toc { overflow-x:auto; white-space:nowrap; }
  table { font-size:12.5px; }
  th, td { padding:5px 7px; }
  .example .top { grid-template-columns:1fr; }
  .example .prompt { border-right:none; border-bottom:1px solid var(--line); }
  .answers { grid-template-columns:1fr; }
}
.empty { color:var(--muted); font-style:italic; }
footer { color:var(--muted); font-size:12.5px; padding:18px 0 30px; border-top:1px solid var(--line); }
"""


def render_html(doc: Document) -> str:
    meta = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in doc.meta)
    toc = "".join(f'<a href="#{escape(s.anchor)}">{escape(s.title)}</a>' for s in doc.sections)
    body = "\n".join(_section(s) for s in doc.sections)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(doc.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f'<header class="top"><div class="wrap"><h1>{escape(doc.title)}</h1><dl class="meta">{meta}</dl>'
        "</div></header>\n"
        f'<nav class="toc"><div class="wrap">{toc}</div></nav>\n'
        f'<main class="wrap">\n{body}\n</main>\n'
        '<footer><div class="wrap">Generated by <code>peftlab report</code>.</div></footer>\n'
        "</body>\n</html>\n"
    )


def _section(section: Section) -> str:
    blocks = "\n".join(_block(b) for b in section.blocks)
    tag = f"h{section.level}"
    return f'<section id="{escape(section.anchor)}">\n<{tag}>{escape(section.title)}</{tag}>\n{blocks}\n</section>'


def _block(block: Block) -> str:
    if isinstance(block, Paragraph):
        if block.strong:
            return f'<p class="verdict">{escape(block.text)}</p>'
        return f'<p class="muted">{escape(block.text)}</p>' if block.muted else f"<p>{escape(block.text)}</p>"
    if isinstance(block, Bullets):
        return _bullets(block)
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Figure):
        return _figure(block)
    if isinstance(block, Code):
        return f'<pre class="code">{escape(block.text)}</pre>'
    return _example(block)


def _bullets(block: Bullets) -> str:
    items = []
    for item in block.items:
        children = "".join(f"<li>{escape(c)}</li>" for c in item.children)
        items.append(f"<li>{escape(item.text)}" + (f"<ul>{children}</ul>" if children else "") + "</li>")
    return f"<ul>{''.join(items)}</ul>"


_RIGHT = ' class="r"'


def _cell(cell: CellLike, align: str) -> str:
    cls = _RIGHT if align == "r" else ""
    if not isinstance(cell, Cell):
        return f"<td{cls}>{escape(cell)}</td>"
    text = escape(cell.text)
    if cell.bold and text:
        text = f"<b>{text}</b>"
    if cell.color:
        text = f'<span class="name"><span class="dot" style="background:{escape(cell.color)}"></span>{text}</span>'
    if cell.sub:
        text += f'<span class="sub">{escape(cell.sub)}</span>'
    return f"<td{cls}>{text}</td>"


def _table(table: Table) -> str:
    caption = f'<div class="caption">{escape(table.caption)}</div>' if table.caption else ""
    head = "".join(
        f"<th{_RIGHT if a == 'r' else ''}>{escape(h)}</th>"
        for h, a in zip(table.headers, table.align, strict=True)
    )
    rows = "".join(
        "<tr>" + "".join(_cell(c, a) for c, a in zip(row, table.align, strict=True)) + "</tr>"
        for row in table.rows
    )
    notes = "".join(f'<p class="note">{escape(n)}</p>' for n in table.notes)
    return (
        f'{caption}<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{rows}</tbody></table>{notes}</div>"
    )


def _figure(figure: Figure) -> str:
    data = base64.b64encode(figure.file.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{escape(figure.caption)}">'
        f"<figcaption>{escape(figure.caption)}</figcaption></figure>"
    )


def _text(text: str) -> str:
    return f'<div class="text">{escape(text)}</div>' if text else '<div class="text empty">(empty)</div>'


def _answer_columns(count: int) -> int:
    """Up to three answers in one row; more are split over two rows (4 -> 2 x 2, 5 -> 3 + 2)."""
    return count if count <= 3 else min(3, -(-count // 2))


def _example(example: Example) -> str:
    cards = []
    for answer in example.answers:
        score = (
            f'<span class="score">ROUGE-L {answer.rouge_l:.3f}</span>' if answer.rouge_l is not None else ""
        )
        style = f' style="border-top-color:{escape(answer.color)}"' if answer.color else ""
        cards.append(
            f'<div class="answer"{style}><div class="label"><span>{escape(answer.label)}</span>{score}</div>'
            f"{_text(answer.text)}</div>"
        )
    columns = _answer_columns(len(cards))
    return (
        f'<details class="example"{" open" if example.open else ""}><summary>{escape(example.title)}</summary>'
        '<div class="top">'
        f'<div class="prompt"><div class="label"><span>Prompt ({escape(example.prompt_note)})</span></div>'
        f"{_text(example.prompt)}</div>"
        f'<div class="reference"><div class="label"><span>Reference</span></div>{_text(example.reference)}</div></div>'
        f'<div class="answers" style="--columns:{columns}">{"".join(cards)}</div>'
        "</details>"
    )
