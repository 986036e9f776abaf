"""`results.json`: the study's numbers in one place, gathered from the stages' outputs.

`collect_results(config, run_dir)` writes it at the end of `peftlab study`. `ensure_results(run_dir)`
(run by `peftlab report`) rebuilds it from the stage outputs when it is missing (a run made with
`prepare` / `train` / `evaluate`), reading the study's config back from `config.resolved.yaml`, and
brings a results.json of an older peftlab up to this shape. Nothing here trains or generates.

Shape (``"schema": 2``)::

    {
      "schema": 2,
      "metrics": ["rougeL", "bleu4", "exact_match_norm"],  # evaluate.metrics: lead the report; the
                                                            # first one ranks the recommendation
      "models": {NAME: MODEL},            # every evaluated model (base, methods, ensemble)
      "comparisons": [{"a", "b", "metric", "diff", "ci", "p_value", "p_holm"}],
      "multiple_comparisons": {"method": "holm", "family": "per metric", "alpha": 0.05, "tests": {METRIC: m}},
      "training": {METHOD: TRAINING},
      "ensemble": {"members", "alpha", "mode", "select_by", "validation": [...]},   # when configured
      "config": {...}, "versions": {...}, "hardware": {...},   # versions/hardware of the run (env.json)
      "notes": ["..."]                    # what could not be computed, when anything could not
    }

    MODEL = {"n", "limit", "generation",
             "bleu4", "bleu4_ci", "rougeL", "rougeL_ci", "rouge1", "rouge2",
             "exact_match", "exact_match_ci", "exact_match_count",
             "exact_match_norm", "exact_match_norm_ci", "exact_match_norm_count",
             "per_source": {SOURCE: the same score keys for the rows of that source}}
    TRAINING = {"peak_gpu_alloc_gib", "peak_gpu_reserved_gib", "peak_rss_gib", "train_time_s",
                "merge_time_s", "tokens_per_s", "tokens_trained", "optimizer_steps", "trainable_params",
                "total_params", "final_loss", "model_load_s", "device", "gpu_name"}

Scores are fractions in [0, 1]; `*_ci` are 95% percentile-bootstrap intervals; `comparisons` hold a
paired bootstrap for every pair of models evaluated on the same rows and every metric of "metrics",
with `p_holm` the Holm-adjusted p-value within that metric's family of comparisons.

Seed repeats (`train.seeds`, several training runs of each method): a model trained with more than
one seed gets ``"seeds": {"42": MODEL, "43": MODEL, ...}`` (string keys: JSON), one complete entry
per seed, and its top-level entry is `aggregate_seeds` of them: every score is the mean over seeds
with ``METRIC_sd`` (sample standard deviation, n - 1) beside it and ``"n_seeds"``; the top-level
``*_ci`` are left out (the spread between seeds replaces them); ``per_source`` is aggregated the same
way. TRAINING gets ``"seeds"`` likewise; its numbers are means over seeds, its peaks (`peak_*`) the
maximum. `comparisons` then compare the predictions in eval/NAME/ (the first seed's). With one seed
(the default) there is no ``"seeds"`` key and nothing above changes.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from peftlab.config import StudyConfig, config_to_dict, evaluated_models, method_seeds, seed_runs
from peftlab.errors import UserError
from peftlab.evaluate.metrics import EXACT_TYPES, METRICS, RowScores, score_rows
from peftlab.evaluate.statistics import holm_adjust, paired_bootstrap, summarize_table
from peftlab.rundir import hardware, package_versions, read_json, read_jsonl, read_run_config, write_json

SCHEMA = 2
ALPHA = 0.05
TRAINING_KEYS = (
    "peak_gpu_alloc_gib", "peak_gpu_reserved_gib", "train_time_s", "tokens_per_s", "trainable_params",
    "total_params", "peak_rss_gib", "model_load_s", "final_loss", "optimizer_steps", "tokens_trained",
    "device", "gpu_name", "merge_time_s", "checkpoint_save_s", "resumed", "segments",
)
SCORE_KEYS = (
    "bleu4", "bleu4_ci", "rougeL", "rougeL_ci", "rouge1", "rouge2",
    *(f"{m}{suffix}" for m in EXACT_TYPES for suffix in ("", "_ci", "_count")),
)
MODEL_KEYS = (*SCORE_KEYS, "n", "limit", "per_source", "generation", "overlength_rows")
# results.json of peftlab before schema 2 compared these two only.
LEGACY_METRICS = ["rougeL", "bleu4"]


def _predictions(run_dir: Path, model: str) -> list[dict[str, Any]] | None:
    path = run_dir / "eval" / model / "predictions.jsonl"
    return read_jsonl(path) if path.is_file() else None


def _row_scores(rows: list[dict[str, Any]]) -> RowScores:
    return score_rows([r["prediction"] for r in rows], [r["reference"] for r in rows])


def compare_models(
    models: list[str],
    rows: Mapping[str, list[dict[str, Any]]],
    scores: Mapping[str, RowScores],
    metrics: list[str],
    samples: int,
) -> list[dict[str, Any]]:
    """Paired bootstrap of every pair of models scored on the same test rows, for each metric,
    with Holm-adjusted p-values per metric (`add_holm`)."""
    comparisons = []
    for a, b in itertools.combinations([m for m in models if m in scores], 2):
        if [r["id"] for r in rows[a]] != [r["id"] for r in rows[b]]:
            continue  # evaluated on different rows (different --limit): not comparable
        for metric in metrics:
            result = paired_bootstrap(scores[a], scores[b], metric, samples=samples)
            comparisons.append({"a": a, "b": b, "metric": metric, "diff": result["diff"],
                                "p_value": result["p_value"], "ci": result["ci"]})
    return add_holm(comparisons)


def add_holm(comparisons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set `p_holm` on every comparison: Holm's correction over the comparisons of the same metric."""
    for metric in dict.fromkeys(c.get("metric") for c in comparisons):
        family = [c for c in comparisons if c.get("metric") == metric and _is_number(c.get("p_value"))]
        for item, adjusted in zip(family, holm_adjust([c["p_value"] for c in family]), strict=True):
            item["p_holm"] = adjusted
    return comparisons


def _family_sizes(comparisons: list[dict[str, Any]]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for item in comparisons:
        if "p_holm" in item:
            sizes[item["metric"]] = sizes.get(item["metric"], 0) + 1
    return sizes


def _model_entry(evals: dict[str, Any], rows: list[dict[str, Any]] | None, scores: RowScores | None,
                 samples: int) -> dict[str, Any]:
    """The MODEL entry from eval/NAME/metrics.json; exact matches scored from the predictions when an
    older evaluation did not record them."""
    entry = {k: evals.get(k) for k in MODEL_KEYS}
    if evals.get("exact_match") is not None or rows is None or scores is None:
        return entry
    sources = [str(r.get("source_dataset") or "unknown") for r in rows]
    table = summarize_table(scores, sources, bootstrap_samples=samples)
    exact_keys = [k for k in SCORE_KEYS if k.startswith("exact_match")]
    entry.update({k: table[k] for k in exact_keys})
    per_source = entry.get("per_source")
    if isinstance(per_source, dict):
        entry["per_source"] = {
            source: {**block, **{k: table["per_source"][source][k] for k in exact_keys}}
            if isinstance(block, dict) and source in table["per_source"] else block
            for source, block in per_source.items()
        }
    return entry


def _environment(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Versions and hardware of the run (env.json, written when its stages ran), else of this machine."""
    env = read_json(run_dir / "env.json") if (run_dir / "env.json").is_file() else {}
    versions = env.get("versions") if isinstance(env.get("versions"), dict) else package_versions()
    machine = env.get("hardware") if isinstance(env.get("hardware"), dict) else hardware()
    return versions, machine


def collect_results(config: StudyConfig, run_dir: Path) -> dict[str, Any]:
    """Gather every stage's output into results.json (see the module docstring) and write it."""
    models = [m for m in evaluated_models(config) if (run_dir / "eval" / m / "metrics.json").exists()]
    if not models:
        raise UserError(f"{run_dir}: no evaluated model; run `peftlab evaluate CONFIG --model base --out {run_dir}`"
                        " (and each trained method) first")
    samples = config.evaluate.bootstrap_samples
    metrics = list(config.evaluate.metrics)
    evals = {m: read_json(run_dir / "eval" / m / "metrics.json") for m in models}
    rows = {m: r for m in models if (r := _predictions(run_dir, m)) is not None}
    scores = {m: _row_scores(r) for m, r in rows.items()}
    notes = []
    if len(rows) < len(models):
        missing = [m for m in models if m not in rows]
        notes.append(f"no eval/<model>/predictions.jsonl for {', '.join(missing)}: no pairwise tests"
                     " (and no exact match if the evaluation predates it) for these")
    training = {}
    for method in config.methods:
        per_seed = {seed: _training_entry(read_json(path)) for seed, run in _seeds_of(config, method)
                    if (path := run_dir / "train" / run / "metrics.json").exists()}
        if per_seed:
            training[method] = aggregate_seeds(per_seed)
    comparisons = compare_models(models, rows, scores, metrics, samples)
    versions, machine = _environment(run_dir)
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "metrics": metrics,
        "models": {m: _over_seeds(config, run_dir, m, _model_entry(evals[m], rows.get(m), scores.get(m), samples),
                                  samples, notes) for m in models},
        "comparisons": comparisons,
        "multiple_comparisons": _holm_note(comparisons),
        "training": training,
        "config": config_to_dict(config),
        "versions": versions,
        "hardware": machine,
    }
    if notes:
        results["notes"] = notes
    if "ensemble" in evals and "ensemble" in evals["ensemble"]:
        results["ensemble"] = evals["ensemble"]["ensemble"]
    write_json(run_dir / "results.json", results)
    return results


def _training_entry(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics.get(k) for k in TRAINING_KEYS}


def _seeds_of(config: StudyConfig, name: str) -> list[tuple[str, str]]:
    """(seed, run name) of each training run of `name`; one for base and the ensemble."""
    runs = seed_runs(config, name)
    if len(runs) == 1:
        return [("", name)]
    return list(zip((str(seed) for seed in method_seeds(config.methods[name])), runs, strict=True))


def _over_seeds(config: StudyConfig, run_dir: Path, name: str, first: dict[str, Any], samples: int,
                notes: list[str]) -> dict[str, Any]:
    """MODEL of `name` over its training seeds (`aggregate_seeds`); `first` is its first seed's entry.
    Repeats not evaluated yet are left out, and said so in the notes."""
    seeds = _seeds_of(config, name)
    if len(seeds) == 1:
        return first
    per_seed = {seeds[0][0]: first}
    missing = []
    for seed, run in seeds[1:]:
        path = run_dir / "eval" / run / "metrics.json"
        if not path.is_file():
            missing.append(run)
            continue
        rows = _predictions(run_dir, run)
        per_seed[seed] = _model_entry(read_json(path), rows, _row_scores(rows) if rows else None, samples)
    if missing:
        notes.append(f"{name}: {', '.join(missing)} not evaluated: its mean and SD cover {len(per_seed)} of"
                     f" {len(seeds)} seeds")
    if len({entry.get("n") for entry in per_seed.values()}) > 1:
        notes.append(f"{name}: its seeds were evaluated on different numbers of rows (--limit)")
    return aggregate_seeds(per_seed)


def _holm_note(comparisons: list[dict[str, Any]]) -> dict[str, Any]:
    return {"method": "holm", "family": "per metric", "alpha": ALPHA, "tests": _family_sizes(comparisons)}


def load_run_config(run_dir: Path) -> StudyConfig:
    """The study config a run directory was made with (its config.resolved.yaml)."""
    if not (run_dir / "config.resolved.yaml").is_file():
        raise UserError(
            f"{run_dir}: no results.json and no config.resolved.yaml to rebuild it from; run"
            f" `peftlab study CONFIG --out {run_dir}`, or `peftlab prepare`, `train` and `evaluate` with --out {run_dir}"
        )
    return read_run_config(run_dir)


def ensure_results(run_dir: Path) -> str | None:
    """Make run_dir/results.json current for the report; return what was done, or None when nothing was.

    Missing: rebuilt from config.resolved.yaml, train/*/metrics.json and eval/*/ (`collect_results`).
    From an older peftlab (no "schema"): rebuilt the same way when every model's predictions are
    there, else given Holm-adjusted p-values (which need only the stored p-values) and a note.
    """
    path = run_dir / "results.json"
    if not path.is_file():
        collect_results(load_run_config(run_dir), run_dir)
        return f"rebuilt {path} from the stage outputs"
    results = read_json(path)
    if not isinstance(results, dict):
        raise UserError(f"{path}: expected a JSON object")
    if _is_number(results.get("schema")) and results["schema"] >= SCHEMA:
        return None
    models = results.get("models") if isinstance(results.get("models"), dict) else {}
    if (run_dir / "config.resolved.yaml").is_file() and models and all(
        (run_dir / "eval" / m / "predictions.jsonl").is_file() for m in models
    ):
        collect_results(load_run_config(run_dir), run_dir)
        return f"rebuilt {path} (written by an older peftlab: no exact match, no Holm correction)"
    comparisons = [c for c in results.get("comparisons") or [] if isinstance(c, dict)]
    results.update(
        schema=SCHEMA,
        metrics=results.get("metrics") or LEGACY_METRICS,
        comparisons=add_holm(comparisons),
        multiple_comparisons=_holm_note(comparisons),
    )
    results["notes"] = [*results.get("notes", []),
                        "exact match not computed: written by an older peftlab, and the predictions"
                        " (eval/<model>/predictions.jsonl) needed to score it are not in the run directory"]
    write_json(path, results)
    return f"updated {path}: Holm-adjusted p-values added (no predictions to score exact match from)"


# ------------------------------------------------------------------------------------------ seeds


def aggregate_seeds(per_seed: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One MODEL (or TRAINING) entry from the entries of several seeds (see the module docstring).

    Scores become the mean over seeds with `METRIC_sd` beside them; `*_ci` are left out; peaks
    (`peak_*`) take the maximum, other numbers the mean; anything else is the first seed's. With a
    single seed its entry is returned unchanged (no "seeds" key).
    """
    seeds = {str(k): dict(v) for k, v in per_seed.items()}
    if len(seeds) == 1:
        return next(iter(seeds.values()))
    merged = _aggregate(list(seeds.values()))
    merged["seeds"] = seeds
    merged["n_seeds"] = len(seeds)
    return merged


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _aggregate(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    first = blocks[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        values = [b.get(key) for b in blocks]
        if key.endswith("_ci") or key in ("seeds", "n_seeds"):
            continue
        if key == "per_source" and all(isinstance(v, dict) for v in values):
            sources = [s for s in value if all(s in v for v in values)]
            out[key] = {s: _aggregate([v[s] for v in values]) for s in sources}
        elif key == "n" or not all(_is_number(v) for v in values):
            out[key] = value
        elif key.startswith("peak_"):
            out[key] = max(values)
        else:
            out[key] = statistics.fmean(values)
            if key in METRICS:
                out[f"{key}_sd"] = statistics.stdev(values)
    return out
