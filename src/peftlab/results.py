"""`results.json`: the study's numbers in one place, gathered from the stages' outputs.

Shape: {"models": {NAME: {"bleu4", "rougeL", "n", "per_source", ...}}, "comparisons": [paired
bootstrap for every pair of models and both metrics], "training": {METHOD: {"peak_gpu_alloc_gib",
"peak_gpu_reserved_gib", "train_time_s", "tokens_per_s", "trainable_params", "total_params", ...}},
"ensemble": {...}, "config": {...}, "versions": {...}, "hardware": {...}}.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from peftlab.config import StudyConfig, config_to_dict, evaluated_models
from peftlab.errors import UserError
from peftlab.evaluate.metrics import paired_bootstrap, score_rows
from peftlab.rundir import hardware, package_versions, read_json, read_jsonl, write_json

TRAINING_KEYS = (
    "peak_gpu_alloc_gib", "peak_gpu_reserved_gib", "train_time_s", "tokens_per_s", "trainable_params",
    "total_params", "peak_rss_gib", "model_load_s", "final_loss", "optimizer_steps", "tokens_trained",
    "device", "gpu_name", "merge_time_s", "checkpoint_save_s", "resumed", "segments",
)
MODEL_KEYS = ("bleu4", "bleu4_ci", "rougeL", "rougeL_ci", "rouge1", "rouge2", "n", "limit", "per_source", "generation",
              "overlength_rows")


def _predictions(run_dir: Path, model: str) -> list[dict[str, Any]]:
    return read_jsonl(run_dir / "eval" / model / "predictions.jsonl")


def compare_models(run_dir: Path, models: list[str], samples: int) -> list[dict[str, Any]]:
    """Paired bootstrap p-values for every pair of models scored on the same test rows."""
    rows = {m: _predictions(run_dir, m) for m in models}
    scores = {m: score_rows([r["prediction"] for r in rs], [r["reference"] for r in rs]) for m, rs in rows.items()}
    comparisons = []
    for a, b in itertools.combinations(models, 2):
        if [r["id"] for r in rows[a]] != [r["id"] for r in rows[b]]:
            continue  # evaluated on different rows (different --limit): not comparable
        for metric in ("bleu4", "rougeL"):
            result = paired_bootstrap(scores[a], scores[b], metric, samples=samples)
            comparisons.append({"a": a, "b": b, "metric": metric, "diff": result["diff"],
                                "p_value": result["p_value"], "ci": result["ci"]})
    return comparisons


def collect_results(config: StudyConfig, run_dir: Path) -> dict[str, Any]:
    models = [m for m in evaluated_models(config) if (run_dir / "eval" / m / "metrics.json").exists()]
    if not models:
        raise UserError(f"{run_dir}: no evaluated model; run `peftlab evaluate` first")
    evals = {m: read_json(run_dir / "eval" / m / "metrics.json") for m in models}
    training = {}
    for method in config.methods:
        path = run_dir / "train" / method / "metrics.json"
        if path.exists():
            metrics = read_json(path)
            training[method] = {k: metrics.get(k) for k in TRAINING_KEYS}
    results: dict[str, Any] = {
        "models": {m: {k: evals[m].get(k) for k in MODEL_KEYS} for m in models},
        "comparisons": compare_models(run_dir, models, config.evaluate.bootstrap_samples),
        "training": training,
        "config": config_to_dict(config),
        "versions": package_versions(),
        "hardware": hardware(),
    }
    if "ensemble" in evals and "ensemble" in evals["ensemble"]:
        results["ensemble"] = evals["ensemble"]["ensemble"]
    write_json(run_dir / "results.json", results)
    return results
