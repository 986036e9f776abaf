"""Headline findings: sentences generated from the numbers, never claiming more than they show.

Differences are called significant only when the paired bootstrap p-value, Holm-adjusted within its
metric when results.json records the adjusted value, is below `ALPHA` (0.05); "beats" means a higher
point estimate, and each such sentence says whether the difference is significant. The metrics are
the report's leading ones (`evaluate.metrics`); the pairwise tests have their own section.
"""

from __future__ import annotations

from typing import Any

from peftlab.report import fmt
from peftlab.report.doc import Bullet
from peftlab.report.fmt import display, is_number, metric_name
from peftlab.report.load import BASE, RunData, total_time


def find_comparison(run: RunData, a: str, b: str, metric: str) -> dict[str, Any] | None:
    """The comparison of `a` against `b` on `metric`, oriented as a - b (flipped if stored as b - a)."""
    for item in run.comparisons:
        if item.get("metric") != metric:
            continue
        if item.get("a") == a and item.get("b") == b:
            return item
        if item.get("a") == b and item.get("b") == a:
            ci = item.get("ci")
            flipped = [-ci[1], -ci[0]] if isinstance(ci, list) and len(ci) == 2 else ci
            diff = item.get("diff")
            return {**item, "a": a, "b": b, "diff": -diff if is_number(diff) else diff, "ci": flipped}
    return None


def method_note(run: RunData) -> str:
    samples = run.bootstrap_samples
    return f"paired bootstrap, {samples:,} resamples" if samples else "paired bootstrap"


def verdict(item: dict[str, Any]) -> str:
    p_value = fmt.decisive_p(item)
    if not is_number(p_value):
        return "significance not tested"
    return "significant" if fmt.significant(p_value) else "not significant"


def build_findings(run: RunData) -> list[Bullet]:
    bullets: list[Bullet] = []
    bullets += _best_models(run)
    bullets += _versus_base(run)
    bullets += _memory(run)
    bullets += _speed(run)
    bullets += _ensemble(run)
    bullets += _sample_size(run)
    return bullets


def _metric_values(run: RunData, metric: str) -> dict[str, float]:
    return {m: run.quality[m][metric] for m in run.evaluated if is_number(run.quality[m].get(metric))}


def _best_models(run: RunData) -> list[Bullet]:
    bullets = []
    for metric in run.metrics:
        values = _metric_values(run, metric)
        if len(values) < 2:
            continue
        ranked = sorted(values, key=lambda m: values[m], reverse=True)
        best, runner_up = ranked[0], ranked[1]
        text = f"Highest {metric_name(metric)}: {display(best)} ({fmt.score(values[best])})"
        if values[best] == values[runner_up]:
            text += f", tied with {display(runner_up)}."
        else:
            item = find_comparison(run, best, runner_up, metric)
            lead = f"ahead of {display(runner_up)} ({fmt.score(values[runner_up])}) by {fmt.signed(values[best] - values[runner_up])}"
            if item is not None:
                lead += f", {fmt.p_pair(item)}, {verdict(item)}"
            text += f"; {lead}."
        bullets.append(Bullet(text))
    return bullets


def _versus_base(run: RunData) -> list[Bullet]:
    if BASE not in run.quality:
        return []
    others = [m for m in run.evaluated if m != BASE]
    if not others:
        return []
    base = run.quality[BASE]
    behind = [
        (m, metric)
        for m in others
        for metric in run.metrics
        if not (is_number(run.quality[m].get(metric)) and is_number(base.get(metric)))
        or run.quality[m][metric] <= base[metric]
    ]
    if behind:
        models = list(dict.fromkeys(m for m, _ in behind))
        bullets = []
        for m in models:
            clauses = [_not_above_base(run, m, x).removesuffix(".") for mm, x in behind if mm == m]
            rest = [c.removeprefix(f"{display(m)} ") for c in clauses[1:]]
            bullets.append(Bullet("; ".join([clauses[0], *rest]) + "."))
        return bullets
    checks = [(m, metric) for m in others for metric in run.metrics]
    p_values = [fmt.decisive_p(find_comparison(run, m, BASE, metric) or {}) for m, metric in checks]
    weak = [
        f"{display(m)} {metric_name(x)}"
        for (m, x), p in zip(checks, p_values, strict=True)
        if not fmt.significant(p)
    ]
    if not any(is_number(p) for p in p_values):
        detail = "no significance tests against Base in results.json"
    elif not weak:
        detail = f"all {len(checks)} differences significant at p < {fmt.ALPHA}"
    elif len(weak) == len(checks):
        detail = f"none of the differences is significant at p < {fmt.ALPHA}"
    else:
        detail = f"not significant at p < {fmt.ALPHA} for {fmt.join_names(weak)}"
    names = fmt.join_names([metric_name(m) for m in run.metrics])
    return [Bullet(f"Every fine-tuned model beats Base on {names} ({detail}).")]


def _not_above_base(run: RunData, model: str, metric: str) -> str:
    value, base = run.quality[model].get(metric), run.quality[BASE].get(metric)
    if not (is_number(value) and is_number(base)):
        return f"{display(model)} has no {metric_name(metric)} score to compare with Base."
    relation = "ties with" if value == base else "does not beat"
    text = (
        f"{display(model)} {relation} Base on {metric_name(metric)} ({fmt.score(value)} vs {fmt.score(base)}"
    )
    item = find_comparison(run, model, BASE, metric)
    if item is not None and value != base:
        text += f", {fmt.signed(value - base)}, {fmt.p_pair(item)}, {verdict(item)}"
    return text + ")."


def compared_pairs(run: RunData) -> list[tuple[str, str]]:
    """Every compared pair once, oriented in model order with Base always second; pairs with Base first."""
    rank = {name: i for i, name in enumerate(run.names)}

    def position(name: str) -> float:
        return float("inf") if name == BASE else rank.get(name, len(rank))

    pairs: list[tuple[str, str]] = []
    for item in run.comparisons:
        a, b = item.get("a"), item.get("b")
        if not (isinstance(a, str) and isinstance(b, str)):
            continue
        pair = (a, b) if position(a) <= position(b) else (b, a)
        if pair not in pairs:
            pairs.append(pair)
    return sorted(pairs, key=lambda p: (p[1] != BASE, position(p[0]), position(p[1])))


def _trained_values(run: RunData, key: str) -> dict[str, float]:
    return {m: run.training[m][key] for m in run.trained if is_number(run.training[m].get(key))}


def _others(values: dict[str, float], winner: str, show) -> str:
    rest = [f"{display(m)} {show(v)}" for m, v in values.items() if m != winner]
    return f" (vs {', '.join(rest)})" if rest else ""


def _memory(run: RunData) -> list[Bullet]:
    if not run.trained:
        return []
    gpu = _trained_values(run, "peak_gpu_alloc_gib")
    cpu_only = [m for m in run.trained if m not in gpu]
    bullets = []
    if gpu:
        best = min(gpu, key=gpu.__getitem__)
        label = "Lowest peak GPU memory" if len(gpu) > 1 else "Peak GPU memory"
        text = f"{label}: {display(best)}, {fmt.gib(gpu[best])} GiB allocated"
        bullets.append(Bullet(text + _others(gpu, best, lambda v: f"{fmt.gib(v)} GiB") + "."))
    if cpu_only:
        names = fmt.join_names([display(m) for m in cpu_only])
        rss = {m: v for m, v in _trained_values(run, "peak_rss_gib").items() if m in cpu_only}
        text = f"{names} trained without a GPU, so peak GPU memory is n/a"
        if rss:
            best = min(rss, key=rss.__getitem__)
            label = "lowest peak RSS" if len(rss) > 1 else "peak RSS"
            text += f"; {label}: {display(best)}, {fmt.gib(rss[best])} GiB" + _others(
                rss, best, lambda v: f"{fmt.gib(v)} GiB"
            )
        bullets.append(Bullet(text + "."))
    return bullets


def _speed(run: RunData) -> list[Bullet]:
    times = {m: t for m in run.trained if (t := total_time(run.training[m])) is not None}
    rates = _trained_values(run, "tokens_per_s")
    steps = _trained_values(run, "optimizer_steps")
    parts = []
    if len(times) > 1:
        best = min(times, key=times.__getitem__)
        unit = fmt.time_unit(max(times.values()))
        parts.append(
            f"Fastest training: {display(best)}, {fmt.duration_in(times[best], unit)}"
            + _others(times, best, lambda seconds: fmt.duration_in(seconds, unit))
        )
    elif times:
        ((name, seconds),) = times.items()
        parts.append(f"{display(name)} trained in {fmt.short_duration(seconds)}")
    if len(rates) > 1:
        best = max(rates, key=rates.__getitem__)
        parts.append(f"highest throughput: {display(best)}, {fmt.rate(rates[best])} tokens/s")
    if len(times) > 1 and len(set(steps.values())) > 1:
        parts.append("the times are for unequal budgets (optimizer steps "
                     + ", ".join(f"{display(m)} {fmt.integer(v)}" for m, v in steps.items()) + ")")
    return [Bullet("; ".join(parts) + ".")] if parts else []


def _ensemble(run: RunData) -> list[Bullet]:
    block = run.ensemble
    if not block:
        return []
    members = [display(str(m)) for m in block.get("members") or []]
    alpha = block.get("alpha")
    text = "Ensemble"
    if members:
        text += f" of {fmt.join_names(members)}"
    if is_number(alpha):
        text += f" uses α={alpha:g}"
    if block.get("mode"):
        text += f" ({block['mode']} mixing)"
    select_by = _select_by(run)
    validation = [v for v in block.get("validation") or [] if isinstance(v, dict)]
    if validation:
        text += ", chosen on the validation split"
        if select_by:
            chosen = next((v for v in validation if v.get("alpha") == alpha), None)
            text += f" by {metric_name(select_by)}"
            if chosen is not None and is_number(chosen.get(select_by)):
                text += f" ({fmt.score(chosen[select_by])})"
    return [Bullet(text + ".")]


def _select_by(run: RunData) -> str | None:
    evaluate = run.config.get("evaluate")
    ensemble = evaluate.get("ensemble") if isinstance(evaluate, dict) else None
    value = ensemble.get("select_by") if isinstance(ensemble, dict) else None
    return value if isinstance(value, str) else None


def _sample_size(run: RunData) -> list[Bullet]:
    sizes = {run.quality[m].get("n") for m in run.evaluated if is_number(run.quality[m].get("n"))}
    if not sizes:
        return []
    text = (
        f"Scores are on n={fmt.integer(min(sizes))} test rows"
        if len(sizes) == 1
        else (
            f"Models were scored on different numbers of rows (n={', '.join(fmt.integer(s) for s in sorted(sizes))})"
        )
    )
    widths = [
        ci[1] - ci[0]
        for m in run.evaluated
        if isinstance(ci := run.quality[m].get("rougeL_ci"), list)
        and len(ci) == 2
        and all(map(is_number, ci))
    ]
    if widths:
        text += f"; 95% CIs of ROUGE-L are up to {max(widths):.4f} wide"
    return [Bullet(text + ".")]
