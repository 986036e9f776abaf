"""Quality sections of the report: the score table of every evaluated model, scores per source, the
pairwise significance tests, the spread over seed repeats and the ensemble's weight selection.
"""

from __future__ import annotations

from typing import Any

from peftlab.report import fmt
from peftlab.report.doc import Cell, Paragraph, Table
from peftlab.report.findings import compared_pairs, find_comparison, method_note
from peftlab.report.fmt import display, is_number, metric_name
from peftlab.report.load import BASE, RunData
from peftlab.report.recommend import verdict
from peftlab.report.sections.cells import Colors, drop_empty_columns, model_cell

# ------------------------------------------------------------------------------------------- quality


OTHER_METRICS = ("exact_match", "exact_match_norm", "rouge1", "rouge2", "bleu4", "rougeL")


def metric_cell(run: RunData, model: str, metric: str, *, bold: bool = False, with_spread: bool = True) -> Cell:
    """A score, with its 95% CI (or ± SD over seeds) as a second line; exact matches add the row count."""
    q = run.quality[model]
    text = fmt.score(q.get(metric))
    count, n = q.get(f"{metric}_count"), q.get("n")
    if is_number(count) and is_number(n) and not run.seed_values(model, metric):
        text += f" ({fmt.integer(count)}/{fmt.integer(n)})"
    sub = None
    if with_spread:
        if run.seed_values(model, metric) and is_number(q.get(f"{metric}_sd")):
            sub = f"± {fmt.score(q[f'{metric}_sd'])} SD, {len(run.seed_values(model, metric))} seeds"
        elif fmt.interval(q.get(f"{metric}_ci")) != fmt.MISSING:
            sub = fmt.interval(q.get(f"{metric}_ci"))
    return Cell(text, bold=bold and text != fmt.MISSING, sub=sub)


def quality_blocks(run: RunData, colors: Colors) -> list[Any]:
    models = run.evaluated
    if not models:
        return [Paragraph("No model has been evaluated yet.", muted=True)]
    lead = run.metrics
    others = [m for m in OTHER_METRICS if m not in lead]
    best = {
        m: max((run.quality[x].get(m) for x in models if is_number(run.quality[x].get(m))), default=None)
        for m in lead
    }
    # Bold marks a best score only where the models differ.
    distinct = {m for m in lead if len({run.quality[x].get(m) for x in models}) > 1}
    base = run.quality.get(BASE, {})
    rows = []
    for model in models:
        q = run.quality[model]
        rows.append(
            [
                model_cell(model, colors),
                fmt.integer(q.get("n")),
                *(metric_cell(run, model, m, bold=q.get(m) == best[m] and m in distinct) for m in lead),
                _delta(run, model, base, run.primary),
                *(metric_cell(run, model, m, with_spread=False) for m in others),
            ]
        )
    headers = ["Model", "n", *(metric_name(m) for m in lead), f"Δ {metric_name(run.primary)} vs Base",
               *(metric_name(m) for m in others)]
    notes = [
        "Leading metrics (evaluate.metrics) first, with their 95% bootstrap CI underneath; best in bold. "
        "Exact match: the answer equals the reference (surrounding whitespace aside); normalised EM: equal after "
        "SQuAD normalisation (case, punctuation, a/an/the, whitespace); matching rows in parentheses."
    ]
    if BASE in run.quality:
        notes.append(f"Δ is absolute, relative change in parentheses; * the difference from Base is significant "
                     f"({method_note(run)}, Holm-adjusted p < {fmt.ALPHA}).")
    missing = [display(m) for m in models if not is_number(run.quality[m].get("exact_match"))]
    if missing:
        notes.append(f"No exact match recorded for {fmt.join_names(missing)}: results.json of an older peftlab,"
                     " without the predictions (eval/<model>/predictions.jsonl) to score it from.")
    return [drop_empty_columns(Table(headers, rows, "lr" + "r" * (len(headers) - 2), notes=notes))]


def _delta(run: RunData, model: str, base: dict[str, Any], metric: str) -> str:
    if model == BASE or not base:
        return fmt.MISSING
    value, ref = run.quality[model].get(metric), base.get(metric)
    if not (is_number(value) and is_number(ref)):
        return fmt.MISSING
    item = find_comparison(run, model, BASE, metric)
    star = "*" if item is not None and fmt.significant(fmt.decisive_p(item)) else ""
    return f"{fmt.signed(value - ref)} ({fmt.percent_change(value - ref, ref)}){star}"


# ---------------------------------------------------------------------------------------- per source


def per_source_blocks(run: RunData, colors: Colors) -> list[Any]:
    models = [m for m in run.evaluated if isinstance(run.quality[m].get("per_source"), dict)]
    sources = sorted({s for m in models for s in run.quality[m]["per_source"]})
    if not sources:
        return [Paragraph("No per-source scores in results.json.", muted=True)]
    blocks: list[Any] = []
    metrics = [*run.metrics, *(m for m in ("exact_match_norm", "exact_match") if m not in run.metrics)]
    for metric in metrics:
        if not any(is_number(run.quality[m]["per_source"].get(s, {}).get(metric)) for m in models for s in sources):
            continue
        rows = []
        for source in sources:
            cells = {m: run.quality[m]["per_source"].get(source, {}) for m in models}
            values = [c.get(metric) for c in cells.values() if is_number(c.get(metric))]
            top = max(values) if len(set(values)) > 1 else None
            n = next((c.get("n") for c in cells.values() if is_number(c.get("n"))), None)
            row: list[Any] = [source, fmt.integer(n)]
            for m in models:
                text = fmt.score(cells[m].get(metric))
                if is_number(cells[m].get(f"{metric}_count")) and not run.seed_values(m, metric):
                    text += f" ({fmt.integer(cells[m][f'{metric}_count'])})"
                row.append(Cell(text, bold=top is not None and cells[m].get(metric) == top))
            rows.append(row)
        headers = ["Source", "n", *(display(m) for m in models)]
        blocks.append(
            Table(headers, rows, "lr" + "r" * len(models), caption=f"{metric_name(metric)} per source")
        )
    if blocks:
        exact = any(m.startswith("exact_match") for m in metrics if any(
            is_number(run.quality[x]["per_source"].get(s, {}).get(m)) for x in models for s in sources))
        blocks[-1].notes.append("Best model per source in bold" + ("; exact matches: matching rows in parentheses."
                                                                    if exact else "."))
    return blocks


# ---------------------------------------------------------------------------------------- comparisons


def comparison_blocks(run: RunData, colors: Colors) -> list[Any]:
    if not run.comparisons:
        return [Paragraph("No pairwise comparisons in results.json.", muted=True)]
    corrected = any(is_number(c.get("p_holm")) for c in run.comparisons)
    if corrected:
        intro = (f"{method_note(run)}: both models are rescored on the same resampled test rows; two-sided p-values."
                 f" Multiple comparisons: Holm's step-down correction within each metric over all its pairs (it"
                 f" controls the chance of any false positive among them at {fmt.ALPHA}); a difference is called"
                 f" significant when its Holm-adjusted p is below {fmt.ALPHA}.")
    else:
        intro = (f"{method_note(run)}: both models are rescored on the same resampled test rows; two-sided p-values."
                 " This results.json has no Holm-adjusted p-values (re-run `peftlab report` to add them): the raw"
                 " p-values below are not corrected for multiple comparisons.")
    blocks: list[Any] = [Paragraph(intro[0].upper() + intro[1:])]
    metrics = [*run.metrics, *sorted({str(c.get("metric")) for c in run.comparisons} - set(run.metrics))]
    for metric in metrics:
        rows = []
        for a, b in compared_pairs(run):
            item = find_comparison(run, a, b, metric)
            if item is None:
                continue
            decisive = fmt.decisive_p(item)
            rows.append(
                [
                    model_cell(a, colors),
                    model_cell(b, colors),
                    fmt.score(run.quality.get(a, {}).get(metric)),
                    fmt.score(run.quality.get(b, {}).get(metric)),
                    Cell(fmt.signed(item.get("diff")), sub=fmt.interval(item.get("ci"))),
                    fmt.p_value(item.get("p_value")),
                    fmt.p_value(item.get("p_holm")),
                    Cell("yes", bold=True) if fmt.significant(decisive) else ("no" if is_number(decisive) else fmt.MISSING),
                ]
            )
        if not rows:
            continue
        headers = ["A", "B", "A score", "B score", "A − B (95% CI)", "p", "Holm p", "Significant"]
        table = Table(headers, rows, "llrrrrrl", caption=metric_name(metric))
        blocks.append(drop_empty_columns(table) if not corrected else table)
    return blocks


def seed_blocks(run: RunData, colors: Colors) -> list[Any]:
    """Mean and SD over training seeds, and whether each difference exceeds the spread between seeds."""
    metric = run.primary
    models = [m for m in run.evaluated if run.seed_values(m, metric)]
    blocks: list[Any] = [Paragraph(
        f"Each of {fmt.join_names([display(m) for m in models])} was trained once per seed. A difference between two"
        f" models exceeds the spread between seeds when every seed of one scores above every seed of the other;"
        f" otherwise the choice of seed alone could reverse it."
    )]
    rows = []
    for model in models:
        values = run.seed_values(model, metric)
        q = run.quality[model]
        rows.append([model_cell(model, colors), str(len(values)), fmt.score(q.get(metric)),
                     fmt.score(q.get(f"{metric}_sd")), f"{min(values):.4f}–{max(values):.4f}",
                     ", ".join(f"{v:.4f}" for v in values)])
    blocks.append(Table(["Model", "Seeds", f"Mean {metric_name(metric)}", "SD", "Range", "Per seed"], rows,
                        "lrrrrl", caption=f"{metric_name(metric)} over training seeds"))
    pairs = []
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            v = verdict(run, a, b, metric)
            diff = (run.quality[v.better].get(metric) or 0.0) - (run.quality[v.worse].get(metric) or 0.0)
            pairs.append([model_cell(v.better, colors), model_cell(v.worse, colors), fmt.signed(diff),
                          Cell("yes", bold=True) if v.significant else "no"])
    if pairs:
        blocks.append(Table(["Higher mean", "Lower mean", "Difference of means", "Exceeds the seed spread"], pairs,
                            "llrl", caption="Differences against the spread between seeds"))
    return blocks


# ------------------------------------------------------------------------------------------ ensemble


def ensemble_blocks(run: RunData) -> list[Any]:
    block = run.ensemble or {}
    members = [display(str(m)) for m in block.get("members") or []]
    alpha = block.get("alpha")
    intro = f"Members: {', '.join(members) or fmt.MISSING}; mode: {block.get('mode') or fmt.MISSING}; "
    intro += f"chosen α = {alpha:g}." if is_number(alpha) else "no α recorded."
    blocks: list[Any] = [Paragraph(intro)]
    validation = [v for v in block.get("validation") or [] if isinstance(v, dict)]
    if validation:
        rows = [
            [
                Cell(
                    f"{v.get('alpha'):.2f}" if is_number(v.get("alpha")) else fmt.MISSING,
                    bold=v.get("alpha") == alpha,
                ),
                Cell(fmt.score(v.get("bleu4")), bold=v.get("alpha") == alpha),
                Cell(fmt.score(v.get("rougeL")), bold=v.get("alpha") == alpha),
                "✓ chosen" if v.get("alpha") == alpha else "",
            ]
            for v in validation
        ]
        blocks.append(
            Table(
                ["α", "Validation BLEU-4", "Validation ROUGE-L", ""],
                rows,
                "rrrl",
                caption="Validation scores per α",
            )
        )
    return blocks
