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
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from peftlab.report import fmt
from peftlab.report.fmt import display, is_number, metric_name
from peftlab.report.load import BASE, RunData, stage_times, total_time
from peftlab.report.recommend import memory_peaks

DPI = 110
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
    metrics = run.metrics
    models = [m for m in run.evaluated if any(is_number(run.quality[m].get(x)) for x in metrics)]
    if not models:
        return None
    fig = Figure(figsize=(3.6 * len(metrics) + 0.6, 3.9), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        _metric_panel(ax, run, models, metric, colors)
    save(fig, folder / "quality.png")
    names = fmt.join_names([metric_name(m) for m in metrics])
    seeds = any(run.seed_values(m, run.primary) for m in models)
    bars = "error bars are 95% bootstrap CIs" + ("; models trained with several seeds: mean ± SD over seeds" if seeds else "")
    return Plot("quality.png", f"{names} on the test split; {bars}.")


def _spread(run: RunData, model: str, metric: str, value: float) -> tuple[float, float]:
    """(below, above) the value: the SD over seeds when the model has several, else its 95% CI."""
    q = run.quality[model]
    if run.seed_values(model, metric) and is_number(q.get(f"{metric}_sd")):
        return q[f"{metric}_sd"], q[f"{metric}_sd"]
    ci = q.get(f"{metric}_ci")
    if isinstance(ci, list) and len(ci) == 2 and all(map(is_number, ci)):
        return max(0.0, value - ci[0]), max(0.0, ci[1] - value)
    return 0.0, 0.0


def _zero_marks(ax: Axes, x: Sequence[float], values: Sequence[float], width: float, colors: Sequence[str]) -> None:
    """A bar of height 0 is invisible: draw a thick stroke in its colour on the baseline instead."""
    for xi, value, color in zip(x, values, colors, strict=True):
        if value == 0:
            ax.plot([xi - width / 2, xi + width / 2], [0, 0], color=color, linewidth=4, solid_capstyle="butt",
                    clip_on=False, zorder=4)


def _metric_panel(ax: Axes, run: RunData, models: list[str], metric: str, colors: Colors) -> None:
    values, lows, highs = [], [], []
    for model in models:
        value = run.quality[model].get(metric)
        value = float(value) if is_number(value) else 0.0
        low, high = _spread(run, model, metric, value)
        values.append(value)
        lows.append(low)
        highs.append(high)
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
    _zero_marks(ax, x, values, 0.62, [colors[m] for m in models])
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
    ax.set_title(metric_name(metric))
    _xticks(ax, models)


def memory_vs_quality(run: RunData, colors: Colors, folder: Path) -> Plot | None:
    metric = run.primary
    peaks = {m: x for m, x in memory_peaks(run).items() if is_number(run.quality.get(m, {}).get(metric))}
    if not peaks:
        return None
    fig = Figure(figsize=(8, 4.6), layout="constrained")
    ax = fig.subplots()
    ax.grid(True, axis="both")
    for model, x in peaks.items():
        y = float(run.quality[model][metric])
        low, high = _spread(run, model, metric, y)
        if low or high:
            ax.errorbar([x], [y], yerr=[[low], [high]], fmt="none", ecolor=colors[model], alpha=0.5, capsize=3)
        marker = "D" if model == "ensemble" else "o"
        ax.scatter([x], [y], s=90, marker=marker, color=colors[model], edgecolor="white", linewidth=1.2, zorder=3)
    base = run.quality.get(BASE, {}).get(metric)
    if is_number(base):
        ax.axhline(base, color=colors.get(BASE, "#7f7f7f"), linestyle="--", linewidth=1)
        ax.annotate(
            f"Base {metric_name(metric)} {base:.4f}",
            (0, base),
            xycoords=("axes fraction", "data"),
            xytext=(4, 4),
            textcoords="offset points",
            fontsize=8.5,
            color="#555555",
        )
    xmax = max(peaks.values())
    ax.set_xlim(0, xmax * 1.3 if xmax > 0 else 1)
    low, high = ax.get_ylim()
    margin = 0.08 * (high - low)
    lowest = min([float(run.quality[m][metric]) for m in peaks] + ([float(base)] if is_number(base) else []))
    # Base's line and every point inside the axes with room for labels; below 0 only to show a score of 0.
    ax.set_ylim(max(min(low, lowest - margin), -margin), high)
    _label_points(fig, ax, {m: (x, float(run.quality[m][metric])) for m, x in peaks.items()}, colors)
    ax.set_xlabel("Peak GPU memory allocated while training (GiB)" if run.on_gpu
                  else "Peak process RSS while training (GiB); no GPU")
    ax.set_ylabel(metric_name(metric))
    ax.set_title("Memory vs quality")
    save(fig, folder / "memory_vs_quality.png")
    what = "peak GPU memory allocated" if run.on_gpu else "peak process RSS (this run trained without a GPU)"
    ensemble = "; the ensemble (diamond) at the larger of its members' peaks" if "ensemble" in peaks else ""
    return Plot("memory_vs_quality.png", f"{metric_name(metric)} against {what}{ensemble}; the dashed line is Base.")


def _label_points(fig: Figure, ax: Axes, points: dict[str, tuple[float, float]], colors: Colors) -> None:
    """Name each point next to it, trying positions around the point until the label overlaps no other
    label and no marker (in display space, so it holds at any axis scale)."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw_without_rendering()
    markers = [ax.transData.transform(xy) for xy in points.values()]
    placed: list[Any] = []
    offsets = [(8, 6), (8, -14), (-8, 6), (-8, -14), (8, 20), (8, -28), (-8, 20), (-8, -28), (8, 34), (8, -42)]
    for model, xy in sorted(points.items(), key=lambda item: item[1]):
        for dx, dy in offsets:
            text = ax.annotate(display(model), xy, xytext=(dx, dy), textcoords="offset points", fontsize=9.5,
                               fontweight="bold", color=colors[model], ha="left" if dx > 0 else "right")
            box = text.get_window_extent(renderer).expanded(1.05, 1.15)
            hits_marker = any(box.x0 - 5 <= mx <= box.x1 + 5 and box.y0 - 5 <= my <= box.y1 + 5 for mx, my in markers)
            if not hits_marker and not any(box.overlaps(other) for other in placed):
                placed.append(box)
                break
            text.remove()
        else:  # every position taken: keep the first one
            text = ax.annotate(display(model), xy, xytext=offsets[0], textcoords="offset points", fontsize=9.5,
                               fontweight="bold", color=colors[model])
            placed.append(text.get_window_extent(renderer))


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
            label = display(model) if stage is None else f"{display(model)} · {display(stage)}"
            _loss_line(ax, x, y, colors[model], LINESTYLES[index % len(LINESTYLES)], label)
            if index > 0:
                boundary = (segments[index - 1][1][-1] + x[0]) / 2
                ax.axvline(boundary, color=colors[model], linestyle=":", linewidth=1.2, alpha=0.8)
                previous = segments[index - 1][0]
                ax.annotate(
                    f"{display(model)}: {display(str(previous))} → {display(str(stage))}",
                    (boundary, 1.0),
                    xycoords=("data", "axes fraction"),
                    xytext=(3, -3),
                    textcoords="offset points",
                    rotation=90,
                    ha="left",
                    va="top",
                    fontsize=8.5,
                    color=colors[model],
                )
    ax.set_xlabel(
        "Optimizer step" + (" (stages end to end)" if any(len(s) > 1 for s in curves.values()) else "")
    )
    ax.set_ylabel("Training loss")
    ax.set_title("Training loss")
    ax.legend(loc="upper right", ncol=2 if sum(len(s) for s in curves.values()) > 4 else 1)
    save(fig, folder / "loss.png")
    return Plot(
        "loss.png", "Training loss per optimizer step (a staged method's stages end to end, the boundary dotted and"
        " labelled; long curves smoothed, raw values faint)."
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
        if total_time(run.training[m]) is not None or is_number(run.training[m].get("tokens_per_s"))
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
    rate_ax.set_ylabel("tokens/s")
    rate_ax.set_title("Training throughput")
    _xticks(rate_ax, methods)
    save(fig, folder / "training_speed.png")
    return Plot(
        "training_speed.png",
        "Training wall time as in the Resources table (a staged method split into its stages, the merge included)"
        " and training throughput.",
    )


def _time_parts(metrics: dict[str, Any]) -> list[tuple[str, float]]:
    """The stacked segments of one bar: the stages (merge included) plus any time outside them."""
    parts = stage_times(metrics)
    total = total_time(metrics)
    if parts and total is not None and total - sum(s for _, s in parts) > 0.01 * total:
        parts.append(("other", total - sum(s for _, s in parts)))
    return parts


def _time_panel(ax: Axes, run: RunData, methods: list[str], colors: Colors) -> None:
    totals = [total_time(run.training[m]) or 0.0 for m in methods]
    peak = max(totals) if totals and max(totals) > 0 else 1.0
    unit = fmt.time_unit(peak)
    scale = unit[1]
    for i, method in enumerate(methods):
        parts = _time_parts(run.training[method]) or [("", totals[i])]
        bottom = 0.0
        for j, (name, seconds) in enumerate(parts):
            height = seconds / scale
            ax.bar(i, height, bottom=bottom, width=0.62, color=colors[method], alpha=1.0 - 0.28 * (j % 3),
                   edgecolor="white", linewidth=1)
            if name and height > 0.08 * peak / scale:
                ax.text(i, bottom + height / 2, display(name), ha="center", va="center", fontsize=8,
                        color="white", fontweight="bold")
            elif name:  # too thin to hold its name: label it beside the bar
                ax.annotate(f"{display(name)} {fmt.short_duration(seconds)}", (i + 0.31, bottom + height / 2),
                            xytext=(6, 0), textcoords="offset points", va="center", fontsize=7.5,
                            color="#333333", arrowprops={"arrowstyle": "-", "color": "#777777", "lw": 0.8})
            bottom += height
        ax.text(i, totals[i] / scale + peak / scale * 0.02, fmt.duration_in(totals[i], unit), ha="center",
                va="bottom", fontsize=8.5)
    ax.set_ylim(0, peak / scale * 1.15)
    ax.set_ylabel(unit[0])
    ax.set_title("Training time")
    _xticks(ax, methods)


# ---------------------------------------------------------------------------------------- per source


def per_source_bars(run: RunData, colors: Colors, folder: Path) -> Plot | None:
    models = [m for m in run.evaluated if isinstance(run.quality[m].get("per_source"), dict)]
    sources = sorted({s for m in models for s in run.quality[m]["per_source"]})
    if not sources:
        return None
    metrics = run.metrics
    fig = Figure(figsize=(10, 1.2 + 2.6 * len(metrics)), layout="constrained")
    axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    width = 0.8 / len(models)
    for ax, metric in zip(axes, metrics, strict=True):
        for k, model in enumerate(models):
            values = [run.quality[model]["per_source"].get(s, {}).get(metric) for s in sources]
            heights = [float(v) if is_number(v) else 0.0 for v in values]
            x = np.arange(len(sources)) - 0.4 + width * (k + 0.5)
            ax.bar(x, heights, width=width * 0.92, color=colors[model], label=display(model))
            _zero_marks(ax, x, [h if is_number(v) else None for h, v in zip(heights, values, strict=True)],
                        width * 0.92, [colors[model]] * len(sources))
        ax.set_ylabel(metric_name(metric))
        ax.set_title(f"{metric_name(metric)} per source")
        top = max((float(run.quality[m]["per_source"].get(s, {}).get(metric) or 0) for m in models for s in sources),
                  default=0.0)
        ax.set_ylim(0, top * 1.12 if top > 0 else 1.0)
    axes[-1].set_xticks(range(len(sources)), sources)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save(fig, folder / "per_source.png")
    return Plot("per_source.png", f"{fmt.join_names([metric_name(m) for m in metrics])} per data source"
                " (a zero score is a thick stroke on the baseline).")
