"""`peftlab bench train`: plans the (method, profile) runs, runs each in its own process, and writes
the JSON report (rows, MFU, steady rate, settings; `--resume` keeps finished runs) and its figures."""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from peftlab.bench.plots import plot_loss_curves, plot_speed_and_memory
from peftlab.bench.worker import run_in_subprocess
from peftlab.bench.workload import (
    HYBRID_STAGES,
    METHODS,
    PROFILES,
    BenchSpec,
    default_sources,
    flops_per_token,
    peak_flops,
    study_hyperparameters,
    workload_config,
)
from peftlab.errors import UserError
from peftlab.train.kernel_warmup import triton_cache_files


def steady_tokens_per_s(run: dict[str, Any]) -> float | None:
    """Mean tokens per optimizer step / median step time: the rate once one-off first-step work
    (GaLore's initial SVDs, allocator growth, kernel compilation) is paid, as in a long run."""
    steps, median = run.get("optimizer_steps"), run.get("step_s_median")
    if not steps or not median:
        return None
    return run["tokens_trained"] / steps / median


def run_settings(spec: BenchSpec) -> dict[str, Any]:
    """The resolved method settings a run trains with (JSON-normalised), so `--resume` never keeps a run
    whose profile has changed since."""
    if spec.profile == "reference":
        return {"reference": study_hyperparameters(spec.method)}
    methods = workload_config(spec).methods
    if spec.method == "hybrid":  # what its stages train with
        return json.loads(json.dumps({name: asdict(methods[name]) for name in (*HYBRID_STAGES, "hybrid")},
                                     default=str))
    return json.loads(json.dumps(asdict(methods[spec.method]), default=str))


def bench_row(spec: BenchSpec, result: dict[str, Any], gpu: str | None) -> dict[str, Any]:
    from peftlab.models import read_model_config

    metrics = result["metrics"]
    shape = read_model_config(spec.shape)
    trains_all = metrics["trainable_params"] >= metrics["total_params"]
    per_token = flops_per_token(shape, metrics["total_params"], trains_all, result["mean_seq"])
    peak = peak_flops(gpu)
    row = {
        "method": spec.method, "profile": spec.profile,
        "tokens_per_s": metrics["tokens_per_s"],
        "mfu": metrics["tokens_per_s"] * per_token / peak if peak else None,
        "peak_alloc_gib": metrics["peak_gpu_alloc_gib"], "peak_reserved_gib": metrics["peak_gpu_reserved_gib"],
        "step_s_median": metrics.get("step_s_median"), "first_step_s": metrics.get("first_step_s"),
        "first_steps_s": metrics.get("first_steps_s"),
        "max_seq_length": result["max_seq_length"], "rows": result["rows"],
        "optimizer_steps": metrics["optimizer_steps"], "tokens_trained": metrics["tokens_trained"],
        "train_time_s": metrics["train_time_s"], "flops_per_token": per_token,
        "trainable_params": metrics["trainable_params"], "total_params": metrics["total_params"],
        "loss_curve": metrics.get("loss_curve", []),
        "settings": run_settings(spec),
        # How `peftlab train` ran it (peftlab.train.execution); the reference has none.
        "execution": metrics.get("execution"),
    }
    row["steady_tokens_per_s"] = steady_tokens_per_s(row)
    return row


def stage_row(spec: BenchSpec, stage: dict[str, Any], gpu: str | None) -> dict[str, Any]:
    """A hybrid stage's row: method `hybrid:<stage method>` (its reference is that method's)."""
    row = bench_row(spec, stage, gpu)
    row["method"] = f"hybrid:{stage['stage']}"
    if "merge_s" in stage:
        row["merge_before_s"] = stage["merge_s"]
    return row


def finished_runs(out: Path | None, workload: dict[str, Any]) -> list[dict[str, Any]]:
    """`--resume`: the runs of an earlier report at `out` that finished on the same workload.

    A report written for another workload (shape, rows, steps, data) is refused rather than mixed."""
    if out is None:
        raise UserError("bench train --resume needs --out (the report to continue)")
    if not out.exists():
        return []
    try:
        earlier = json.loads(out.read_text())
    except ValueError as exc:
        raise UserError(f"bench train --resume: {out} is not a JSON report ({exc})") from None
    if not isinstance(earlier, dict) or not isinstance(earlier.get("runs"), list):
        raise UserError(f"bench train --resume: {out} is not a bench report (no runs list)")
    if "workload" not in earlier:
        raise UserError(f"bench train --resume: {out} predates --resume (it records no workload); use a new --out")
    if earlier["workload"] != workload:
        raise UserError(f"bench train --resume: {out} was written for another workload ({earlier['workload']});"
                        " use a new --out")
    return [run for run in earlier["runs"] if isinstance(run, dict) and "error" not in run]


def _earlier_commands(out: Path | None) -> list[str]:
    if out is None or not out.exists():
        return []
    earlier = json.loads(out.read_text())  # finished_runs has checked it
    return list(earlier.get("commands") or [earlier["command"]])


def plan_order(runs: list[dict[str, Any]], plan: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Runs in the order of the plan (kept and new ones alike); runs outside the plan last."""
    position = {pair: index for index, pair in enumerate(plan)}
    return sorted(runs, key=lambda run: position.get((run["method"].split(":")[0], run["profile"]), len(plan)))


def run_bench(methods: list[str], profiles: list[str], *, reference: bool, shape: str, tokenizer: str,
              data_dir: str | None, rows_per_source: int, max_steps: int, out: Path | None,
              resume: bool = False) -> dict[str, Any]:
    from peftlab.rundir import hardware, package_versions

    for method in methods:
        if method not in METHODS and method != "hybrid":
            raise UserError(f"bench train --methods: unknown method '{method}'"
                            f" (known: {', '.join([*METHODS, 'hybrid'])})")
    for profile in profiles:
        if profile not in PROFILES:
            raise UserError(f"bench train --profiles: unknown profile '{profile}' (known: {', '.join(PROFILES)})")
    gpu = hardware().get("gpu")
    # No reference recipe for the hybrid: its stages compare with the QLoRA and GaLore references.
    plan = list(dict.fromkeys((m, p) for m in methods
                              for p in ([*profiles, "reference"] if reference and m != "hybrid" else profiles)))
    sources = default_sources(data_dir)
    workload = {"gpu": gpu or "cpu", "shape": shape, "tokenizer": tokenizer, "rows_per_source": rows_per_source, "max_steps": max_steps,
                "sources": [s["path"] if s["path"].startswith("demo:") else str(Path(s["path"]).resolve())
                            for s in sources]}
    done = finished_runs(out, workload) if resume else []
    command = " ".join(["peftlab", *sys.argv[1:]])
    report: dict[str, Any] = {"gpu": gpu or "cpu", "versions": package_versions(),
                              "command": command, "workload": workload, "runs": done}
    if resume:
        report["kept_runs"] = [[r["method"], r["profile"]] for r in done]
        # Every invocation that wrote this report, oldest first (the kept runs come from the earlier ones).
        report["commands"] = [*_earlier_commands(out), command]
    for index, (method, profile) in enumerate(plan, start=1):
        kept = [r for r in done if r["method"].split(":")[0] == method and r["profile"] == profile]
        spec = BenchSpec(method, profile, shape, tokenizer, sources, rows_per_source, 1024, max_steps)
        if kept and all(r.get("settings") == run_settings(spec) for r in kept):
            print(f"[{index}/{len(plan)}] {method} / {profile}: kept from {out}", file=sys.stderr, flush=True)
            continue
        if kept:
            print(f"[{index}/{len(plan)}] {method} / {profile}: its settings changed since {out}, running it again",
                  file=sys.stderr, flush=True)
            report["runs"] = [r for r in report["runs"] if r not in kept]
            report["kept_runs"] = [k for k in report["kept_runs"] if k[0].split(":")[0] != method or k[1] != profile]
        print(f"[{index}/{len(plan)}] {method} / {profile}", file=sys.stderr, flush=True)
        cached_kernels = triton_cache_files()
        with tempfile.TemporaryDirectory(prefix="peftlab-bench-") as work:
            spec = replace(spec, work_dir=work)
            result = run_in_subprocess(spec, Path(work))
        if "stages" in result:
            rows = [stage_row(spec, stage, gpu) for stage in result["stages"]]
        else:
            rows = [bench_row(spec, result, gpu) if "metrics" in result else {"method": method, "profile": profile,
                                                                              **result}]
        for row in rows:  # a cold cache: this run compiled its Triton kernels (liger) inside its loop
            row["triton_cache_files_at_start"] = cached_kernels
        report["runs"] = plan_order([*report["runs"], *rows], plan)
        if out is not None:
            _write(out, report)
    print(format_table(report["runs"]), file=sys.stderr)
    if out is not None:
        _write(out, report)  # also when every run was kept
        plot_loss_curves(report["runs"], out.with_suffix(".loss.png"))
        plot_speed_and_memory(report["runs"], out.with_suffix(".png"))
    return report


def _write(path: Path, report: dict[str, Any]) -> None:
    from peftlab.rundir import write_json

    write_json(path, report)


def format_table(runs: list[dict[str, Any]]) -> str:
    head = (f"{'method':<13} {'profile':<10} {'tokens/s':>10} {'steady':>8} {'MFU':>6} {'peak alloc':>11}"
            f" {'reserved':>9} {'step s':>7}")
    lines = [head, "-" * len(head)]
    for run in runs:
        if "error" in run:
            lines.append(f"{run['method']:<13} {run['profile']:<10} {run['error']}")
            continue

        def num(value, fmt: str, width: int, unit: str = "") -> str:
            return (format(value, fmt) + unit if value is not None else "n/a").rjust(width)

        lines.append(f"{run['method']:<13} {run['profile']:<10} {run['tokens_per_s']:>10.0f}"
                     f" {num(run.get('steady_tokens_per_s'), '.0f', 8)} {num(run['mfu'], '.1%', 6)}"
                     f" {num(run['peak_alloc_gib'], '.2f', 11, ' GiB')} {num(run['peak_reserved_gib'], '.2f', 9, ' GiB')}"
                     f" {num(run['step_s_median'], '.2f', 7)}")
    return "\n".join(lines)
