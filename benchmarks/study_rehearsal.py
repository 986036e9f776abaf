"""Time a whole `peftlab study` of a seed-shaped rehearsal: configs/seed.yaml itself (every method,
hyperparameter and evaluation setting), with the exact Gemma-3-1B shape in random weights, the real
dataset samples and the data scaled down (REHEARSAL below) so the study fits one device call.

Each stage (prepare, train <method>, evaluate <model>, report) runs through peftlab's own workflow
functions, timed; `--out` (JSON) is rewritten after every stage, so a run cut by a time limit keeps
every finished stage. `benchmarks/estimate_seed_study.py` derives the full seed study's time from it.

    python benchmarks/study_rehearsal.py SAMPLES_DIR --tokenizer /tmp/tok --run-dir /tmp/rehearsal \
        --out $OUT/study.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

# The seed study scaled down (everything else is configs/seed.yaml as written).
REHEARSAL = [
    "name=rehearsal",
    "data.train_per_source=48", "data.test_per_source=16", "data.train_buffer=56", "data.test_buffer=20",
    "prepare.validation_per_source=4",
    "model.config=builtin:gemma-3-1b",  # the study's model shape, random weights (no hub offline)
]
SAMPLE_FILES = ("alpaca/alpaca_4000.json", "tulu-v2-sft-mixture/tulu_v2_200.jsonl",
                "ultrachat_200k/ultrachat_800.jsonl")
TRAIN_KEYS = ("train_time_s", "model_load_s", "data_load_s", "tokens_trained", "tokens_per_s", "optimizer_steps",
              "step_s_median", "first_step_s", "peak_gpu_alloc_gib", "rows", "final_loss", "execution")


def rehearsal_overrides(samples: str, tokenizer: str) -> list[str]:
    paths = [f"data.sources.{i}.path={Path(samples) / name}" for i, name in enumerate(SAMPLE_FILES)]
    return [*REHEARSAL, *paths, f"model.name_or_path={tokenizer}"]


def _train_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    summary = {key: metrics.get(key) for key in TRAIN_KEYS}
    if metrics.get("stages"):
        summary["stages"] = [{key: stage.get(key) for key in (*TRAIN_KEYS, "method", "kind", "merge_time_s")}
                             for stage in metrics["stages"]]
    return summary


def _eval_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    keep = ("n", "bleu4", "rougeL", "generation", "ensemble")
    return {key: metrics[key] for key in keep if key in metrics}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", help="folder of the dataset samples (alpaca/, tulu-v2-sft-mixture/, ultrachat_200k/)")
    parser.add_argument("--tokenizer", default="builtin:gemma-3-270m")
    parser.add_argument("--run-dir", type=Path, default=Path("/tmp/rehearsal"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="more overrides after the rehearsal's (e.g. a tiny shape for a CPU smoke run)")
    args = parser.parse_args()

    from peftlab.config import evaluated_models, load_config
    from peftlab.rundir import hardware, package_versions, write_json, write_provenance
    from peftlab.workflow import run_evaluate, run_prepare, run_report, run_train

    overrides = [*rehearsal_overrides(args.samples, args.tokenizer), *args.extra]
    config = load_config("seed", overrides)
    run_dir = args.run_dir
    report: dict[str, Any] = {"config": "seed", "overrides": overrides, "gpu": hardware().get("gpu") or "cpu",
                              "versions": package_versions(), "command": " ".join(sys.argv), "stages": [],
                              "partial": True}

    def timed(name: str, fn) -> Any:
        started = time.perf_counter()
        result = fn()
        entry = {"stage": name, "seconds": time.perf_counter() - started}
        if name.startswith("train "):
            entry["metrics"] = _train_summary(result)
        elif name.startswith("evaluate ") and result:
            entry["metrics"] = _eval_summary(result)
        elif name == "prepare":
            entry["data"] = {split: {k: v for k, v in s.items() if k in ("rows", "tokens", "mean_tokens")}
                             for split, s in result["splits"].items()}
        report["stages"].append(entry)
        write_json(args.out, report)
        print(f"{name}: {entry['seconds']:.1f} s", file=sys.stderr, flush=True)
        return result

    started = time.perf_counter()
    timed("prepare", lambda: run_prepare(config, run_dir))
    write_provenance(run_dir, config)
    for method in config.methods:
        timed(f"train {method}", lambda m=method: run_train(config, run_dir, m))
    for model in evaluated_models(config):
        timed(f"evaluate {model}", lambda m=model: run_evaluate(config, run_dir, m))

    def results_and_report() -> None:
        from peftlab.results import collect_results

        collect_results(config, run_dir)
        run_report(run_dir)

    timed("report", results_and_report)
    report["total_s"] = time.perf_counter() - started
    report.pop("partial")
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
