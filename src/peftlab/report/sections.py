"""Build the report's sections (findings, tables, figures, examples, data, reproduce) from a `RunData`."""

from __future__ import annotations

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
from peftlab.report.load import BASE, RunData
from peftlab.report.plots import Plot

ANSWER_CHARS = 1500
Colors = dict[str, str]


def build_document(run: RunData, plots: list[Plot], plot_dir: Path, colors: Colors) -> Document:
    figures = {p.name: Figure(f"plots/{p.name}", plot_dir / p.name, p.caption) for p in plots}

    def figs(*names: str) -> list[Figure]:
        return [figures[n] for n in names if n in figures]

    sections = [
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


def quality_blocks(run: RunData, colors: Colors) -> list[Any]:
    models = run.evaluated
    if not models:
        return [Paragraph("No model has been evaluated yet.", muted=True)]
    best = {
        m: max((run.quality[x].get(m) for x in models if is_number(run.quality[x].get(m))), default=None)
        for m in ("bleu4", "rougeL")
    }
    base = run.quality.get(BASE, {})
    rows = []
    for model in models:
        q = run.quality[model]
        rows.append(
            [
                _model_cell(model, colors),
                fmt.integer(q.get("n")),
                Cell(fmt.score(q.get("bleu4")), bold=q.get("bleu4") == best["bleu4"] and len(models) > 1),
                fmt.interval(q.get("bleu4_ci")),
                Cell(fmt.score(q.get("rougeL")), bold=q.get("rougeL") == best["rougeL"] and len(models) > 1),
                fmt.interval(q.get("rougeL_ci")),
                _delta(run, model, base, "bleu4"),
                _delta(run, model, base, "rougeL"),
                fmt.score(q.get("rouge1")),
                fmt.score(q.get("rouge2")),
            ]
        )
    headers = [
        "Model",
        "n",
        "BLEU-4",
        "BLEU-4 95% CI",
        "ROUGE-L",
        "ROUGE-L 95% CI",
        "Δ BLEU-4 vs Base",
        "Δ ROUGE-L vs Base",
        "ROUGE-1",
        "ROUGE-2",
    ]
    notes = ["Best score per metric in bold. Δ is absolute, with the relative change in parentheses."]
    if BASE in run.quality:
        notes.append(f"* the difference from Base is significant (p < {fmt.ALPHA}, {method_note(run)}).")
    return [Table(headers, rows, "lrrrrrrrrr", notes=notes)]


def _delta(run: RunData, model: str, base: dict[str, Any], metric: str) -> str:
    if model == BASE or not base:
        return fmt.MISSING
    value, ref = run.quality[model].get(metric), base.get(metric)
    if not (is_number(value) and is_number(ref)):
        return fmt.MISSING
    item = find_comparison(run, model, BASE, metric)
    star = "*" if item is not None and fmt.significant(item.get("p_value")) else ""
    return f"{fmt.signed(value - ref)} ({fmt.percent_change(value - ref, ref)}){star}"


# ----------------------------------------------------------------------------------------- resources


def _gpu_cell(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    if is_number(value):
        return fmt.gib(value)
    return "n/a (CPU)" if str(metrics.get("device", "cpu")).startswith("cpu") else fmt.MISSING


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
                _gpu_cell(m, "peak_gpu_alloc_gib"),
                _gpu_cell(m, "peak_gpu_reserved_gib"),
                fmt.gib(m.get("peak_rss_gib")),
                fmt.duration(m.get("train_time_s")),
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
    if untrained:
        notes.append(
            f"{fmt.join_names(untrained)}: no training run of {'their' if len(untrained) > 1 else 'its'} own."
        )
    blocks: list[Any] = [Table(headers, rows, "llrrrrrrrrr", notes=notes)]
    for method in run.trained:
        stages = [s for s in run.training[method].get("stages") or [] if isinstance(s, dict)]
        if stages:
            blocks.append(_stage_table(method, stages))
    if speed is not None:
        blocks.append(speed)
    return blocks


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
    notes = ["Greedy decoding of the test split. static: static KV cache, each step after a batch's first one "
             "CUDA graph replay on a GPU (eager on a CPU); generate: plain model.generate. Out of GPU memory: "
             "times decoding stepped down to fewer batches or rows, and batches decoded eagerly because their "
             "capture did not fit (lower evaluate.max_batch_tokens or concurrent_batches to avoid both)."]
    return Table(headers, rows, "llrrrrrll", notes=notes)


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
    for metric in ("bleu4", "rougeL"):
        rows = []
        for source in sources:
            cells = {m: run.quality[m]["per_source"].get(source, {}) for m in models}
            values = [c.get(metric) for c in cells.values() if is_number(c.get(metric))]
            top = max(values) if len(values) > 1 else None
            n = next((c.get("n") for c in cells.values() if is_number(c.get("n"))), None)
            rows.append(
                [source, fmt.integer(n)]
                + [
                    Cell(
                        fmt.score(cells[m].get(metric)), bold=top is not None and cells[m].get(metric) == top
                    )
                    for m in models
                ]
            )
        headers = ["Source", "n", *(display(m) for m in models)]
        blocks.append(
            Table(headers, rows, "lr" + "r" * len(models), caption=f"{metric_name(metric)} per source")
        )
    blocks[-1].notes.append("Best model per source in bold.")
    return blocks


# ---------------------------------------------------------------------------------------- comparisons


def comparison_blocks(run: RunData, colors: Colors) -> list[Any]:
    if not run.comparisons:
        return [Paragraph("No pairwise comparisons in results.json.", muted=True)]
    rows = []
    for a, b in compared_pairs(run):
        for metric in ("bleu4", "rougeL"):
            item = find_comparison(run, a, b, metric)
            if item is None:
                continue
            p = item.get("p_value")
            rows.append(
                [
                    _model_cell(a, colors),
                    _model_cell(b, colors),
                    metric_name(metric),
                    fmt.score(run.quality.get(a, {}).get(metric)),
                    fmt.score(run.quality.get(b, {}).get(metric)),
                    fmt.signed(item.get("diff")),
                    fmt.interval(item.get("ci")),
                    fmt.p_value(p),
                    Cell("yes", bold=True) if fmt.significant(p) else ("no" if is_number(p) else fmt.MISSING),
                ]
            )
    headers = [
        "A",
        "B",
        "Metric",
        "A score",
        "B score",
        "Diff (A − B)",
        "95% CI of diff",
        "p-value",
        f"p < {fmt.ALPHA}",
    ]
    note = (
        f"{method_note(run)}: both systems are rescored on the same resampled rows; two-sided p-value. "
        "No correction for multiple comparisons."
    )
    return [Table(headers, rows, "lllrrrrrl", notes=[note[0].upper() + note[1:]])]


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
            "(ROUGE-L F-measure against the reference is shown per answer)."
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
    config_file = run.env.get("config_file") or str(run.run_dir / "config.resolved.yaml")
    commands = f"peftlab study {config_file}\npeftlab report {run.run_dir}"
    blocks: list[Any] = [
        Paragraph("Re-run the whole study (finished stages are skipped), then rebuild this report:"),
        Code(commands),
    ]
    if run.env.get("command"):
        blocks.append(Paragraph(f"This run was started with: {run.env['command']}", muted=True))
    methods = run.config.get("methods")
    if isinstance(methods, dict) and methods:
        blocks.append(_methods_table(methods))
    versions = run.results.get("versions") or run.env.get("versions") or {}
    if isinstance(versions, dict) and versions:
        rows = [[str(k), str(v)] for k, v in versions.items()]
        blocks.append(Table(["Package", "Version"], rows, "ll", caption="Versions"))
    facts = []
    hardware = run.results.get("hardware") or run.env.get("hardware") or {}
    if isinstance(hardware, dict):
        facts += [f"{k}: {v}" for k, v in hardware.items() if v is not None]
    if run.env.get("git_commit"):
        facts.append(f"git commit: {run.env['git_commit']}")
    if facts:
        blocks.append(Bullets([Bullet(f) for f in facts]))
    return blocks


def _methods_table(methods: dict[str, Any]) -> Table:
    rows = []
    for name, m in methods.items():
        if not isinstance(m, dict):
            continue
        steps, epochs, lr = m.get("max_steps"), m.get("epochs"), m.get("lr")
        length = (
            f"{steps} steps"
            if is_number(steps) and steps > 0
            else f"{epochs:g} epoch{'' if epochs == 1 else 's'}"
            if is_number(epochs)
            else ""
        )
        batch = (
            f"{m['batch_size']} × {m['grad_accum']}"
            if is_number(m.get("batch_size")) and is_number(m.get("grad_accum"))
            else ""
        )
        rows.append(
            [
                display(name),
                str(m.get("kind", "")),
                length or fmt.MISSING,
                f"{lr:g}" if is_number(lr) else fmt.MISSING,
                batch or fmt.MISSING,
                _method_details(m),
            ]
        )
    return Table(
        ["Method", "Kind", "Length", "LR", "Batch × accum", "Details"],
        rows,
        "lllrrl",
        caption="Training recipes (from the resolved config)",
    )


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
        stages = [str(s.get("method")) for s in m.get("stages") or [] if isinstance(s, dict)]
        return " → ".join(stages)
    return ""


def _settings(block: object, names: dict[str, str]) -> str:
    """`r=16, α=32` from the keys of a settings mapping that are present."""
    if not isinstance(block, dict):
        return ""
    return ", ".join(f"{label}={block[key]}" for key, label in names.items() if block.get(key) is not None)
