"""GPU check for issue 3: every method trains on the Gemma-3-1B shape (random weights) with the
study's batch settings (4 rows x 4 accumulation, max_seq_length 2048, gradient checkpointing) for a
few optimizer steps on the real samples, and the resource accounting is collected into one JSON.

Usage (on the GPU machine, from the repository root):
    python benchmarks/train_methods_1b.py --tokenizer DIR --out OUT.json [--steps 5] [--methods qlora,galore,...]
Each method runs in its own process (`peftlab train`), so peak memory counters never mix.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--run-dir", default="/tmp/peftlab-1b", type=Path)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--methods", default="qlora,galore,lora,full,hybrid")
    parser.add_argument("--samples", default="../shared/data/seeds-samples")
    args = parser.parse_args()

    samples = Path(args.samples)
    overrides = [
        f"model.tokenizer={args.tokenizer}", "model.config=builtin:gemma-3-1b", "model.dtype=bfloat16",
        "model.attn_implementation=sdpa",
        f"data.sources.0.path={samples}/alpaca/alpaca_4000.json",
        f"data.sources.1.path={samples}/tulu-v2-sft-mixture/tulu_v2_200.jsonl",
        f"data.sources.2.path={samples}/ultrachat_200k/ultrachat_800.jsonl",
        f"methods.qlora.max_steps={args.steps}", f"methods.galore.max_steps={args.steps}",
        f"methods.lora.max_steps={args.steps}", f"methods.full.max_steps={args.steps}",
        "methods.lora.kind=lora", "methods.full.kind=full", "methods.full.lr=1.0e-5",
        f"methods.hybrid.stages.0.max_steps={args.steps}", f"methods.hybrid.stages.2.max_steps={args.steps}",
    ]
    sets = [x for item in overrides for x in ("--set", item)]
    base = [sys.executable, "-m", "peftlab"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    report: dict = {"command": " ".join(sys.argv), "overrides": overrides, "runs": {}}
    subprocess.run([*base, "prepare", "samples", "--out", str(args.run_dir), *sets], check=True, env=env)
    for method in args.methods.split(","):
        started = time.perf_counter()
        done = subprocess.run([*base, "train", "samples", "--method", method, "--out", str(args.run_dir), *sets],
                              env=env)
        entry: dict = {"exit_code": done.returncode, "wall_s": time.perf_counter() - started}
        metrics_path = args.run_dir / "train" / method / "metrics.json"
        if done.returncode == 0 and metrics_path.exists():
            metrics = json.loads(metrics_path.read_text())
            metrics.pop("method_config", None)
            entry.update(metrics)
        report["runs"][method] = entry
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
