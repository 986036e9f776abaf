"""The report's figures, drawn with matplotlib's Agg backend into PNG files.

Figures are built with `matplotlib.figure.Figure` directly (no pyplot), so no global figure state is
created; styling is applied inside `matplotlib.rc_context` and does not leak. Each model keeps one
colour in every figure (see `fmt.assign_colors`). Each plot function returns `None` when the run has
nothing to draw for it (no training metrics, empty loss curves, ...).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from peftlab.report import fmt
from peftlab.report.fmt import display, is_number, metric_name
from peftlab.report.load import BASE, RunData

DPI = 110
METRICS = ("bleu4", "rougeL")
STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.grid.axis": "y",
    "axes.axisbelow": True,
    "grid.alpha": 0.35,
    "legend.frameon": False,
    "legend.fontsize": 9,
    "figure.facecolor": "white",
}
LINESTYLES = ("-", "--", ":", "-.")


@dataclass
class Plot:
    name: str
    caption: str


Colors = dict[str, str]


def make_plots(run: RunData, folder: Path, colors: Colors) -> list[Plot]:
    """Draw every figure the run has data for into `folder`; return them in report order."""
    makers: list[Callable[[RunData, Colors, Path], Plot | None]] = [
        quality_bars,
        memory_vs_quality,
        loss_curves,
        training_speed,
        per_source_bars,
    ]
    plots = []
    with matplotlib.rc_context(STYLE):
        for maker in makers:
            plot = maker(run, colors, folder)
            if plot is not None:
                plots.append(plot)
    return plots


def save(fig: Figure, path: Path) -> None:
    """Write the PNG through a temporary file and rename it into place."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(temp, dpi=DPI, format="png", facecolor="white")
    os.replace(temp, path)


def _xticks(ax: Axes, names: Sequence[str]) -> None:
    ax.set_xticks(range(len(names)), [display(n) for n in names])
    if sum(len(display(n)) for n in names) > 60:
        ax.tick_params(axis="x", labelrotation=20)


# ------------------------------------------------------------------------------------------- quality


def quality_bars(run: RunData, colors: Colors, folder: Path) -> Plot | None:
    models = [m for m in run.evaluated if any(is_number(run.quality[m].get(x)) for x in METRICS)]
    if not models:
        return None
    fig = Figure(figsize=(10, 3.9), layout="constrained")
    for ax, metric in zip(fig.subplots(1, 2), METRICS, strict=True):
        _metric_panel(ax, run, models, metric, colors)
    save(fig, folder / "quality.png")
    return Plot("quality.png", "BLEU-4 and ROUGE-L on the test split; error bars are 95% bootstrap CIs.")


def _metric_panel(ax: Axes, run: RunData, models: list[str], metric: str, colors: Colors) -> None:
    values, lows, highs = [], [], []
    for model in models:
        value = run.quality[model].get(metric)
        value = value if is_number(value) else 0.0
        ci = run.quality[model].get(f"{metric}_ci")
        ok = isinstance(ci, list) and len(ci) == 2 and all(map(is_number, ci))
        values.append(value)
        lows.append(max(0.0, value - ci[0]) if ok else 0.0)
        highs.append(max(0.0, ci[1] - value) if ok else 0.0)
    x = np.arange(len(models))
    ax.bar(
        x,
        values,
        width=0.62,
        color=[colors[m] for m in models],
        yerr=[lows, highs],
        capsize=4,
        error_kw={"elinewidth": 1, "ecolor": "#333333"},
    )
    tops = [v + h for v, h in zip(values, highs, strict=True)]
    ceiling = max(tops) if max(tops) > 0 else 1.0
    for i, model in enumerate(models):
        text = fmt.score(run.quality[model].get(metric))
        ax.text(
            i,
            tops[i] + ceiling * 0.02,
            "n/a" if text == fmt.MISSING else text,
            ha="center",
            va="bottom",
            fontsize=8.5,
        )
    ax.set_ylim(0, ceiling * 1.15)
    ax.set_title(f"{metric_name(metric)} (95% CI)")
    _xticks(ax, models)


def memory_vs_quality(run: RunData, colors: Colors, folder: Path) -> Plot | None:
    candidates = [m for m in run.trained if m in run.quality and is_number(run.quality[m].get("rougeL"))]
    on_gpu = bool(candidates) and all(
        is_number(run.training[m].get("peak_gpu_alloc_gib")) for m in candidates
    )
    key = "peak_gpu_alloc_gib" if on_gpu else "peak_rss_gib"
    points = [m for m in candidates if is_number(run.training[m].get(key))]
    if not points:
        return None
    fig = Figure(figsize=(8, 4.6), layout="constrained")
    ax = fig.subplots()
    ax.grid(True, axis="both")
    for model in points:
        x, y = run.training[model][key], run.quality[model]["rougeL"]
        ci = run.quality[model].get("rougeL_ci")
        if isinstance(ci, list) and len(ci) == 2 and all(map(is_number, ci)):
            ax.errorbar(
                [x],
                [y],
                yerr=[[max(0.0, y - ci[0])], [max(0.0, ci[1] - y)]],
                fmt="none",
                ecolor=colors[model],
                alpha=0.5,
                capsize=3,
            )
        ax.scatter([x], [y], s=90, color=colors[model], edgecolor="white", linewidth=1.2, zorder=3)
        ax.annotate(
            display(model),
            (x, y),
            xytext=(8, 6),
            textcoords="offset points",
            fontsize=9.5,
            fontweight="bold",
            color=colors[model],
        )
    base = run.quality.get(BASE, {}).get("rougeL")
    if is_number(base):
        ax.axhline(base, color=colors.get(BASE, "#7f7f7f"), linestyle="--", linewidth=1)
        ax.annotate(
            f"Base ROUGE-L {base:.4f}",
            (0, base),
            xycoords=("axes fraction", "data"),
            xytext=(4, 4),
            textcoords="offset points",
            fontsize=8.5,
            color="#555555",
        )
    xmax = max(run.training[m][key] for m in points)
    ax.set_xlim(0, xmax * 1.25 if xmax > 0 else 1)
    xlabel = (
        "Peak GPU memory allocated (GiB)" if on_gpu else "Peak process RSS (GiB) — no GPU memory recorded"
    )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ROUGE-L")
    ax.set_title("Memory vs quality")
    save(fig, folder / "memory_vs_quality.png")
    what = (
        "peak GPU memory allocated"
        if on_gpu
        else "peak process RSS (training ran without GPU memory numbers)"
    )
    return Plot("memory_vs_quality.png", f"ROUGE-L against {what}; the dashed line is Base.")


# ------------------------------------------------------------------------------------------ training


def _segments(curve: list[dict[str, Any]]) -> list[tuple[str | None, np.ndarray, np.ndarray]]:
    """Split a loss curve by stage; a stage whose steps restart is placed after the previous one."""
    points = [p for p in curve if is_number(p.get("step")) and is_number(p.get("loss"))]
    groups: list[tuple[str | None, list[dict[str, Any]]]] = []
    for point in points:
        stage = point.get("stage")
        stage = str(stage) if stage is not None else None
        if groups and groups[-1][0] == stage:
            groups[-1][1].append(point)
        else:
            groups.append((stage, [point]))
    segments = []
    last_x = None
    for stage, group in groups:
        steps = np.array([p["step"] for p in group], dtype=float)
        if last_x is not None and steps[0] <= last_x:
            steps = steps - steps[0] + last_x + 1
        segments.append((stage, steps, np.array([p["loss"] for p in group], dtype=float)))
        last_x = steps[-1]
    return segments


def loss_curves(run: RunData, colors: Colors, folder: Path) -> Plot | None:
    curves = {m: _segments(run.training[m].get("loss_curve") or []) for m in run.trained}
    curves = {m: s for m, s in curves.items() if s}
    if not curves:
        return None
    fig = Figure(figsize=(10, 4.4), layout="constrained")
    ax = fig.subplots()
    ax.grid(True, axis="both")
    for model, segments in curves.items():
        for index, (stage, x, y) in enumerate(segments):
            label = display(model) if stage is None else f"{display(model)} · {stage}"
            _loss_line(ax, x, y, colors[model], LINESTYLES[index % len(LINESTYLES)], label)
            if index > 0:
                ax.axvline(x[0], color=colors[model], linestyle=":", linewidth=1, alpha=0.6)
    ax.set_xlabel(
        "Optimizer step" + (" (stages end to end)" if any(len(s) > 1 for s in curves.values()) else "")
    )
    ax.set_ylabel("Training loss")
    ax.set_title("Training loss")
    ax.legend(loc="upper right", ncol=2 if sum(len(s) for s in curves.values()) > 4 else 1)
    save(fig, folder / "loss.png")
    return Plot(
        "loss.png", "Training loss per method (hybrid stages marked; long curves smoothed, raw values faint)."
    )


def _loss_line(ax: Axes, x: np.ndarray, y: np.ndarray, color: str, style: str, label: str) -> None:
    if len(y) <= 60:
        ax.plot(
            x, y, color=color, linestyle=style, linewidth=1.6, label=label, marker="o" if len(y) < 3 else None
        )
        return
    window = max(2, len(y) // 40)
    smooth = np.convolve(y, np.ones(window) / window, mode="valid")
    ax.plot(x, y, color=color, linewidth=0.7, alpha=0.22)
    ax.plot(x[window - 1 :], smooth, color=color, linestyle=style, linewidth=1.7, label=label)


def training_speed(run: RunData, colors: Colors, folder: Path) -> Plot | None:
    methods = [
        m
        for m in run.trained
        if any(is_number(run.training[m].get(k)) for k in ("train_time_s", "tokens_per_s"))
    ]
    if not methods:
        return None
    fig = Figure(figsize=(10, 3.9), layout="constrained")
    time_ax, rate_ax = fig.subplots(1, 2)
    _time_panel(time_ax, run, methods, colors)
    rates = [run.training[m].get("tokens_per_s") for m in methods]
    bars = rate_ax.bar(
        range(len(methods)),
        [r if is_number(r) else 0 for r in rates],
        width=0.62,
        color=[colors[m] for m in methods],
    )
    rate_ax.bar_label(
        bars, labels=[fmt.rate(r) if is_number(r) else "n/a" for r in rates], padding=2, fontsize=8.5
    )
    rate_ax.set_ylim(0, max([r for r in rates if is_number(r)] or [1]) * 1.15)
    rate_ax.set_title("Training throughput (tokens/s)")
    _xticks(rate_ax, methods)
    save(fig, folder / "training_speed.png")
    return Plot(
        "training_speed.png", "Training wall time (hybrid split into its stages) and training throughput."
    )


def _stage_times(metrics: dict[str, Any]) -> list[tuple[str, float]]:
    parts = []
    for stage in metrics.get("stages") or []:
        if not isinstance(stage, dict):
            continue
        seconds = stage.get("train_time_s", stage.get("merge_time_s"))
        if is_number(seconds):
            parts.append(
                (str(stage.get("method") or stage.get("kind") or stage.get("stage")), float(seconds))
            )
    total = metrics.get("train_time_s")
    if parts and is_number(total) and total - sum(s for _, s in parts) > 0.01 * total:
        parts.append(("other", total - sum(s for _, s in parts)))
    return parts


def _time_panel(ax: Axes, run: RunData, methods: list[str], colors: Colors) -> None:
    totals, heights = [], []
    for method in methods:
        metrics = run.training[method]
        stacked = sum(s for _, s in _stage_times(metrics))
        total = metrics.get("train_time_s")
        totals.append(float(total) if is_number(total) else stacked)
        heights.append(max(totals[-1], stacked))
    peak = max(heights) if heights and max(heights) > 0 else 1.0
    unit, scale = ("s", 1.0) if peak < 120 else ("min", 60.0) if peak < 7200 else ("h", 3600.0)
    for i, method in enumerate(methods):
        parts = _stage_times(run.training[method]) or [("", totals[i])]
        bottom = 0.0
        for j, (name, seconds) in enumerate(parts):
            height = seconds / scale
            ax.bar(
                i,
                height,
                bottom=bottom,
                width=0.62,
                color=colors[method],
                alpha=1.0 - 0.28 * (j % 3),
                edgecolor="white",
                linewidth=1,
            )
            if name and height > 0.08 * peak / scale:
                ax.text(
                    i,
                    bottom + height / 2,
                    name,
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white",
                    fontweight="bold",
                )
            bottom += height
        ax.text(
            i,
            heights[i] / scale + peak / scale * 0.02,
            fmt.short_duration(totals[i]),
            ha="center",
            va="bottom",
            fontsize=8.5,
        )
    ax.set_ylim(0, peak / scale * 1.15)
    ax.set_ylabel(unit)
    ax.set_title("Training time")
    _xticks(ax, methods)


# ---------------------------------------------------------------------------------------- per source


def per_source_bars(run: RunData, colors: Colors, folder: Path) -> Plot | None:
    models = [m for m in run.evaluated if isinstance(run.quality[m].get("per_source"), dict)]
    sources = sorted({s for m in models for s in run.quality[m]["per_source"]})
    if not sources:
        return None
    fig = Figure(figsize=(10, 6.4), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    width = 0.8 / len(models)
    for ax, metric in zip(axes, METRICS, strict=True):
        for k, model in enumerate(models):
            values = [run.quality[model]["per_source"].get(s, {}).get(metric) for s in sources]
            x = np.arange(len(sources)) - 0.4 + width * (k + 0.5)
            ax.bar(
                x,
                [v if is_number(v) else 0 for v in values],
                width=width * 0.92,
                color=colors[model],
                label=display(model),
            )
        ax.set_ylabel(metric_name(metric))
        ax.set_title(f"{metric_name(metric)} per source")
    axes[-1].set_xticks(range(len(sources)), sources)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save(fig, folder / "per_source.png")
    return Plot("per_source.png", "BLEU-4 and ROUGE-L per data source.")
