"""Read everything the report needs from a run directory into one `RunData`.

`results.json` is required; everything else (training metrics, loss curves, predictions, data
statistics, env.json) is optional, so a report can be written for a partially finished study.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.errors import UserError
from peftlab.report.fmt import is_number, lead_metrics
from peftlab.rundir import read_jsonl

BASE = "base"


@dataclass
class RunData:
    """The numbers of one run, keyed by model / method name."""

    run_dir: Path
    results: dict[str, Any]
    # Evaluation summary per evaluated model (results.json "models", else eval/<m>/metrics.json).
    quality: dict[str, dict[str, Any]]
    # Training metrics per trained method (train/<m>/metrics.json over results.json "training").
    training: dict[str, dict[str, Any]]
    # eval/<m>/metrics.json as written (generation settings, ensemble block).
    eval_metrics: dict[str, dict[str, Any]]
    # eval/<m>/predictions.jsonl rows.
    predictions: dict[str, list[dict[str, Any]]]
    stats: dict[str, Any] | None
    env: dict[str, Any]
    # Every name, base first, then results.json order, then trained-only methods.
    names: list[str] = field(default_factory=list)

    @property
    def config(self) -> dict[str, Any]:
        config = self.results.get("config")
        return config if isinstance(config, dict) else {}

    @property
    def comparisons(self) -> list[dict[str, Any]]:
        items = self.results.get("comparisons")
        return [c for c in items if isinstance(c, dict)] if isinstance(items, list) else []

    @property
    def ensemble(self) -> dict[str, Any] | None:
        block = self.results.get("ensemble")
        if isinstance(block, dict):
            return block
        for metrics in self.eval_metrics.values():
            if isinstance(metrics.get("ensemble"), dict):
                return metrics["ensemble"]
        return None

    @property
    def evaluated(self) -> list[str]:
        return [name for name in self.names if name in self.quality]

    @property
    def trained(self) -> list[str]:
        return [name for name in self.names if name in self.training]

    @property
    def bootstrap_samples(self) -> int | None:
        evaluate = self.config.get("evaluate")
        value = evaluate.get("bootstrap_samples") if isinstance(evaluate, dict) else None
        return int(value) if is_number(value) else None

    @property
    def metrics(self) -> list[str]:
        """The metrics that lead the report (evaluate.metrics); the first ranks the recommendation."""
        return lead_metrics(self.results, self.config)

    @property
    def primary(self) -> str:
        return self.metrics[0]

    @property
    def on_gpu(self) -> bool:
        """Whether training recorded GPU memory (every trained method): memory is then GPU peaks, else RSS."""
        trained = self.trained
        return bool(trained) and all(is_number(self.training[m].get("peak_gpu_alloc_gib")) for m in trained)

    @property
    def memory_key(self) -> str:
        return "peak_gpu_alloc_gib" if self.on_gpu else "peak_rss_gib"

    @property
    def cpu_only(self) -> bool:
        """No GPU anywhere in the run (hardware record and every training run)."""
        hardware = self.results.get("hardware") or self.env.get("hardware") or {}
        devices = {str(self.training[m].get("device") or "") for m in self.trained}
        return not (isinstance(hardware, dict) and hardware.get("gpu")) and not any(
            d.startswith("cuda") for d in devices
        )

    def seed_values(self, name: str, metric: str) -> list[float]:
        """The model's score on `metric` for each training seed (results.json "seeds"); [] with one seed."""
        seeds = self.quality.get(name, {}).get("seeds")
        if not isinstance(seeds, dict) or len(seeds) < 2:
            return []
        values = [block.get(metric) for block in seeds.values() if isinstance(block, dict)]
        return [float(v) for v in values if is_number(v)] if all(is_number(v) for v in values) else []

    def kind(self, name: str) -> str:
        kind = self.training.get(name, {}).get("kind")
        if isinstance(kind, str):
            return kind
        methods = self.config.get("methods")
        method = methods.get(name) if isinstance(methods, dict) else None
        return str(method.get("kind", "")) if isinstance(method, dict) else ""


def load_run(run_dir: Path) -> RunData:
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise UserError(f"{run_dir}: no results.json; `peftlab report {run_dir}` rebuilds it from the stage outputs")
    results = _read_json(results_path)
    if not isinstance(results, dict):
        raise UserError(f"{results_path}: expected a JSON object")
    eval_metrics = _read_subdirs(run_dir / "eval")
    training = _merge_training(results, _read_subdirs(run_dir / "train"))
    for name, metrics in training.items():
        if not metrics.get("loss_curve"):
            metrics["loss_curve"] = read_loss_csv(run_dir / "train" / name / "loss.csv")
    quality = _quality(results, eval_metrics)
    predictions = {
        path.parent.name: read_jsonl(path) for path in sorted((run_dir / "eval").glob("*/predictions.jsonl"))
        if "@" not in path.parent.name
    }
    stats = _read_optional(run_dir / "data" / "stats.json")
    if stats is None:  # a published run directory keeps only the statistics of data/ (results/samples-270m)
        stats = _read_optional(run_dir / "data-stats.json")
    env = _read_optional(run_dir / "env.json")
    run = RunData(
        run_dir=run_dir,
        results=results,
        quality=quality,
        training=training,
        eval_metrics=eval_metrics,
        predictions=predictions,
        stats=stats if isinstance(stats, dict) else None,
        env=env if isinstance(env, dict) else {},
    )
    run.names = _ordered_names(quality, training, predictions)
    return run


def _ordered_names(*groups: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for group in groups:
        names.extend(key for key in group if key not in names)
    if BASE in names:
        names.remove(BASE)
        names.insert(0, BASE)
    return names


def _quality(results: dict[str, Any], eval_metrics: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    models = results.get("models")
    quality = {k: v for k, v in models.items() if isinstance(v, dict)} if isinstance(models, dict) else {}
    for name, metrics in eval_metrics.items():
        if name not in quality and is_number(metrics.get("bleu4")):
            quality[name] = metrics
    return quality


def _merge_training(results: dict[str, Any], files: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    summary = results.get("training")
    merged = (
        {k: dict(v) for k, v in summary.items() if isinstance(v, dict)} if isinstance(summary, dict) else {}
    )
    for name, metrics in files.items():
        merged[name] = {**merged.get(name, {}), **metrics}
    return merged


def _read_subdirs(folder: Path) -> dict[str, dict[str, Any]]:
    """`{name: metrics}` for every folder/<name>/metrics.json that holds a JSON object (seed repeats,
    `<method>@<seed>`, left out: results.json holds them under their method's "seeds")."""
    found = {}
    for path in sorted(folder.glob("*/metrics.json")):
        if "@" in path.parent.name:
            continue
        data = _read_json(path)
        if isinstance(data, dict):
            found[path.parent.name] = data
    return found


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None


def _read_optional(path: Path) -> Any:
    return _read_json(path) if path.is_file() else None


def read_loss_csv(path: Path) -> list[dict[str, Any]]:
    """Loss points from a loss.csv with `step` and `loss` columns (and `stage` when present)."""
    if not path.is_file():
        return []
    points = []
    with path.open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                point: dict[str, Any] = {"step": int(float(row["step"])), "loss": float(row["loss"])}
            except (KeyError, TypeError, ValueError):
                continue
            if row.get("stage"):
                point["stage"] = row["stage"]
            points.append(point)
    return points


def stage_times(metrics: dict[str, Any]) -> list[tuple[str, float]]:
    """(stage label, seconds) of a staged method, the merge included; [] for a single-stage method."""
    parts = []
    for stage in metrics.get("stages") or []:
        if not isinstance(stage, dict):
            continue
        merge = stage.get("kind") == "merge" or stage.get("method") == "merge"
        seconds = stage.get("merge_time_s") if merge else stage.get("train_time_s")
        if is_number(seconds):
            parts.append(("merge" if merge else str(stage.get("method") or stage.get("kind") or stage.get("stage")),
                          float(seconds)))
    return parts


def total_time(metrics: dict[str, Any]) -> float | None:
    """Training time as the report states it: train_time_s, or the sum of the stages (merge included)
    when that is larger (a hybrid's train_time_s counts its training stages only)."""
    recorded = metrics.get("train_time_s")
    stacked = sum(seconds for _, seconds in stage_times(metrics))
    if not is_number(recorded):
        return stacked or None
    return max(float(recorded), stacked)
