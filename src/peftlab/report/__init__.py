"""peftlab.report: the study report (report.md, a self-contained report.html and plots/) of a run directory.

`build_report(run_dir)` reads results.json (required), train/*/metrics.json, eval/*/ and
data/stats.json, and writes everything atomically. See `peftlab.report.build`.
"""

from peftlab.report.build import build_report

__all__ = ["build_report"]
