"""Where the time and memory of a `peftlab bench` run go: torch.profiler over a few optimizer steps.

For each METHOD:PROFILE it trains the bench workload (Gemma-3-1B shape, random weights) for
`--steps` steps, profiles steps 3..steps, and writes: GPU busy time vs wall time (how much of the
step the GPU is idle, i.e. launch/Python bound), the top operators by GPU and by CPU time, and
the memory at the start of training (weights + optimizer setup) vs the peak.

All runs share one process. liger-kernel's module-level patches (a `fast-liger` run) are undone when
a later run loads a model without liger, but list `fast-liger` runs last anyway.

With `--memory` it records the CUDA allocator's history instead and lists, at the moment allocated
memory peaked, which code holds how much (`peftlab.train.meter.peak_allocation_sites`). With
`--phases` it only reads and resets the peak counter at marks within each step (layer forwards,
checkpointing recomputes, the loss, the optimizer: `peftlab.train.meter.PhasePeaks`) and lists the
spans with the highest peaks; no history is recorded (the `--memory` recording crashed once inside
`cross_entropy_loss` on the H200).

Usage (GPU machine, repository root):
    python benchmarks/profile_train.py --data DIR --tokenizer DIR --out OUT.json qlora:fast galore:fast qlora:lowmem
    python benchmarks/profile_train.py --memory --steps 3 --data DIR --tokenizer DIR --out MEM.json qlora:lowmem
    python benchmarks/profile_train.py --phases --steps 8 --data DIR --tokenizer DIR --out PHASES.json qlora:lowmem
    python benchmarks/profile_train.py --python --steps 5 --data DIR --tokenizer DIR --out FIRST.json qlora:default
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class RecordMemory(TrainerCallback):
    """`--memory`: the allocator's history from the start of training (no time profile: it would slow
    the host further); `result()` names the code holding the memory at the peak."""

    MAX_ENTRIES = 5_000_000  # a ring buffer: when full, the oldest events are gone and the replay is wrong

    def __init__(self) -> None:
        self.baseline = 0

    def on_train_begin(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self.baseline = torch.cuda.memory_stats()["requested_bytes.all.current"]
        torch.cuda.memory._record_memory_history(max_entries=self.MAX_ENTRIES, stacks="python")

    def result(self) -> dict:
        from peftlab.train.meter import peak_allocation_sites

        snapshot = torch.cuda.memory._snapshot(augment_with_fx_traces=True)
        torch.cuda.memory._record_memory_history(enabled=None)
        trace = snapshot["device_traces"][torch.cuda.current_device()]
        found = peak_allocation_sites(trace, self.baseline, top=25)
        for site in found["sites"]:
            site["mib"] = site.pop("bytes") / 2**20
        stats = torch.cuda.memory_stats()
        return {"memory_at_train_start_gib": self.baseline / 2**30, "trace_peak_gib": found.pop("peak_bytes") / 2**30,
                "requested_peak_gib": stats["requested_bytes.all.peak"] / 2**30,
                "trace_recorded_peak_mib": found.pop("recorded_peak_bytes") / 2**20,
                "trace_truncated": len(trace) >= self.MAX_ENTRIES, **found}


class ProfileSteps(TrainerCallback):
    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.profiler = None
        self.started = 0.0
        self.wall = 0.0
        self.memory_at_start = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.memory_at_start = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            self.profiler = torch.profiler.profile(activities=activities)
            _sync()
            self.profiler.start()
            self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None and state.global_step == self.last:
            _sync()
            self.wall = time.perf_counter() - self.started
            self.profiler.stop()


class PythonProfileSteps(TrainerCallback):
    """`--python`: cProfile from the start of training to the end of step `last` (the first steps'
    one-off work: Triton compiles, warm-up bins, graph captures, the first GaLore projection)."""

    def __init__(self, last: int) -> None:
        import cProfile

        self.last = last
        self.profiler = cProfile.Profile()
        self.wall = 0.0
        self.started = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        _sync()
        self.started = time.perf_counter()
        self.profiler.enable()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.last:
            _sync()
            self.profiler.disable()
            self.wall = time.perf_counter() - self.started

    def result(self, top: int = 45) -> dict:
        import pstats

        stats = pstats.Stats(self.profiler)
        rows = []
        for (path, line, name), (_, calls, own, cumulative, _) in stats.stats.items():
            where = "/".join(Path(path).parts[-3:]) if path != "~" else "builtin"
            rows.append({"function": f"{where}:{line}({name})", "calls": calls, "own_s": round(own, 4),
                         "cumulative_s": round(cumulative, 4)})
        return {"wall_s": self.wall,
                "by_cumulative": sorted(rows, key=lambda r: -r["cumulative_s"])[:top],
                "by_own": sorted(rows, key=lambda r: -r["own_s"])[:top]}


# Kernel-name fragments per category, first match wins (cuBLAS/cutlass GEMMs, PyTorch's attention kernels,
# bitsandbytes' kernels, which all start with "k" + CamelCase, cuSOLVER's SVD/eigensolvers).
KERNEL_CATEGORIES = (
    ("attention", ("fmha", "flash", "attention")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90_", "sm80_")),
    ("vocabulary softmax", ("softmax", "cross_entropy", "nll_loss", "logsumexp")),
    ("linear algebra (SVD, eigh, QR)", ("gesvd", "syevd", "syevj", "geqrf", "orgqr", "ormqr", "lapack", "magma",
                                        "cusolver", "svd", "sytrd", "stedc", "larf", "potrf")),
    ("bitsandbytes (4-bit dequantise, 8-bit optimizer)", ("kdequantize", "kquantize", "koptimizer", "kgemm",
                                                         "kpreconditionoptimizer", "bitsandbytes")),
    ("triton (liger, compiled)", ("triton",)),
    ("element-wise, copies, reductions", ("elementwise", "copy", "reduce", "fill", "catarray", "index",
                                          "scatter", "gather", "foreach", "bernoulli", "fused_dropout",
                                          "where", "cat_", "memcpy", "memset")),
)


def kernel_category(name: str) -> str:
    lowered = name.lower()
    for category, fragments in KERNEL_CATEGORIES:
        if any(fragment in lowered for fragment in fragments):
            return category
    return "other"


def time_by_category(kernels: list, steps: int) -> dict[str, dict[str, float]]:
    """GPU milliseconds and launches per step, per kernel category, largest first."""
    totals: dict[str, list[float]] = {}
    for event in kernels:
        entry = totals.setdefault(kernel_category(event.key), [0.0, 0])
        entry[0] += event.self_device_time_total / 1e3
        entry[1] += event.count
    ordered = sorted(totals.items(), key=lambda item: -item[1][0])
    return {name: {"gpu_ms_per_step": ms / steps, "launches_per_step": count / steps} for name, (ms, count) in ordered}


def top_ops(profiler, key: str, count: int = 20) -> list[dict]:
    rows = sorted(profiler.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:count]
    return [{"op": e.key, "calls": e.count, "self_gpu_ms": e.self_device_time_total / 1e3,
             "self_cpu_ms": e.self_cpu_time_total / 1e3} for e in rows]


def memory_one(method: str, profile: str, args) -> dict:
    from peftlab.bench.workload import BenchSpec, default_sources, prepare_workload
    from peftlab.train import runner

    with tempfile.TemporaryDirectory(prefix="peftlab-memory-") as work:
        spec = BenchSpec(method, profile, args.shape, args.tokenizer, default_sources(args.data), 190, 1024,
                         args.steps, work, args.overrides)
        config, run_dir = prepare_workload(spec)
        callback = RecordMemory()
        metrics = runner.train_method(config, run_dir, method, callbacks=[callback])
        found = callback.result()
    return {"method": method, "profile": profile, "steps": args.steps, "peak_alloc_gib": metrics["peak_gpu_alloc_gib"],
            **found}


def phases_one(method: str, profile: str, args) -> dict:
    from peftlab.bench.workload import BenchSpec, default_sources, prepare_workload
    from peftlab.train import runner
    from peftlab.train.meter import PhasePeaks

    def read_and_reset() -> int:
        peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return peak

    with tempfile.TemporaryDirectory(prefix="peftlab-phases-") as work:
        spec = BenchSpec(method, profile, args.shape, args.tokenizer, default_sources(args.data), 190, 1024,
                         args.steps, work, args.overrides)
        config, run_dir = prepare_workload(spec)
        phases = PhasePeaks(read_and_reset)
        runner.train_method(config, run_dir, method, callbacks=[phases])
    # The marks reset torch's peak counter, so the run's own peak (read after training) is not the
    # training peak here: the highest span is.
    return {"method": method, "profile": profile, "steps": args.steps,
            "peak_alloc_gib": max(phases.peaks.values(), default=0) / 2**30, **phases.result(top=25)}


def python_one(method: str, profile: str, args) -> dict:
    from peftlab.bench.workload import BenchSpec, default_sources, prepare_workload
    from peftlab.train import runner

    with tempfile.TemporaryDirectory(prefix="peftlab-python-") as work:
        spec = BenchSpec(method, profile, args.shape, args.tokenizer, default_sources(args.data), 190, 1024,
                         args.steps, work, args.overrides)
        config, run_dir = prepare_workload(spec)
        callback = PythonProfileSteps(args.steps)
        metrics = runner.train_method(config, run_dir, method, callbacks=[callback])
    return {"method": method, "profile": profile, "steps": args.steps, "model_load_s": metrics["model_load_s"],
            "data_load_s": metrics["data_load_s"], "first_steps_s": metrics.get("first_steps_s"),
            "execution": metrics["execution"], **callback.result()}


def profile_one(method: str, profile: str, args) -> dict:
    from peftlab.bench.workload import BenchSpec, default_sources, prepare_workload
    from peftlab.train import runner

    with tempfile.TemporaryDirectory(prefix="peftlab-profile-") as work:
        spec = BenchSpec(method, profile, args.shape, args.tokenizer, default_sources(args.data), 190, 1024,
                         args.steps, work, args.overrides)
        config, run_dir = prepare_workload(spec)
        callback = ProfileSteps(3, args.steps)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        metrics = runner.train_method(config, run_dir, method, callbacks=[callback])
    if callback.profiler is None:
        raise RuntimeError(f"--steps {args.steps}: nothing was profiled (profiling starts at step 3)")
    # Kernel rows only: operator rows and GPU-side annotation spans (Optimizer.step#...) carry the
    # same device time again.
    kernels = [e for e in callback.profiler.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    gpu_busy_ms = sum(e.self_device_time_total for e in kernels) / 1e3
    steps = args.steps - 2  # steps 3..steps
    return {
        "method": method, "profile": profile, "profiled_steps": steps,
        "wall_ms_per_step": callback.wall * 1e3 / steps, "gpu_busy_ms_per_step": gpu_busy_ms / steps,
        "gpu_busy_fraction": gpu_busy_ms / (callback.wall * 1e3) if callback.wall else None,
        "kernel_launches_per_step": sum(e.count for e in kernels) / steps,
        "gpu_time_by_category": time_by_category(kernels, steps),
        "memory_at_train_start_gib": callback.memory_at_start / 2**30,
        "peak_alloc_gib": metrics["peak_gpu_alloc_gib"], "tokens_per_s": metrics["tokens_per_s"],
        "top_gpu_ops": top_ops(callback.profiler, "self_device_time_total"),
        "top_cpu_ops": top_ops(callback.profiler, "self_cpu_time_total"),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", help="METHOD:PROFILE, e.g. qlora:fast")
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--shape", default="builtin:gemma-3-1b")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--memory", action="store_true",
                        help="instead of the time profile: record the allocator's history over --steps steps and"
                             " list the code holding memory at the peak")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a method setting over the profile's (as `peftlab --set`), e.g. quant.compute_dtype=bfloat16;"
                             " repeatable, applies to every run")
    parser.add_argument("--phases", action="store_true",
                        help="instead: the peak allocated memory per span of each step (layers, loss, optimizer)")
    parser.add_argument("--python", action="store_true",
                        help="instead: cProfile of the first --steps steps (their one-off work), top functions")
    args = parser.parse_args()
    args.overrides = list(args.set)
    if args.memory and args.phases:
        parser.error("--memory and --phases: one at a time")
    memory_mode = args.memory or args.phases or args.python
    if args.steps < (1 if memory_mode else 3):
        parser.error("--steps must be at least 3 (profiling starts at step 3)" if not memory_mode
                     else "--steps must be at least 1")
    report = {"command": " ".join(["python", *sys.argv]), "overrides": args.overrides, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "runs": []}
    for item in args.runs:
        method, profile = item.split(":")
        try:
            one = (memory_one if args.memory else phases_one if args.phases else python_one if args.python
                   else profile_one)
            report["runs"].append(one(method, profile, args))
        except Exception as exc:
            report["runs"].append({"method": method, "profile": profile, "error": f"{type(exc).__name__}: {exc}"[:400]})
        args.out.write_text(json.dumps(report, indent=2))
        last = report["runs"][-1]
        print(json.dumps({k: last.get(k) for k in ("method", "profile", "wall_ms_per_step", "gpu_busy_fraction",
                                                    "memory_at_train_start_gib", "peak_alloc_gib", "trace_peak_gib",
                                                    "error")}),
              flush=True)
        for site in last.get("sites", [])[:12]:
            print(f"  {site['mib']:9.1f} MiB {site['blocks']:6d} blocks  {site['site']}", flush=True)
        for category, row in last.get("gpu_time_by_category", {}).items():
            print(f"  {row['gpu_ms_per_step']:8.1f} GPU ms/step {row['launches_per_step']:8.0f} launches  {category}", flush=True)
        for row in last.get("by_cumulative", [])[:30]:
            print(f"  {row['cumulative_s']:8.3f} s cum {row['own_s']:8.3f} s own {row['calls']:7d}  {row['function']}",
                  flush=True)
        for span in last.get("spans", [])[:12]:
            print(f"  {span['peak_mib']:9.1f} MiB  {span['span']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
