"""The report's sections in reading order: `build_document` assembles the recommendation
(`report.recommend`), the headline findings (`report.findings`) and the sections of this package
(quality, resources, examples, provenance) with their figures; `header` gives the run's summary lines.
"""

from __future__ import annotations

from pathlib import Path

from peftlab.report import fmt
from peftlab.report.doc import Bullets, Document, Figure, Section
from peftlab.report.findings import build_findings
from peftlab.report.fmt import display, is_number
from peftlab.report.load import RunData
from peftlab.report.plots import Plot
from peftlab.report.recommend import recommendation_blocks
from peftlab.report.sections.cells import Colors
from peftlab.report.sections.examples import example_blocks
from peftlab.report.sections.provenance import data_blocks, reproduce_blocks
from peftlab.report.sections.quality import (
    comparison_blocks,
    ensemble_blocks,
    per_source_blocks,
    quality_blocks,
    seed_blocks,
)
from peftlab.report.sections.resources import resource_blocks


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
