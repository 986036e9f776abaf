"""`build_report`: read a run directory and write report.md, a self-contained report.html and plots/.

Plots are drawn into a temporary folder that replaces plots/ only when every figure is written;
report.md and report.html are written through temporary files and renamed, so an interrupted run
never leaves half a file behind.
"""

from __future__ import annotations

from pathlib import Path

from peftlab.report.fmt import assign_colors
from peftlab.report.load import load_run
from peftlab.report.plots import make_plots
from peftlab.report.render_html import render_html
from peftlab.report.render_md import render_markdown
from peftlab.report.sections import build_document
from peftlab.rundir import atomic_dir, write_text


def build_report(run_dir: Path) -> dict[str, Path]:
    """Write the report for `run_dir`; return `{relative name: path}` of every file written.

    Keys are `report.md`, `report.html` and `plots/<name>.png`. Raises `UserError` when the run
    directory has no results.json.
    """
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    colors = assign_colors(run.names, {name: run.kind(name) for name in run.names})
    plot_dir = run_dir / "plots"
    with atomic_dir(plot_dir) as temp:
        plots = make_plots(run, temp, colors)
    document = build_document(run, plots, plot_dir, colors)
    written = {f"plots/{plot.name}": plot_dir / plot.name for plot in plots}
    write_text(run_dir / "report.md", render_markdown(document))
    write_text(run_dir / "report.html", render_html(document))
    return {"report.md": run_dir / "report.md", "report.html": run_dir / "report.html", **written}
