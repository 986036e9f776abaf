"""The Recommendation section: which method to use for a memory budget, in plain words.

Memory is each trained method's measured training peak: GPU memory allocated when every method
recorded one (a GPU run), else the training process's peak RSS (a CPU run); the section says which.
The ensemble needs both members trained (one after the other), so its budget is the larger member
peak. Each method's peak defines a budget "≤ X GiB"; the best method that fits it is the one with
the highest score on the ranking metric (the first of `evaluate.metrics`).

Two models "differ significantly" when the paired bootstrap's Holm-adjusted p-value is below
`fmt.ALPHA` (the raw p when results.json predates the correction); with several training seeds
for both, when every seed of one scores above every seed of the other (the difference exceeds the
spread between seeds). The recommended method is the one with the least memory among those not
significantly behind the best.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftlab.report import fmt
from peftlab.report.doc import Bullet, Bullets, Cell, Paragraph, Table
from peftlab.report.findings import find_comparison
from peftlab.report.fmt import display, is_number, metric_name
from peftlab.report.load import BASE, RunData

Colors = dict[str, str]


@dataclass
class Verdict:
    """Whether `better` scores significantly above `worse` on `metric`, and the sentence that says it."""

    better: str
    worse: str
    metric: str
    significant: bool | None  # None: no test recorded
    text: str


def memory_peaks(run: RunData) -> dict[str, float]:
    """{model: training peak in GiB} for every evaluated model with a measured peak (see module docstring)."""
    key = run.memory_key
    peaks = {
        m: float(run.training[m][key])
        for m in run.trained
        if m in run.quality and is_number(run.training[m].get(key))
    }
    block = run.ensemble or {}
    members = [str(m) for m in block.get("members") or []]
    trained_members = [m for m in members if m != BASE]
    if "ensemble" in run.quality and trained_members and all(m in peaks for m in trained_members):
        peaks["ensemble"] = max(peaks[m] for m in trained_members)
    return peaks


def memory_basis(run: RunData) -> str:
    if run.on_gpu:
        gpus = sorted({str(run.training[m].get("gpu_name")) for m in run.trained if run.training[m].get("gpu_name")})
        where = f" on {', '.join(gpus)}" if gpus else ""
        return (f"Memory is each method's peak GPU memory allocated while training{where} (torch's allocator peak;"
                " the card also holds the CUDA context and cached blocks).")
    return ("This run trained without a GPU, so memory is the training process's peak RSS (resident CPU memory,"
            " which includes the Python runtime and the data), not GPU memory: a GPU run needs its own numbers.")


def score_of(run: RunData, name: str, metric: str) -> float | None:
    value = run.quality.get(name, {}).get(metric)
    return float(value) if is_number(value) else None


def score_text(run: RunData, name: str, metric: str) -> str:
    """`0.1492 [0.1310, 0.1694]`, or `0.1492 ± 0.0040 (3 seeds)` for a model trained with several seeds."""
    q = run.quality.get(name, {})
    seeds = run.seed_values(name, metric)
    if seeds and is_number(q.get(f"{metric}_sd")):
        return f"{fmt.score(q.get(metric))} ± {fmt.score(q[f'{metric}_sd'])} ({len(seeds)} seeds)"
    ci = fmt.interval(q.get(f"{metric}_ci"))
    return fmt.score(q.get(metric)) + ("" if ci == fmt.MISSING else f" {ci}")


def _score_cell(run: RunData, name: str, metric: str) -> Cell:
    text = score_text(run, name, metric)
    score, _, spread = text.partition(" ")
    return Cell(score, sub=spread or None)


def verdict(run: RunData, a: str, b: str, metric: str) -> Verdict:
    """Compare `a` and `b` on `metric` (see the module docstring for "significantly")."""
    va, vb = score_of(run, a, metric), score_of(run, b, metric)
    better, worse = (a, b) if (va or 0.0) >= (vb or 0.0) else (b, a)
    name = metric_name(metric)
    seeds_b, seeds_w = run.seed_values(better, metric), run.seed_values(worse, metric)
    if seeds_b and seeds_w:
        if min(seeds_b) > max(seeds_w):
            return Verdict(better, worse, metric, True,
                           f"{display(better)} scores above {display(worse)} on {name} with every seed"
                           f" ({len(seeds_b)} and {len(seeds_w)} seeds): the difference exceeds the spread between seeds")
        return Verdict(better, worse, metric, False,
                       f"{display(better)} and {display(worse)} do not differ beyond the spread between seeds on {name}"
                       f" (seed ranges {_range(seeds_b)} and {_range(seeds_w)} overlap)")
    item = find_comparison(run, better, worse, metric)
    if item is None or not is_number(fmt.decisive_p(item)):
        return Verdict(better, worse, metric, None,
                       f"{display(better)} and {display(worse)} were not tested against each other on {name}")
    diff = f"{fmt.signed(item.get('diff'))}, {fmt.p_pair(item)}"
    if fmt.significant(fmt.decisive_p(item)):
        return Verdict(better, worse, metric, True,
                       f"{display(better)} scores significantly higher than {display(worse)} on {name} ({diff})")
    return Verdict(better, worse, metric, False,
                   f"{display(better)} and {display(worse)} do not differ significantly on {name} ({diff})")


def _range(values: list[float]) -> str:
    return f"{min(values):.4f}–{max(values):.4f}"


def recommendation_blocks(run: RunData, colors: Colors) -> list[Any]:
    metric = run.primary
    peaks = {m: v for m, v in memory_peaks(run).items() if score_of(run, m, metric) is not None}
    if not peaks:
        return [Paragraph("No trained model has both a score and a measured memory peak: nothing to recommend yet.",
                          muted=True)]
    blocks: list[Any] = [Paragraph(
        f"Ranked by {metric_name(metric)} (the first of evaluate.metrics: {', '.join(map(metric_name, run.metrics))}). "
        + memory_basis(run)
        + (" Ensemble: the larger of its members' training peaks (they train one after another; generating holds"
           " both models)." if "ensemble" in peaks else "")
    )]
    blocks.append(budget_table(run, peaks, metric, colors))
    bullets = [Bullet(v.text + ".") for v in verdicts(run, peaks, metric)]
    bullets += [Bullet(flag) for flag in budget_flags(run)]
    if bullets:
        blocks.append(Bullets(bullets))
    blocks.append(Paragraph(recommendation_sentence(run, peaks, metric), strong=True))
    return blocks


def budget_table(run: RunData, peaks: dict[str, float], metric: str, colors: Colors) -> Table:
    unit = "GPU" if run.on_gpu else "RSS"
    rows = []
    # One row per distinct budget as printed (peaks that round alike share a row, at the larger of them).
    budgets = {fmt.gib(v): v for v in sorted(peaks.values())}
    for budget in budgets.values():
        fits = [m for m in peaks if peaks[m] <= budget]
        best = max(fits, key=lambda m: (score_of(run, m, metric), -peaks[m]))
        others = [m for m in fits if m != best]
        if others:
            runner_up = max(others, key=lambda m: (score_of(run, m, metric), -peaks[m]))
            versus = verdict(run, best, runner_up, metric).text
        else:
            versus = f"only {display(best)} fits"
        rows.append([
            f"≤ {fmt.gib(budget)} GiB",
            ", ".join(display(m) for m in sorted(fits, key=lambda m: peaks[m])),
            Cell(display(best), bold=True, color=colors.get(best)),
            _score_cell(run, best, metric),
            fmt.gib(peaks[best]),
            versus,
        ])
    headers = [f"{unit} memory budget", "Fits", "Best that fits", f"{metric_name(metric)}", "Its peak (GiB)",
               "Against the next best that fits"]
    corrected = any(is_number(c.get("p_holm")) for c in run.comparisons)
    test = "paired bootstrap, Holm-corrected per metric" if corrected else "paired bootstrap (uncorrected: no Holm p-values recorded)"
    notes = [f"Under each score its 95% bootstrap CI (or SD over seeds). Significance: {test}, p < {fmt.ALPHA}."]
    return Table(headers, rows, "lllrrl", caption=f"Best method per memory budget ({unit} peak while training)",
                 notes=notes)


def verdicts(run: RunData, peaks: dict[str, float], metric: str) -> list[Verdict]:
    """The best model on `metric` against every other scored model (Base included), best first."""
    scored = [m for m in run.evaluated if score_of(run, m, metric) is not None]
    if len(scored) < 2:
        return []
    best = max(scored, key=lambda m: (score_of(run, m, metric), -peaks.get(m, 0.0)))
    return [verdict(run, best, other, metric) for other in scored if other != best]


def recommendation_sentence(run: RunData, peaks: dict[str, float], metric: str) -> str:
    name = metric_name(metric)
    unit = "GPU" if run.on_gpu else "RSS"
    best = max(peaks, key=lambda m: (score_of(run, m, metric), -peaks[m]))
    close = [m for m in peaks if m == best or not verdict(run, best, m, metric).significant]
    pick = min(close, key=lambda m: (peaks[m], -score_of(run, m, metric)))
    base = score_of(run, BASE, metric)
    caveat = ""
    if base is not None and not verdict(run, pick, BASE, metric).significant:
        caveat = f"; note that it does not score significantly above Base on {name}"
    if pick == best and len(close) == 1:
        return (f"Recommendation: {display(best)}, the highest {name} ({fmt.score(score_of(run, best, metric))}),"
                f" significantly above every other method, at {fmt.gib(peaks[best])} GiB {unit} peak{caveat}.")
    if pick == best:
        tied = any(score_of(run, m, metric) == score_of(run, best, metric) for m in peaks if m != best)
        return (f"Recommendation: {display(best)}, {'tied for ' if tied else ''}the highest {name}"
                f" ({fmt.score(score_of(run, best, metric))})"
                f" and the least memory ({fmt.gib(peaks[best])} GiB {unit} peak) of the methods within noise of it"
                f"{caveat}.")
    return (f"Recommendation: {display(pick)} ({fmt.gib(peaks[pick])} GiB {unit} peak, {name}"
            f" {fmt.score(score_of(run, pick, metric))}): {display(best)} scores higher"
            f" ({fmt.score(score_of(run, best, metric))}) but not significantly, and needs {fmt.gib(peaks[best])} GiB"
            f"{caveat}.")


# ------------------------------------------------------------------------------------- training budgets


def recipe_length(method: dict[str, Any], methods: dict[str, Any]) -> str:
    """`1 epoch`, `40 steps`, or for a staged method each stage's length joined by `+`."""
    stages = [s for s in method.get("stages") or [] if isinstance(s, dict)]
    if stages:
        parts = []
        for stage in stages:
            if stage.get("method") == "merge":
                continue
            own = methods.get(stage.get("method")) if isinstance(methods.get(stage.get("method")), dict) else {}
            merged = {**own, **{k: v for k, v in stage.items() if v is not None and k in ("epochs", "max_steps")}}
            if is_number(stage.get("epochs")) and not is_number(stage.get("max_steps")):
                merged["max_steps"] = -1
            parts.append(f"{display(str(stage.get('method')))} {_length(merged)}")
        return " + ".join(parts)
    return _length(method)


def _length(method: dict[str, Any]) -> str:
    steps, epochs = method.get("max_steps"), method.get("epochs")
    if is_number(steps) and steps > 0:
        return f"{steps:g} steps"
    if is_number(epochs):
        return f"{epochs:g} epoch{'' if epochs == 1 else 's'}"
    return fmt.MISSING


def budget_flags(run: RunData) -> list[str]:
    """One sentence naming the training-budget quantities that differ between the trained methods."""
    methods = [m for m in run.trained if m in run.quality]
    if len(methods) < 2:
        return []
    parts = []
    steps = {m: run.training[m].get("optimizer_steps") for m in methods}
    if all(is_number(v) for v in steps.values()) and len(set(steps.values())) > 1:
        parts.append("optimizer steps " + ", ".join(f"{display(m)} {_steps(run, m)}" for m in methods))
    tokens = {m: run.training[m].get("tokens_trained") for m in methods}
    if all(is_number(v) for v in tokens.values()) and max(tokens.values()) > 1.01 * min(tokens.values()):
        parts.append("tokens trained " + ", ".join(f"{display(m)} {fmt.integer(v)}" for m, v in tokens.items()))
    configured = run.config.get("methods") if isinstance(run.config.get("methods"), dict) else {}
    lengths = {m: recipe_length(configured[m], configured) for m in methods if isinstance(configured.get(m), dict)}
    if len(lengths) == len(methods) and len(set(lengths.values())) > 1:
        parts.append("recipe length " + ", ".join(f"{display(m)} {v}" for m, v in lengths.items()))
    if not parts:
        return []
    return ["Unequal training budgets, so speed and quality are not compared like for like: " + "; ".join(parts) + "."]


def _steps(run: RunData, method: str) -> str:
    total = fmt.integer(run.training[method].get("optimizer_steps"))
    stages = [s for s in run.training[method].get("stages") or [] if isinstance(s, dict)
              and is_number(s.get("optimizer_steps"))]
    if len(stages) > 1:
        return f"{total} ({' + '.join(fmt.integer(s['optimizer_steps']) for s in stages)})"
    return total
