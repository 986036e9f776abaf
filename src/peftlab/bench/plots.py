"""The bench report's figures: loss curves per method and profile, and speed beside peak memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_loss_curves(runs: list[dict[str, Any]], path: Path) -> Path | None:
    """One panel per method: the loss per optimizer step of every profile (quality must not move)."""
    from matplotlib.figure import Figure

    methods = list(dict.fromkeys(r["method"] for r in runs if r.get("loss_curve")))
    if not methods:
        return None
    figure = Figure(figsize=(4.2 * len(methods), 3.2), layout="constrained")
    for axis, method in zip(figure.subplots(1, len(methods), squeeze=False)[0], methods, strict=True):
        for run in (r for r in runs if r["method"] == method and r.get("loss_curve")):
            steps = [p["step"] for p in run["loss_curve"]]
            axis.plot(steps, [p["loss"] for p in run["loss_curve"]], marker=".", label=run["profile"])
        axis.set_title(method)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("training loss")
        axis.legend(frameon=False)
    figure.savefig(path, dpi=110)
    return path


def plot_speed_and_memory(runs: list[dict[str, Any]], path: Path) -> Path | None:
    """Side by side per run (method / profile): steady tokens/s and peak allocated memory, the
    references hatched, each bar labelled with its value: the bench table at a glance."""
    from matplotlib.figure import Figure

    rows = [r for r in runs if r.get("steady_tokens_per_s") or r.get("tokens_per_s")]
    if not rows:
        return None
    labels = [f"{r['method']} / {r['profile']}" for r in rows]
    panels = [("steady tokens/s (median step)", [r.get("steady_tokens_per_s") or r["tokens_per_s"] for r in rows],
               "{:,.0f}", "linear")]
    if all(r.get("peak_alloc_gib") for r in rows):  # no GPU: no peak to draw
        # Log scale: the low-memory peaks (1-9 GiB) stay visible beside the fast profiles' ~50 GiB.
        panels.append(("peak allocated GiB (log scale)", [r["peak_alloc_gib"] for r in rows], "{:.2f}", "log"))
    figure = Figure(figsize=(5.2 * len(panels), 0.42 * len(rows) + 1.2), layout="constrained")
    for axis, (title, values, fmt, scale) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        axis.set_xscale(scale)
        bars = axis.barh(range(len(rows)), values, color=["#bbbbbb" if r["profile"] == "reference" else "#4878a8"
                                                          for r in rows])
        for bar, run in zip(bars, rows, strict=True):
            if run["profile"] == "reference":
                bar.set_hatch("//")
        axis.bar_label(bars, labels=[fmt.format(v) for v in values], padding=3, fontsize=8)
        axis.set_yticks(range(len(rows)), labels if axis is figure.axes[0] else [""] * len(rows), fontsize=8)
        axis.invert_yaxis()
        axis.set_title(title, fontsize=10)
        if scale == "log":
            ticks = [t for t in (0.5, 1, 2, 5, 10, 20, 50, 100, 200) if min(values) / 2 <= t <= max(values) * 2]
            axis.set_xlim(min(values) / 2, max(values) * 2.5)
            axis.set_xticks(ticks, [f"{t:g}" for t in ticks])
            axis.minorticks_off()
        else:
            axis.margins(x=0.25)
    figure.savefig(path, dpi=110)
    return path
