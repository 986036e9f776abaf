"""Number and name formatting shared by the report's tables, findings and plots.

Every formatter accepts `None` (a number the run did not record) and returns `MISSING` for it, so
callers never special-case partial results.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

MISSING = "—"
ALPHA = 0.05
"""Significance threshold for the paired bootstrap p-values."""

DISPLAY_NAMES = {
    "base": "Base",
    "qlora": "QLoRA",
    "lora": "LoRA",
    "galore": "GaLore",
    "hybrid": "Hybrid",
    "ensemble": "Ensemble",
    "full": "Full FT",
    "merge": "merge",
}
METRIC_NAMES = {
    "bleu4": "BLEU-4",
    "rougeL": "ROUGE-L",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "exact_match": "Exact match",
    "exact_match_norm": "Normalised EM",
}
LEGACY_METRICS = ("rougeL", "bleu4")
"""The metrics a results.json without a "metrics" list leads with (what peftlab compared before)."""

# Fixed colours for the usual model names, then a pool for anything else (tab10 order).
MODEL_COLORS = {
    "base": "#7f7f7f",
    "qlora": "#1f77b4",
    "galore": "#2ca02c",
    "hybrid": "#9467bd",
    "ensemble": "#ff7f0e",
    "lora": "#17becf",
    "full": "#d62728",
}
COLOR_POOL = ("#8c564b", "#e377c2", "#bcbd22", "#17becf", "#d62728", "#1f77b4", "#2ca02c", "#9467bd")


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def display(name: str) -> str:
    """A model or method name as shown to readers (`qlora` -> `QLoRA`; unknown names unchanged)."""
    return DISPLAY_NAMES.get(name, name)


def metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric)


def assign_colors(names: Iterable[str], kinds: dict[str, str] | None = None) -> dict[str, str]:
    """One colour per name: by name, else by method kind, else the next unused colour of the pool."""
    kinds = kinds or {}
    colors: dict[str, str] = {}
    for name in names:
        preferred = MODEL_COLORS.get(name) or MODEL_COLORS.get(kinds.get(name, ""))
        if preferred is None or preferred in colors.values():
            free = [c for c in (*COLOR_POOL, *MODEL_COLORS.values()) if c not in colors.values()]
            preferred = free[0] if free else COLOR_POOL[len(colors) % len(COLOR_POOL)]
        colors[name] = preferred
    return colors


def lead_metrics(results: dict, config: dict) -> list[str]:
    """results.json "metrics", else the config's evaluate.metrics, else `LEGACY_METRICS`."""
    evaluate = config.get("evaluate") if isinstance(config.get("evaluate"), dict) else {}
    for candidate in (results.get("metrics"), evaluate.get("metrics")):
        if isinstance(candidate, list) and candidate and all(m in METRIC_NAMES for m in candidate):
            return list(candidate)
    return list(LEGACY_METRICS)


def score(value: object, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if is_number(value) else MISSING


def signed(value: object, digits: int = 4) -> str:
    if not is_number(value):
        return MISSING
    if round(value, digits) == 0:
        value = 0.0  # no "−0.0000"
    text = f"{value:+.{digits}f}"
    return text.replace("-", "−")


def percent_change(diff: object, reference: object) -> str:
    if not (is_number(diff) and is_number(reference)) or reference == 0:
        return "n/a"
    return f"{100.0 * diff / reference:+.1f}%".replace("-", "−")


def interval(ci: object, digits: int = 4) -> str:
    if not (isinstance(ci, Sequence) and len(ci) == 2 and all(is_number(v) for v in ci)):
        return MISSING
    low, high = (f"{v if round(v, digits) else 0.0:.{digits}f}".replace("-", "−") for v in ci)
    return f"[{low}, {high}]"


def p_value(value: object) -> str:
    """`<0.001`, three decimals below 0.1 (so 0.049 never reads as 0.05), else two."""
    if not is_number(value):
        return MISSING
    if value < 0.001:
        return "<0.001"
    return f"{value:.3f}" if value < 0.1 else f"{value:.2f}"


def p_clause(value: object) -> str:
    """`p=0.31` or `p<0.001`."""
    text = p_value(value)
    return f"p{text}" if text.startswith("<") else f"p={text}"


def p_pair(item: dict) -> str:
    """`p=0.012, Holm-adjusted p=0.048` (or the raw p alone when no adjusted one is recorded)."""
    text = p_clause(item.get("p_value"))
    if is_number(item.get("p_holm")):
        text += f", Holm-adjusted {p_clause(item['p_holm'])}"
    return text


def decisive_p(item: dict) -> object:
    """The p-value significance is judged by: Holm-adjusted when recorded, else the raw one."""
    return item.get("p_holm") if is_number(item.get("p_holm")) else item.get("p_value")


def significant(value: object) -> bool:
    return is_number(value) and value < ALPHA


def gib(value: object) -> str:
    return f"{value:.2f}" if is_number(value) else MISSING


def integer(value: object) -> str:
    return f"{round(value):,}" if is_number(value) else MISSING


def rate(value: object) -> str:
    if not is_number(value):
        return MISSING
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def time_unit(seconds: float) -> tuple[str, float]:
    """One unit for a set of durations whose largest is `seconds`: (`s`|`min`|`h`, seconds per unit)."""
    return ("s", 1.0) if seconds < 120 else ("min", 60.0) if seconds < 7200 else ("h", 3600.0)


def duration_in(seconds: object, unit: tuple[str, float]) -> str:
    """A duration in a given unit: `42.0 s`, `12.4 min`."""
    if not is_number(seconds):
        return MISSING
    return f"{seconds / unit[1]:.1f} {unit[0]}"


def duration(seconds: object) -> str:
    """`42.0 s`, `745 s (12.4 min)` or `9,000 s (2.50 h)`."""
    if not is_number(seconds):
        return MISSING
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds:,.0f} s ({seconds / 60:.1f} min)"
    return f"{seconds:,.0f} s ({seconds / 3600:.2f} h)"


def short_duration(seconds: object) -> str:
    """The most readable single unit: `42.0 s`, `12.4 min`, `2.50 h`."""
    if not is_number(seconds):
        return MISSING
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def count(value: object) -> str:
    """A parameter count in readable units: `1.23M`, `268.1M`, `1.00B`."""
    if not is_number(value):
        return MISSING
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= size:
            scaled = value / size
            return f"{scaled:.2f}{suffix}" if scaled < 100 else f"{scaled:.1f}{suffix}"
    return f"{value:.0f}"


def share(part: object, total: object) -> str:
    if not (is_number(part) and is_number(total)) or total <= 0:
        return MISSING
    pct = 100.0 * part / total
    return f"{pct:.2f}%" if pct < 10 else f"{pct:.1f}%"


def join_names(names: Sequence[str]) -> str:
    """`A`, `A and B`, `A, B and C`."""
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def truncate(text: str, limit: int) -> str:
    """At most about `limit` characters, cut at a word boundary when one is near, with an ellipsis."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    if space > limit * 0.8:
        cut = cut[:space]
    return cut.rstrip() + " …"
