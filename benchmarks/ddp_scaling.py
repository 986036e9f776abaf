"""Issue 6 on the 2-GPU machine: tokens/s of `peftlab train` on 1 and on 2 GPUs (DDP via torchrun)
at the study's per-GPU batch (4 rows x 4 accumulation), Gemma-3-1B shape, real samples.

Usage (GPU machine, repository root):
    python benchmarks/ddp_scaling.py --tokenizer DIR --samples DIR --out OUT.json [--steps 8] [--methods lora,full,qlora]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--samples", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--methods", default="lora,full,qlora,galore")
    parser.add_argument("--run-dir", type=Path, default=Path("/tmp/peftlab-ddp"))
    args = parser.parse_args()
    s = args.samples
    sets = [
        f"model.tokenizer={args.tokenizer}", "model.config=builtin:gemma-3-1b", "model.dtype=bfloat16",
        f"data.sources.0.path={s}/alpaca/alpaca_4000.json",
        f"data.sources.1.path={s}/tulu-v2-sft-mixture/tulu_v2_200.jsonl",
        f"data.sources.2.path={s}/ultrachat_200k/ultrachat_800.jsonl",
        "data.max_seq_length=1024", "train.save_steps=100000",
        "methods.lora.kind=lora", "methods.full.kind=full", "methods.full.lr=1.0e-5",
    ] + [f"methods.{m}.max_steps={args.steps}" for m in ("lora", "full", "qlora", "galore")]
    flags = [x for item in sets for x in ("--set", item)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, "-m", "peftlab"]
    subprocess.run([*base, "prepare", "samples", "--out", str(args.run_dir), *flags], check=True, env=env)
    report: dict = {"command": " ".join(sys.argv), "overrides": sets, "runs": []}
    for method in args.methods.split(","):
        for gpus in (1, 2):
            out = args.run_dir / f"g{gpus}"
            out.mkdir(parents=True, exist_ok=True)
            if not (out / "data").exists():
                (out / "data").symlink_to(args.run_dir / "data")
            done = subprocess.run([*base, "train", "samples", "--method", method, "--out", str(out),
                                   "--gpus", str(gpus), *flags], env=env)
            entry = {"method": method, "gpus": gpus, "exit_code": done.returncode}
            path = out / "train" / method / "metrics.json"
            if done.returncode == 0 and path.exists():
                m = json.loads(path.read_text())
                entry.update({k: m.get(k) for k in ("tokens_per_s", "tokens_trained", "train_time_s", "optimizer_steps",
                                                    "peak_gpu_alloc_gib", "per_rank", "world_size", "final_loss",
                                                    "step_s_median", "loss_curve")})
            report["runs"].append(entry)
            args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
