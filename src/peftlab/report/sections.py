"""Build the report's sections (recommendation, findings, tables, figures, examples, data, reproduce)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from peftlab.report import fmt
from peftlab.report.doc import (
    Answer,
    Bullet,
    Bullets,
    Cell,
    Code,
    Document,
    Example,
    Figure,
    Paragraph,
    Section,
    Table,
    cell_text,
)
from peftlab.report.examples import PROMPT_CHARS, last_user_turn, select_examples
from peftlab.report.findings import build_findings, compared_pairs, find_comparison, method_note
from peftlab.report.fmt import display, is_number, metric_name
from peftlab.report.load import BASE, RunData, total_time
from peftlab.report.plots import Plot
from peftlab.report.recommend import recipe_length, recommendation_blocks, verdict

ANSWER_CHARS = 1500
Colors = dict[str, str]


def build_document(run: RunData, plots: list[Plot], plot_dir: Path, colors: Colors) -> Document:
    figures = {p.name: Figure(f"plots/{p.name}", plot_dir / p.name, p.caption) for p in plots}

    def figs(*names: str) -> list[Figure]:
        return [figures[n] for n in names if n in figures]

    sections = [
        Section("recommendation", "Recommendation", recommendation_blocks(run, colors)),
        Section("findings", "Headline findings", [Bullets(build_findings(run))]),
        Section("quality", "Quality", [*quality_blocks(run, colors), *figs("quality.png")]),
        Section(
            "resources",
            "Resources",
            [*resource_blocks(run, colors), *figs("memory_vs_quality.png", "training_speed.png", "loss.png")],
        ),
        Section(
            "per-source", "Quality per source", [*per_source_blocks(run, colors), *figs("per_source.png")]
        ),
        Section("significance", "Pairwise significance", comparison_blocks(run, colors)),
    ]
    if any(run.seed_values(m, run.primary) for m in run.evaluated):
        sections.append(Section("seeds", "Seed repeats", seed_blocks(run, colors)))
    if run.ensemble:
        sections.append(Section("ensemble", "Ensemble weight selection", ensemble_blocks(run)))
    sections += [
        Section("examples", "Qualitative examples", example_blocks(run, colors)),
        Section("data", "Data", data_blocks(run)),
        Section("reproduce", "Reproduce", reproduce_blocks(run)),
    ]
    return Document(f"Fine-tuning study: {run.config.get('name') or run.run_dir.name}", header(run), sections)


def header(run: RunData) -> list[tuple[str, str]]:
    model = run.config.get("model")
    meta = []
    if isinstance(model, dict) and model.get("name_or_path"):
        meta.append(("Model", str(model["name_or_path"])))
    meta.append(("Data", _data_summary(run)))
    meta.append(("Hardware", _hardware(run)))
    methods = [display(m) for m in run.names]
    if methods:
        meta.append(("Models", ", ".join(methods)))
    meta.append(("Run", str(run.run_dir)))
    return meta


def _data_summary(run: RunData) -> str:
    splits = (run.stats or {}).get("splits")
    sources = list((run.stats or {}).get("sources") or {})
    parts = []
    if sources:
        parts.append(f"{len(sources)} sources ({', '.join(sources)})")
    if isinstance(splits, dict):
        sizes = [f"{fmt.integer(s.get('rows'))} {name}" for name, s in splits.items() if isinstance(s, dict)]
        parts.append(" / ".join(sizes) + " rows")
    n = [run.quality[m].get("n") for m in run.evaluated if is_number(run.quality[m].get("n"))]
    if n:
        parts.append(f"scored on {fmt.integer(max(n))} test rows")
    return "; ".join(parts) or "no data statistics"


def _hardware(run: RunData) -> str:
    hardware = run.results.get("hardware") or run.env.get("hardware") or {}
    gpus = {run.training[m].get("gpu_name") for m in run.trained} - {None}
    gpu = hardware.get("gpu") or (", ".join(sorted(map(str, gpus))) if gpus else None)
    cpus = hardware.get("cpu_count")
    text = f"GPU: {gpu}" if gpu else "CPU only (no GPU)"
    if is_number(cpus):
        text += f"; {cpus} CPU cores"
    return text


def _model_cell(name: str, colors: Colors, bold: bool = False) -> Cell:
    return Cell(display(name), bold=bold, color=colors.get(name))


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
                _model_cell(model, colors),
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


# ----------------------------------------------------------------------------------------- resources


def _gpu_cell(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    if is_number(value):
        return fmt.gib(value)
    return "n/a (CPU)" if str(metrics.get("device", "cpu")).startswith("cpu") else fmt.MISSING


def _execution_cell(metrics: dict[str, Any]) -> str:
    """A short account of the execution that ran (peftlab.train.execution), e.g. `fast · padding-free ·
    varlen`; a hybrid: its stages'."""
    execution = metrics.get("execution")
    if not isinstance(execution, dict):
        stages = [s.get("execution") for s in metrics.get("stages") or [] if isinstance(s, dict)]
        described = [_execution_cell(s) for s in stages if isinstance(s, dict)]
        return " / ".join(dict.fromkeys(described)) if described else fmt.MISSING
    parts = [str(execution.get("mode", "?")).replace("_", " ")]
    if execution.get("padding_free"):
        parts.append("padding-free")
    parts.append(str(execution.get("attention", "?")))
    if execution.get("gradient_checkpointing"):
        parts.append("checkpointing")
    return " · ".join(parts)


def resource_blocks(run: RunData, colors: Colors) -> list[Any]:
    speed = generation_speed_table(run, colors)
    if not run.trained:
        return [Paragraph("No training metrics found (train/<method>/metrics.json).", muted=True),
                *([speed] if speed is not None else [])]
    rows = []
    for method in run.trained:
        m = run.training[method]
        rows.append(
            [
                _model_cell(method, colors),
                run.kind(method) or fmt.MISSING,
                _execution_cell(m),
                _gpu_cell(m, "peak_gpu_alloc_gib"),
                _gpu_cell(m, "peak_gpu_reserved_gib"),
                fmt.gib(m.get("peak_rss_gib")),
                fmt.duration(total_time(m)) + (" (resumed)" if m.get("resumed") else ""),
                fmt.rate(m.get("tokens_per_s")),
                fmt.count(m.get("trainable_params")),
                fmt.share(m.get("trainable_params"), m.get("total_params")),
                fmt.integer(m.get("optimizer_steps")),
                fmt.score(m.get("final_loss")),
            ]
        )
    headers = [
        "Model",
        "Kind",
        "Execution",
        "Peak GPU alloc (GiB)",
        "Peak GPU reserved (GiB)",
        "Peak RSS (GiB)",
        "Training time",
        "Tokens/s",
        "Trainable params",
        "% of total",
        "Steps",
        "Final loss",
    ]
    untrained = [display(m) for m in run.evaluated if m not in run.training]
    notes = ["GiB = 2³⁰ bytes. Peak GPU numbers are torch's allocator peaks; RSS is the training process."]
    staged = [display(m) for m in run.trained if run.training[m].get("stages")]
    if staged:
        notes.append(f"Training time of {fmt.join_names(staged)}: every stage, the merge included.")
    if untrained:
        notes.append(
            f"{fmt.join_names(untrained)}: no training run of {'their' if len(untrained) > 1 else 'its'} own."
        )
    notes.append("Execution: how peftlab ran each step (train/<method>/metrics.json `execution`); the recipe"
                 " (rows per step, learning rate, schedule, loss) is the config's.")
    table = Table(headers, rows, "lllrrrrrrrrr", notes=notes)
    if run.cpu_only:
        notes[0] = "GiB = 2³⁰ bytes. No GPU in this run: memory is the training process's peak RSS."
    blocks: list[Any] = [_without_gpu_columns(table) if run.cpu_only else table]
    for method in run.trained:
        stages = [s for s in run.training[method].get("stages") or [] if isinstance(s, dict)]
        if stages:
            stage_table = _stage_table(method, stages)
            blocks.append(_without_gpu_columns(stage_table) if run.cpu_only else stage_table)
    if speed is not None:
        blocks.append(speed)
    return blocks


def _without_gpu_columns(table: Table) -> Table:
    """The table less its GPU columns: on a run without a GPU they would only say so on every row."""
    keep = [i for i, h in enumerate(table.headers) if "GPU" not in h]
    return Table([table.headers[i] for i in keep], [[r[i] for i in keep] for r in table.rows],
                 "".join(table.align[i] for i in keep), caption=table.caption, notes=table.notes)


def generation_speed_table(run: RunData, colors: Colors) -> Table | None:
    """How fast each model's test predictions were generated, and by which decoder."""
    rows = []
    for model in run.evaluated:
        generation = run.eval_metrics.get(model, {}).get("generation")
        if not isinstance(generation, dict):
            continue
        decoder = generation.get("decoder") if isinstance(generation.get("decoder"), dict) else {}
        graphs = (f"{fmt.integer(decoder.get('graph_steps'))} / {fmt.integer(decoder.get('decode_steps'))}"
                  if decoder else fmt.MISSING)
        fallback = decoder.get("cuda_graph_fallback")
        fallback = [str(item) for item in fallback] if isinstance(fallback, list) else [str(fallback)] if fallback else []
        rows.append([
            _model_cell(model, colors),
            _decoder_cell(generation, decoder),
            fmt.integer(generation.get("generated_tokens")),
            fmt.duration(generation.get("seconds")),
            fmt.rate(generation.get("tokens_per_s")),
            fmt.integer(generation.get("batch_size")),
            graphs,
            "yes: " + fmt.truncate(fallback[0], 60) if fallback else "no",
            _memory_retries(decoder),
        ])
    if not rows:
        return None
    headers = ["Model", "Decoder", "Generated tokens", "Time", "Tokens/s", "Rows per batch",
               "Graph replays / decoding steps", "Fell back to eager", "Out of GPU memory"]
    if run.cpu_only:  # CUDA graphs and GPU memory retries do not exist on a CPU
        return Table(headers[:6], [row[:6] for row in rows], "llrrrr", caption="Generation speed (CPU)",
                     notes=["Greedy decoding of the test split on the CPU. static: static KV cache, eager steps;"
                            " generate: plain model.generate."])
    notes = ["Greedy decoding of the test split. static: static KV cache, each step after a batch's first one "
             "CUDA graph replay on a GPU (eager on a CPU); generate: plain model.generate. Out of GPU memory: "
             "times decoding stepped down to fewer batches or rows, and batches decoded eagerly because their "
             "capture did not fit (lower evaluate.max_batch_tokens or concurrent_batches to avoid both)."]
    return Table(headers, rows, "llrrrrrll", caption="Generation speed and GPU decoder", notes=notes)


def _decoder_cell(generation: dict[str, Any], decoder: dict[str, Any]) -> str:
    """The decoder that ran, and why it is not the static one when evaluation fell back to `generate`."""
    kind = str(generation.get("decoder_kind") or ("static" if decoder else "generate"))
    fallback = generation.get("decoder_fallback")
    return f"{kind} ({fmt.truncate(str(fallback), 70)})" if fallback else kind


def _memory_retries(decoder: dict[str, Any]) -> str:
    step_downs, eager = decoder.get("out_of_memory_step_downs"), decoder.get("capture_out_of_memory")
    if not step_downs and not eager:
        return "no" if decoder else fmt.MISSING
    return f"{fmt.integer(step_downs or 0)} step-downs, {fmt.integer(eager or 0)} eager batches"


def _stage_table(method: str, stages: list[dict[str, Any]]) -> Table:
    rows = []
    for index, stage in enumerate(stages):
        merge = stage.get("kind") == "merge" or stage.get("method") == "merge"
        seconds = stage.get("merge_time_s") if merge else stage.get("train_time_s")
        rows.append(
            [
                str(stage.get("stage", index)),
                display(str(stage.get("method", ""))),
                str(stage.get("kind", "")),
                fmt.duration(seconds),
                _gpu_cell(stage, "peak_gpu_alloc_gib")
                if not merge
                else fmt.gib(stage.get("peak_gpu_alloc_gib")),
                fmt.gib(stage.get("peak_rss_gib")),
                fmt.rate(stage.get("tokens_per_s")),
                fmt.count(stage.get("trainable_params")),
                fmt.score(stage.get("final_loss")),
            ]
        )
    headers = [
        "Stage",
        "Method",
        "Kind",
        "Time",
        "Peak GPU alloc (GiB)",
        "Peak RSS (GiB)",
        "Tokens/s",
        "Trainable params",
        "Final loss",
    ]
    return drop_empty_columns(
        Table(headers, rows, "lllrrrrrr", caption=f"{display(method)}: stage breakdown")
    )


def drop_empty_columns(table: Table) -> Table:
    """Remove the columns where no row has a value (every cell is `fmt.MISSING`)."""
    keep = [
        i for i in range(len(table.headers)) if any(cell_text(row[i]) != fmt.MISSING for row in table.rows)
    ]
    return Table(
        [table.headers[i] for i in keep],
        [[row[i] for i in keep] for row in table.rows],
        "".join(table.align[i] for i in keep),
        caption=table.caption,
        notes=table.notes,
    )


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
                    _model_cell(a, colors),
                    _model_cell(b, colors),
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
        rows.append([_model_cell(model, colors), str(len(values)), fmt.score(q.get(metric)),
                     fmt.score(q.get(f"{metric}_sd")), f"{min(values):.4f}–{max(values):.4f}",
                     ", ".join(f"{v:.4f}" for v in values)])
    blocks.append(Table(["Model", "Seeds", f"Mean {metric_name(metric)}", "SD", "Range", "Per seed"], rows,
                        "lrrrrl", caption=f"{metric_name(metric)} over training seeds"))
    pairs = []
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            v = verdict(run, a, b, metric)
            diff = (run.quality[v.better].get(metric) or 0.0) - (run.quality[v.worse].get(metric) or 0.0)
            pairs.append([_model_cell(v.better, colors), _model_cell(v.worse, colors), fmt.signed(diff),
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


# ---------------------------------------------------------------------------------------------- data


def data_blocks(run: RunData) -> list[Any]:
    stats = run.stats
    if not stats:
        return [Paragraph("No data/stats.json in the run directory.", muted=True)]
    blocks: list[Any] = []
    splits = {k: v for k, v in (stats.get("splits") or {}).items() if isinstance(v, dict)}
    if splits:
        sources = sorted({s for split in splits.values() for s in (split.get("per_source") or {})})
        rows = [
            [
                name,
                fmt.integer(split.get("rows")),
                *(fmt.integer((split.get("per_source") or {}).get(s)) for s in sources),
                fmt.integer(split.get("tokens")),
                fmt.rate(split.get("mean_tokens")),
                fmt.integer(split.get("max_tokens")),
            ]
            for name, split in splits.items()
        ]
        headers = ["Split", "Rows", *sources, "Tokens", "Mean tokens", "Max tokens"]
        blocks.append(
            Table(headers, rows, "l" + "r" * (len(headers) - 1), caption="Splits (rows per source)")
        )
    sources = {k: v for k, v in (stats.get("sources") or {}).items() if isinstance(v, dict)}
    rows = []
    for source, per_split in sources.items():
        for split, s in per_split.items():
            if isinstance(s, dict):
                rows.append(
                    [
                        source,
                        split,
                        fmt.integer(s.get("sampled")),
                        _dropped(s.get("dropped")),
                        fmt.integer(s.get("truncated")),
                        fmt.integer(s.get("usable")),
                        fmt.integer(s.get("selected")),
                    ]
                )
    if rows:
        headers = ["Source", "Split", "Sampled", "Dropped", "Truncated", "Usable", "Selected"]
        blocks.append(Table(headers, rows, "llrrrrr", caption="Preparation per source"))
    return blocks or [Paragraph("data/stats.json has no splits or sources.", muted=True)]


def _dropped(dropped: object) -> str:
    if is_number(dropped):
        return fmt.integer(dropped)
    if not isinstance(dropped, dict):
        return fmt.MISSING
    counts = {k: v for k, v in dropped.items() if is_number(v) and v}
    total = sum(counts.values())
    if not counts:
        return "0"
    return f"{fmt.integer(total)} (" + ", ".join(f"{k}: {fmt.integer(v)}" for k, v in counts.items()) + ")"


# ----------------------------------------------------------------------------------------- reproduce


def reproduce_blocks(run: RunData) -> list[Any]:
    command = reproduce_command(run)
    blocks: list[Any] = [
        Paragraph("Re-run the whole study (finished stages are skipped), then rebuild this report:"),
        Code(f"{command}\npeftlab report {shlex.quote(_run_dir_argument(run))}"),
    ]
    if run.env.get("command"):
        blocks.append(Paragraph(f"This run was started with: {run.env['command']}", muted=True))
    methods = run.config.get("methods")
    if isinstance(methods, dict) and methods:
        blocks.append(_methods_table(methods))
    versions = run.results.get("versions") or run.env.get("versions") or {}
    if isinstance(versions, dict) and versions:
        blocks.append(Paragraph("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."))
    facts = []
    hardware = run.results.get("hardware") or run.env.get("hardware") or {}
    if isinstance(hardware, dict):
        facts += [f"{k}: {v}" for k, v in hardware.items() if v is not None]
    if run.env.get("git_commit"):
        facts.append(f"git commit: {run.env['git_commit']}")
    if facts:
        blocks.append(Bullets([Bullet(f) for f in facts]))
    return blocks


def _run_dir_argument(run: RunData) -> str:
    """The run directory as the recorded command named it (--out), else as this report was built."""
    args = _recorded_args(run)
    for i, arg in enumerate(args):
        if arg == "--out" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--out="):
            return arg.removeprefix("--out=")
    return str(run.run_dir)


def _recorded_args(run: RunData) -> list[str]:
    command = run.env.get("command")
    if not isinstance(command, str):
        return []
    try:
        return shlex.split(command)[1:]
    except ValueError:
        return command.split()[1:]


def reproduce_command(run: RunData) -> str:
    """`peftlab study CONFIG [--set K=V ...] --out RUN`: the recorded command's config (repo-relative, or a
    shipped config's name), every --set override in order, and the run directory."""
    args = _recorded_args(run)
    overrides = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--set"]
    overrides += [a.removeprefix("--set=") for a in args if a.startswith("--set=")]
    parts = ["peftlab", "study", config_argument(run)]
    for item in overrides:
        parts += ["--set", item]
    parts += ["--out", _run_dir_argument(run)]
    return " ".join(shlex.quote(p) for p in parts[:3]) + "".join(
        f" \\\n  {shlex.quote(parts[i])} {shlex.quote(parts[i + 1])}" for i in range(3, len(parts), 2)
    )


def config_argument(run: RunData) -> str:
    """The study config as a command argument: a shipped config's name, a path relative to the repository
    (or working directory) holding it, else the run's own config.resolved.yaml."""
    recorded = run.env.get("config_file")
    if not isinstance(recorded, str) or not recorded:
        return str(run.run_dir / "config.resolved.yaml")
    path = Path(recorded)
    from peftlab.config import BUILTIN_CONFIG_DIR

    if path.is_absolute() and path.parent.resolve() == BUILTIN_CONFIG_DIR.resolve():
        return path.stem
    if not path.is_absolute():
        return recorded
    for root in (Path.cwd(), *_repository_roots(path)):
        try:
            return str(path.relative_to(root))
        except ValueError:
            continue
    return recorded


def _repository_roots(path: Path) -> list[Path]:
    return [parent for parent in path.parents if (parent / ".git").exists() or (parent / "pyproject.toml").is_file()]


def _methods_table(methods: dict[str, Any]) -> Table:
    rows = []
    for name, m in methods.items():
        if not isinstance(m, dict):
            continue
        stages = [st for st in m.get("stages") or [] if isinstance(st, dict)]
        if stages:  # each stage runs its own method's recipe: the hybrid's own epochs, LR and batch are unused
            trained = [st for st in stages if st.get("method") != "merge"]
            own = [methods.get(st.get("method")) if isinstance(methods.get(st.get("method")), dict) else {}
                   for st in trained]
            lrs = [f"{display(str(st.get('method')))} {o['lr']:g}" for st, o in zip(trained, own, strict=True)
                   if is_number(o.get("lr"))]
            batches = [f"{display(str(st.get('method')))} {_batch(o)}" for st, o in zip(trained, own, strict=True)
                       if _batch(o)]
            rows.append([display(name), str(m.get("kind", "")), recipe_length(m, methods),
                         ", ".join(lrs) or fmt.MISSING, ", ".join(batches) or fmt.MISSING, _method_details(m)])
            continue
        lr = m.get("lr")
        rows.append(
            [
                display(name),
                str(m.get("kind", "")),
                recipe_length(m, methods),
                f"{lr:g}" if is_number(lr) else fmt.MISSING,
                _batch(m) or fmt.MISSING,
                _method_details(m),
            ]
        )
    return Table(
        ["Method", "Kind", "Length", "LR", "Batch × accum", "Details"],
        rows,
        "llllll",
        caption="Training recipes (from the resolved config)",
        notes=["A staged method runs each stage with that method's recipe (its LR, batch and settings) for the"
               " stage's own length."] if any(isinstance(m, dict) and m.get("stages") for m in methods.values()) else [],
    )


def _batch(m: dict[str, Any]) -> str:
    if is_number(m.get("batch_size")) and is_number(m.get("grad_accum")):
        return f"{m['batch_size']} × {m['grad_accum']}"
    return ""


def _method_details(m: dict[str, Any]) -> str:
    kind = m.get("kind")
    if kind in ("qlora", "lora"):
        text = "LoRA " + _settings(m.get("lora"), {"r": "r", "alpha": "α", "dropout": "dropout"})
        quant = (m.get("quant") or {}).get("quant_type") if isinstance(m.get("quant"), dict) else None
        return text + (f", {quant}" if kind == "qlora" and quant else "")
    if kind == "galore":
        return "GaLore " + _settings(
            m.get("galore"), {"rank": "rank", "update_proj_gap": "gap", "scale": "scale"}
        )
    if kind == "hybrid":
        stages = [display(str(s.get("method"))) for s in m.get("stages") or [] if isinstance(s, dict)]
        return " → ".join(stages)
    return ""


def _settings(block: object, names: dict[str, str]) -> str:
    """`r=16, α=32` from the keys of a settings mapping that are present."""
    if not isinstance(block, dict):
        return ""
    return ", ".join(f"{label}={block[key]}" for key, label in names.items() if block.get(key) is not None)
