"""One bench run in a fresh process (`python -m peftlab.bench.worker SPEC.json RESULT.json`), so that
peak-memory counters never mix: ours through `peftlab train`'s code, or the reference recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from peftlab.bench.reference import run_reference
from peftlab.bench.workload import BenchSpec, prepare_workload
from peftlab.errors import UserError


def stage_curve(curve: list[dict[str, Any]], stage: str) -> list[dict[str, Any]]:
    """One hybrid stage's losses from the hybrid's curve, its steps counted from 1."""
    return [{"step": index, "loss": point["loss"]}
            for index, point in enumerate((p for p in curve if p["stage"] == stage), start=1)]


def run_ours(spec: BenchSpec) -> dict[str, Any]:
    from peftlab.hybrid import train_hybrid
    from peftlab.train.runner import train_method

    config, run_dir = prepare_workload(spec)
    train = train_hybrid if spec.method == "hybrid" else train_method
    metrics = train(config, run_dir, spec.method)
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    shared = {"rows": stats["splits"]["train"]["rows"], "mean_seq": stats["splits"]["train"]["mean_tokens"],
              "max_seq_length": config.data.max_seq_length}
    if spec.method == "hybrid":  # one result per trained stage; the merge's time goes with the stage after it
        merges = [s["merge_time_s"] for s in metrics["stages"] if s["method"] == "merge"]
        trained = [s for s in metrics["stages"] if s["method"] != "merge"]
        return {"stages": [{"metrics": {**stage, "loss_curve": stage_curve(metrics["loss_curve"], stage["method"])},
                            **shared, "stage": stage["method"],
                            **({"merge_s": merges[0]} if index == 1 and merges else {})}
                           for index, stage in enumerate(trained)]}
    return {"metrics": metrics, **shared}


def worker(spec_path: str, result_path: str) -> None:
    spec = BenchSpec(**json.loads(Path(spec_path).read_text()))
    result = run_reference(spec) if spec.profile == "reference" else run_ours(spec)
    Path(result_path).write_text(json.dumps(result, default=str))


def run_in_subprocess(spec: BenchSpec, work: Path) -> dict[str, Any]:
    spec_path, result_path = work / "spec.json", work / "result.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "peftlab.bench.worker", str(spec_path), str(result_path)],
                          env=env)
    if done.returncode != 0 or not result_path.exists():
        return {"error": f"worker exited with status {done.returncode}"}
    return json.loads(result_path.read_text())


if __name__ == "__main__":
    if len(sys.argv) == 3:
        try:
            worker(sys.argv[1], sys.argv[2])
        except UserError as exc:
            print(f"peftlab: error: {exc}", file=sys.stderr)
            sys.exit(2)
    else:
        print("usage: python -m peftlab.bench.worker SPEC.json RESULT.json (use `peftlab bench train`)", file=sys.stderr)
        sys.exit(2)
