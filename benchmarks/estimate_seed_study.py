"""The full seed study's time on one GPU, derived from a measured rehearsal (benchmarks/study_rehearsal.py).

Arithmetic, stated in the output: configs/seed.yaml fixes the rows (train / validation / test per
source x 3 sources), epochs and max_new_tokens. The rehearsal ran the same settings on the same
sources (their samples), so its measured rates carry over:
- training: rows x epochs x the rehearsal's mean tokens per train row / the method's measured loop
  tokens/s (first steps and all included), plus its model load; the hybrid's stages at their own rates,
  plus the merge as measured;
- evaluation: test rows x the rehearsal's generated tokens per row / the model's measured generated
  tokens/s, plus its measured fixed cost (load, scoring); the ensemble adds its alpha search scaled by
  validation rows. With random weights a row tends to run to max_new_tokens: the generation part is an
  upper bound for a trained model, which stops at its answer's end;
- prepare (a hub download here) is not measured and not included.

With `--bench FILE` (a `peftlab bench train` report of the same GPU kind), training uses that file's
`default` rows instead: the tokens at the method's steady tokens/s (the seed study runs ~2,800 steps
per method, so its loop rate is the steady one), plus that run's first-step overhead (first step minus
the median step) and the rehearsal's model load; the hybrid's stages at their methods' rates.

    python benchmarks/estimate_seed_study.py $OUT/study.json --out $OUT/seed-estimate.json
    python benchmarks/estimate_seed_study.py STUDY.json --bench BENCH.json --out seed-estimate.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def bench_rates(bench: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per method kind, the `default` row's steady tokens/s and first-step overhead (seconds)."""
    return {row["method"]: {"tokens_per_s": row["steady_tokens_per_s"],
                            "first_step_overhead_s": max(row["first_step_s"] - row["step_s_median"], 0.0)}
            for row in bench.get("runs", []) if row.get("profile") == "default" and row.get("steady_tokens_per_s")}


def estimate(study: dict[str, Any], bench: dict[str, Any] | None = None) -> dict[str, Any]:
    from peftlab.config import load_config

    seed = load_config("seed")
    sources = len(seed.data.sources)
    train_rows = seed.data.train_per_source * sources
    test_rows = seed.data.test_per_source * sources
    validation_rows = seed.prepare.validation_per_source * sources
    stages = {s["stage"]: s for s in study.get("stages", [])}
    prepared = stages.get("prepare", {}).get("data", {})
    mean_tokens = prepared.get("train", {}).get("mean_tokens")
    rehearsal_test = prepared.get("test", {}).get("rows")
    rehearsal_validation = prepared.get("validation", {}).get("rows")
    out: dict[str, Any] = {"seed_rows": {"train": train_rows, "validation": validation_rows, "test": test_rows},
                           "mean_tokens_per_train_row": mean_tokens, "stages": {}, "missing": []}

    rates = bench_rates(bench) if bench is not None else {}
    if bench is not None:
        out["training_rates_from"] = {"bench_gpu": bench.get("gpu"), "rates": rates}

    def train_seconds(metrics: dict[str, Any], epochs: float, kind: str) -> float:
        load = metrics.get("model_load_s") or 0.0
        rate = rates.get(kind)
        if rate:
            return train_rows * epochs * mean_tokens / rate["tokens_per_s"] + rate["first_step_overhead_s"] + load
        return train_rows * epochs * mean_tokens / metrics["tokens_per_s"] + load

    for name, method in seed.methods.items():
        stage = stages.get(f"train {name}")
        if stage is None or mean_tokens is None:
            out["missing"].append(f"train {name}")
            continue
        metrics = stage["metrics"]
        tokens = train_rows * method.epochs * mean_tokens
        if method.kind == "hybrid":
            parts = []
            tokens = 0.0
            trained = iter(s for s in metrics.get("stages") or [] if s.get("kind") != "merge")
            for config_stage in method.stages:
                if config_stage.method == "merge":
                    merge = next((s for s in metrics.get("stages") or [] if s.get("kind") == "merge"), {})
                    parts.append(merge.get("merge_time_s") or 0.0)
                    continue
                measured = next(trained)
                epochs = config_stage.epochs or seed.method(config_stage.method).epochs
                tokens += train_rows * epochs * mean_tokens
                parts.append(train_seconds(measured, epochs, seed.method(config_stage.method).kind))
            seconds = sum(parts)
        else:
            seconds = train_seconds(metrics, method.epochs, method.kind)
        # Whole-stage tokens / seconds: a hybrid's stages and merge, first-step overheads and loads included.
        out["stages"][f"train {name}"] = {"seconds": seconds, "tokens_per_s": tokens / seconds if seconds else None}
    for name, stage in stages.items():
        if not name.startswith("evaluate "):
            continue
        metrics = stage.get("metrics") or {}
        generation = metrics.get("generation") or {}
        rows = metrics.get("n") or rehearsal_test
        if not generation.get("tokens_per_s") or not rows:
            out["missing"].append(name)
            continue
        per_row = generation["generated_tokens"] / rows
        fixed = max(stage["seconds"] - generation["seconds"], 0.0)
        seconds = test_rows * per_row / generation["tokens_per_s"]
        if name == "evaluate ensemble" and rehearsal_validation:
            seconds += fixed * validation_rows / rehearsal_validation  # the alpha search dominates its fixed cost
        else:
            seconds += fixed
        out["stages"][name] = {"seconds": seconds, "generated_tokens_per_row": per_row,
                               "generated_tokens_per_s": generation["tokens_per_s"]}
    out["train_s"] = sum(v["seconds"] for k, v in out["stages"].items() if k.startswith("train "))
    out["evaluate_s"] = sum(v["seconds"] for k, v in out["stages"].items() if k.startswith("evaluate "))
    out["total_s"] = out["train_s"] + out["evaluate_s"]
    out["total_h"] = out["total_s"] / 3600
    out["gpu"] = study.get("gpu")
    out["from"] = ("rehearsal rates x seed rows (see benchmarks/estimate_seed_study.py); prepare not included"
                   + ("; training at the bench file's default rates" if bench is not None else ""))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="the rehearsal's study.json")
    parser.add_argument("--bench", type=Path, default=None, help="training rates from this bench report")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    bench = json.loads(args.bench.read_text()) if args.bench else None
    result = estimate(json.loads(args.study.read_text()), bench)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
