"""GaLore resume on a GPU: an interrupted and resumed run gives the uninterrupted run's losses.

The CPU tests cover resume, but on one GPU the Trainer loads optimizer states onto the CPU, and the
bases inside galore-torch's projector objects are not moved back by `Optimizer.load_state_dict`
(peftlab's `restore_projectors` does it). This trains the bench workload on the tiny Gemma 3 shape
(real rows, the Gemma tokenizer) for each GaLore variant: 6 steps whole, then 6 steps cut after step
2 (a checkpoint at 2) and resumed, projections recomputed every 3 steps so the resumed run uses a
loaded basis before computing its own.

Usage (GPU machine, repository root; SAMPLES as in benchmarks/README.md):
    python benchmarks/galore_resume.py --data SAMPLES --tokenizer builtin:gemma-3-270m --out OUT.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

VARIANTS = {  # name: galore settings over the bench's
    "adamw": {},
    "adamw8bit": {"variant": "adamw8bit"},
    "projected-8bit": {"variant": "adamw8bit", "accumulate": "projected"},
    "adamw-svd": {"projection": "svd"},
}


def one(variant: str, changes: dict, args) -> dict:
    import torch

    from peftlab.bench.workload import BenchSpec, default_sources, prepare_workload
    from peftlab.train.runner import train_method

    with tempfile.TemporaryDirectory(prefix="peftlab-resume-") as work:
        spec = BenchSpec("galore", "fast", "builtin:tiny-gemma3", args.tokenizer, default_sources(args.data), 40,
                         512, 6, work)
        config, run_dir = prepare_workload(spec)
        method = config.method("galore")
        method = replace(method, save_steps=2, galore=replace(method.galore, update_proj_gap=3, **changes))
        whole = train_method(config, run_dir, "galore", method=method, out=Path(work) / "whole")
        with contextlib.suppress(KeyboardInterrupt):
            train_method(config, run_dir, "galore", method=method, out=Path(work) / "cut", stop_after=2)
        resumed = train_method(config, run_dir, "galore", method=method, out=Path(work) / "cut", resume=True)
    expected = [p["loss"] for p in whole["loss_curve"]]
    got = [p["loss"] for p in resumed["loss_curve"]]
    worst = max(abs(a - b) / max(abs(b), 1e-9) for a, b in zip(got, expected, strict=True))
    return {"variant": variant, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "resumed_from": resumed.get("resumed_from"), "losses_whole": expected, "losses_resumed": got,
            "max_relative_difference": worst, "same_curve": worst < 1e-3}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    report = {"command": " ".join(["python", *sys.argv]), "runs": []}
    for variant, changes in VARIANTS.items():
        try:
            report["runs"].append(one(variant, changes, args))
        except Exception as exc:  # record and go on: one variant's failure is a finding, not the end
            report["runs"].append({"variant": variant, "error": f"{type(exc).__name__}: {exc}"[:500]})
        args.out.write_text(json.dumps(report, indent=2))
        print(json.dumps({k: v for k, v in report["runs"][-1].items() if not k.startswith("losses")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
