"""Statistics over per-row metric scores: point estimates with 95% percentile-bootstrap confidence
intervals (`summarize`, `summarize_table` per source), paired bootstrap tests between two systems
scored on the same rows (`paired_bootstrap`) and Holm's correction for a family of such tests
(`holm_adjust`). The per-row scores themselves come from `peftlab.evaluate.metrics`.

Confidence intervals are 95% percentile bootstrap intervals: rows are resampled with replacement
(``numpy.random.default_rng(seed)``), BLEU-4 is recomputed from the resample's summed statistics and
ROUGE-L and the exact matches as resample means. `paired_bootstrap` compares two systems on the same
rows with the same resampled indices for both; `holm_adjust` corrects a family of its p-values for
multiple comparisons (Holm's step-down).

Every function is deterministic for a given (rows, samples, seed): resampling uses only
``numpy.random.default_rng(seed)``, never global random state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from peftlab.evaluate.metrics import (
    EXACT_TYPES,
    METRICS,
    Metric,
    RowScores,
    bleu_from_stats,
    bleu_from_stats_batch,
)

_BOOTSTRAP_CHUNK_CELLS = 4_000_000  # resamples x rows drawn per chunk (bounds peak memory to ~130 MB)


# ------------------------------------------------------------------------------------------- bootstrap


def _check_samples(samples: int) -> None:
    if samples < 1:
        raise ValueError(f"bootstrap samples must be >= 1, got {samples}")


def _bootstrap_sums(columns: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """Column sums of `samples` resamples (rows drawn with replacement), shape ``(samples, k)``.

    Each resample is turned into per-row counts (bincount), so the sums are one matrix product.
    """
    n = len(columns)
    rng = np.random.default_rng(seed)
    values = np.asarray(columns, dtype=np.float64)
    chunk = max(1, _BOOTSTRAP_CHUNK_CELLS // n)
    out = []
    for start in range(0, samples, chunk):
        b = min(chunk, samples - start)
        idx = rng.integers(0, n, size=(b, n))
        flat = (idx + (np.arange(b, dtype=np.int64) * n)[:, None]).ravel()
        weights = np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)
        out.append(weights @ values)
    return np.concatenate(out, axis=0)


def _metric_columns(
    scores: RowScores, metric: Metric
) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """The per-row columns a metric sums and the function from column sums to metric values."""
    n = len(scores)
    if metric == "bleu4":
        return scores.bleu_stats, bleu_from_stats_batch
    return _row_values(scores, metric)[:, None], lambda sums: sums[:, 0] / n


def _row_values(scores: RowScores, metric: str) -> np.ndarray:
    """The per-row values of a mean-over-rows metric."""
    if metric not in METRICS or metric == "bleu4":
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    values = getattr(scores, metric)
    if values is None:
        raise ValueError(f"{metric}: these scores were built without exact-match values")
    return values


def _point(scores: RowScores, metric: Metric) -> float:
    if metric == "bleu4":
        return bleu_from_stats(scores.bleu_stats.sum(axis=0))
    return float(_row_values(scores, metric).mean())


def _percentile_ci(values: np.ndarray) -> list[float]:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def summarize(scores: RowScores, *, bootstrap_samples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Point estimates and 95% percentile-bootstrap CIs for BLEU-4, ROUGE-L and the exact matches.

    Returns ``{"n", "bleu4", "bleu4_ci", "rougeL", "rougeL_ci", "rouge1", "rouge2"}`` plus, when the
    scores carry them, ``"exact_match", "exact_match_ci", "exact_match_norm", "exact_match_norm_ci"``
    and ``"exact_match_count", "exact_match_norm_count"`` (matching rows). Every CI uses the same
    resamples (the resampled rows do not depend on which metrics are summarised). Deterministic for a
    given (rows, `bootstrap_samples`, `seed`).
    """
    if len(scores) == 0:
        raise ValueError("cannot summarize zero rows")
    _check_samples(bootstrap_samples)
    with_ci: list[Metric] = ["bleu4", "rougeL", *(EXACT_TYPES if scores.has_exact_match else ())]
    columns = [_metric_columns(scores, metric) for metric in with_ci]
    sums = _bootstrap_sums(np.hstack([cols for cols, _ in columns]), bootstrap_samples, seed)
    out: dict[str, Any] = {"n": len(scores)}
    start = 0
    for metric, (cols, fn) in zip(with_ci, columns, strict=True):
        width = cols.shape[1]
        out[metric] = _point(scores, metric)
        out[f"{metric}_ci"] = _percentile_ci(fn(sums[:, start : start + width]))
        start += width
    out["rouge1"] = float(scores.rouge1.mean())
    out["rouge2"] = float(scores.rouge2.mean())
    if scores.has_exact_match:
        for metric in EXACT_TYPES:
            out[f"{metric}_count"] = int(_row_values(scores, metric).sum())
    return out


def paired_bootstrap(
    a: RowScores, b: RowScores, metric: Metric, *, samples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Paired bootstrap comparison of systems `a` and `b` scored on the same rows in the same order.

    Each resample draws one set of row indices (with replacement) and recomputes the metric for both
    systems on it (corpus BLEU-4 from summed statistics, or mean ROUGE-L), giving resampled
    differences ``d* = metric(a*) - metric(b*)``.

    The p-value is the two-sided percentile-bootstrap p-value with the usual add-one correction
    (Davison & Hinkley 1997)::

        p = min(1, 2 * min(1 + #{d* <= 0}, 1 + #{d* >= 0}) / (samples + 1))

    i.e. (up to the add-one) the smallest alpha at which the (1 - alpha) percentile interval of the
    difference excludes 0. It is 1 for identical systems, never exactly 0, and at least
    ``2 / (samples + 1)``.

    Returns ``{"metric", "a", "b", "diff", "p_value", "ci"}`` where `a`, `b` and `diff` (= a - b) are
    the observed full-data values and `ci` is the 95% percentile interval of the difference.
    """
    if len(a) != len(b):
        raise ValueError(f"paired bootstrap needs the same rows: {len(a)} vs {len(b)} rows")
    if len(a) == 0:
        raise ValueError("cannot compare zero rows")
    _check_samples(samples)
    cols_a, fn = _metric_columns(a, metric)
    cols_b, _ = _metric_columns(b, metric)
    sums = _bootstrap_sums(np.hstack([cols_a, cols_b]), samples, seed)
    width = cols_a.shape[1]
    diffs = fn(sums[:, :width]) - fn(sums[:, width:])
    at_or_below = int(np.count_nonzero(diffs <= 0)) + 1
    at_or_above = int(np.count_nonzero(diffs >= 0)) + 1
    value_a, value_b = _point(a, metric), _point(b, metric)
    return {
        "metric": metric,
        "a": value_a,
        "b": value_b,
        "diff": value_a - value_b,
        "p_value": min(1.0, 2.0 * min(at_or_below, at_or_above) / (samples + 1)),
        "ci": _percentile_ci(diffs),
    }


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the order given.

    The k-th smallest p (k = 1..m) becomes ``max over j <= k of min(1, (m - j + 1) * p_(j))``; a
    hypothesis is rejected at level alpha when its adjusted p is below alpha, which controls the
    family-wise error rate for any dependence between the tests. Written here because statsmodels'
    `multipletests` is not a dependency and scipy offers only Benjamini-Hochberg / Yekutieli.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[index])))
        adjusted[index] = running
    return adjusted


# -------------------------------------------------------------------------------------------- tables


def summarize_table(
    scores: RowScores, sources: Sequence[str] | None = None, *, bootstrap_samples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """`summarize` of all rows, plus ``"per_source": {source: summarize(rows of source)}``.

    Sources are listed in sorted order; every block uses the same `seed`.
    """
    table = summarize(scores, bootstrap_samples=bootstrap_samples, seed=seed)
    if sources is None:
        return table
    if len(sources) != len(scores):
        raise ValueError(f"{len(sources)} source labels for {len(scores)} rows")
    labels = np.asarray(sources, dtype=object)
    table["per_source"] = {
        source: summarize(
            scores.subset(np.flatnonzero(labels == source)), bootstrap_samples=bootstrap_samples, seed=seed
        )
        for source in sorted(set(sources))
    }
    return table
