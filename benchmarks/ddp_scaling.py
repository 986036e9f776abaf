"""Issue 6 on the 2-GPU machine: `peftlab train` on 1 and on 2 GPUs (torchrun: DDP, or FSDP with
`--fsdp`), Gemma-3-1B shape with random weights, the real samples, max_seq_length 1024.

Each RUN is METHOD:GPUS[:VARIANT]:
- `lora:1`, `lora:2`: the study's per-GPU batch (4 rows x 4 accumulation) on 1 and 2 GPUs, so
  2 GPUs train twice the rows per optimizer step (the scaling target: >= 1.8x tokens/s);
- `lora:2:same`: 2 GPUs at the same effective batch as 1 GPU (4 x 2 accumulation per GPU), whose
  loss curve should match `lora:1` within noise (the global sample order is the same);
- `lora:2:fsdp`: FSDP instead of DDP (lora, qlora with bf16 quant storage, full).

Usage (a machine with 2 GPUs, repository root; SAMPLES and TOKENIZER as in benchmarks/README.md):
    python benchmarks/ddp_scaling.py --tokenizer TOKENIZER --samples SAMPLES --out OUT.json \
        [--steps 8] lora:1 lora:2 lora:2:same lora:2:fsdp ...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

KEYS = ("tokens_per_s", "tokens_trained", "train_time_s", "optimizer_steps", "rows", "strategy", "world_size",
        "peak_gpu_alloc_gib", "peak_gpu_alloc_gib_total", "per_rank", "final_loss", "step_s_median",
        "first_step_s", "loss_curve", "optimizer")


def study_overrides(tokenizer: str, samples: str, steps: int, shape: str) -> list[str]:
    return [
        f"model.tokenizer={tokenizer}", f"model.config={shape}", "model.dtype=bfloat16",
        f"data.sources.0.path={samples}/alpaca/alpaca_4000.json",
        f"data.sources.1.path={samples}/tulu-v2-sft-mixture/tulu_v2_200.jsonl",
        f"data.sources.2.path={samples}/ultrachat_200k/ultrachat_800.jsonl",
        "data.max_seq_length=1024", "train.save_steps=100000",
        "methods.lora.kind=lora", "methods.full.kind=full", "methods.full.lr=1.0e-5",
        # The 8-bit paged optimizer cannot step FSDP's sharded parameters: AdamW for every qlora run.
        "methods.qlora.optimizer=adamw_torch",
    ] + [f"methods.{m}.max_steps={steps}" for m in ("lora", "full", "qlora", "galore")]


VARIANTS = ("", "same", "fsdp")


def parse_spec(spec: str) -> tuple[str, int, str]:
    """METHOD:GPUS[:same|:fsdp] -> (method, gpus, variant); `same` and `fsdp` need 2+ GPUs."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit() or int(parts[1]) < 1:
        raise SystemExit(f"ddp_scaling: bad run '{spec}': expected METHOD:GPUS[:same|:fsdp], e.g. lora:2:fsdp")
    variant = parts[2] if len(parts) == 3 else ""
    if variant not in VARIANTS or (variant and int(parts[1]) < 2):
        raise SystemExit(f"ddp_scaling: bad run '{spec}': the variant is 'same' or 'fsdp', on 2 or more GPUs")
    return parts[0], int(parts[1]), variant


def run_one(spec: str, base_flags: list[str], run_root: Path) -> dict:
    method, gpus, variant = parse_spec(spec)
    out = run_root / spec.replace(":", "-")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "data").exists():
        (out / "data").symlink_to(run_root / "data")
    flags = list(base_flags)
    if variant == "same":
        flags += ["--set", f"methods.{method}.grad_accum=2"]
    command = [sys.executable, "-m", "peftlab", "train", "samples", "--method", method, "--out", str(out),
               "--gpus", str(gpus), *flags, *(["--fsdp"] if variant == "fsdp" else [])]
    started = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True)
    entry: dict = {"run": spec, "method": method, "gpus": gpus, "variant": (variant or "ddp") if gpus > 1 else "single",
                   "exit_code": done.returncode, "wall_s": time.perf_counter() - started}
    path = out / "train" / method / "metrics.json"
    if done.returncode == 0 and path.exists():
        metrics = json.loads(path.read_text())
        entry.update({k: metrics.get(k) for k in KEYS})
        if metrics.get("optimizer_steps") and metrics.get("step_s_median"):
            entry["steady_tokens_per_s"] = metrics["tokens_trained"] / metrics["optimizer_steps"] / metrics["step_s_median"]
    else:
        entry["stderr_tail"] = done.stderr[-1500:]
    return entry


def speedups(runs: list[dict]) -> list[dict]:
    """2-GPU runs against the 1-GPU run of the same method: loop and steady tokens/s ratios."""
    single = {r["method"]: r for r in runs if r["variant"] == "single" and r.get("tokens_per_s")}
    rows = []
    for run in runs:
        one = single.get(run["method"])
        if run["gpus"] > 1 and one and run.get("tokens_per_s"):
            steady, base = run.get("steady_tokens_per_s"), one.get("steady_tokens_per_s")
            rows.append({"run": run["run"], "loop_speedup": run["tokens_per_s"] / one["tokens_per_s"],
                         "steady_speedup": steady / base if steady and base else None})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", help="METHOD:GPUS[:same|:fsdp], e.g. lora:1 lora:2 lora:2:fsdp")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--samples", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--shape", default="builtin:gemma-3-1b", help="model shape (a tiny one for a CPU try)")
    parser.add_argument("--run-dir", type=Path, default=Path("/tmp/peftlab-ddp"),
                        help="prepared data is reused from here: use a new folder for other samples/tokenizer/shape")
    args = parser.parse_args()
    for spec in args.runs:
        parse_spec(spec)  # every spec is checked before anything runs
    sets = study_overrides(args.tokenizer, args.samples, args.steps, args.shape)
    flags = [x for item in sets for x in ("--set", item)]
    if not (args.run_dir / "data").exists():
        subprocess.run([sys.executable, "-m", "peftlab", "prepare", "samples", "--out", str(args.run_dir), *flags],
                       check=True)
    import torch

    report: dict = {"command": " ".join(["python", *sys.argv]), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                    "gpus_on_machine": torch.cuda.device_count(), "overrides": sets, "runs": []}
    for spec in args.runs:
        entry = run_one(spec, flags, args.run_dir)
        report["runs"].append(entry)
        report["speedups"] = speedups(report["runs"])
        args.out.write_text(json.dumps(report, indent=2))
        print(json.dumps({k: entry.get(k) for k in ("run", "exit_code", "wall_s", "tokens_per_s", "steady_tokens_per_s",
                                                    "peak_gpu_alloc_gib", "final_loss", "stderr_tail")}), flush=True)
    print(json.dumps(report["speedups"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
