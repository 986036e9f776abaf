"""`peftlab bench`: the BASELINE.md training workload, our profiles and the reference recipe, side by side.

Workload: a model of a given shape with random weights (default the exact Gemma-3-1B shape), the
Gemma 3 tokenizer, `rows_per_source` real rows per source (seed 42), loss on all tokens as the
reference does, an effective batch of 16 rows per optimizer step. Each run is a fresh process
(`python -m peftlab.bench --worker SPEC.json`) so peak-memory counters never mix.

Profiles of ours (all with the study's hyperparameters and effective batch):
- `fast`: 16 rows per micro-batch, no activation checkpointing, length-grouped batches, vocabulary
  logits 1,024 tokens at a time.
- `fast-liger` (GPU): `fast` plus liger-kernel's fused RMSNorm, GeGLU and RoPE.
- `fast-compile`: `fast` with every decoder layer compiled (`torch_compile`; the first steps compile).
- `lowmem`: the study's max_seq_length 2048 and effective batch 16; each 16-row batch runs as
  micro-batches of at most 2,048 padded tokens (the memory of one full-length row, several short
  rows at once), checkpointing, vocabulary logits 32 tokens at a time; GaLore with 8-bit Adam states,
  gradients summed at rank r (`galore.accumulate: projected`) and the tied embedding projected too.
- `reference` (`--reference`): the study's TRL `SFTTrainer` recipe exactly as BASELINE.md describes.

MFU = tokens/s x FLOPs per token / peak bf16 FLOP/s, with FLOPs per token = 6N (full weights
train) or 4N (frozen base + adapters: forward plus activation gradients) plus attention
12 x layers x heads x head_dim x mean sequence length; N counts every parameter once (the tied
embedding as the output projection); checkpointing's recomputation is not counted.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from peftlab.errors import UserError

# Dense bf16 peak of the GPU the bench runs on; H100/H200 SXM spec sheet value.
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}
STUDY_HYPERPARAMETERS = {
    "qlora": {"lr": 2e-4, "max_grad_norm": 0.3, "optimizer": "paged_adamw_8bit"},
    "lora": {"lr": 2e-4, "max_grad_norm": 0.3, "optimizer": "adamw_torch"},
    "galore": {"lr": 1e-4, "max_grad_norm": 1.0},
    "full": {"lr": 1e-5, "max_grad_norm": 1.0, "optimizer": "adamw_torch"},
}
PROFILES = {
    "fast": {"batch_size": 16, "grad_accum": 1, "gradient_checkpointing": False, "sampling": "group_by_length",
             "loss_chunk_tokens": 1024},
    "lowmem": {"batch_size": 16, "grad_accum": 1, "micro_batch_tokens": 2048, "gradient_checkpointing": True,
               "sampling": "random", "loss_chunk_tokens": 32, "max_seq_length": 2048},
}
# The report's sequential hybrid: QLoRA -> merge into the bf16 base -> GaLore; the bench times each stage.
HYBRID_STAGES = ("qlora", "galore")
PROFILES["fast-liger"] = {**PROFILES["fast"], "liger_kernel": True}
PROFILES["fast-compile"] = {**PROFILES["fast"], "torch_compile": True}
# Per-method changes to a profile: low-memory GaLore keeps its Adam states in 8 bits, sums its gradients at
# rank r (no full gradient set), and projects the tied embedding too, as the reference recipe does (its
# full-rank Adam states alone would be 0.56 GiB). (QLoRA's 4-bit matmuls compute in bf16 in every
# profile: `quant.compute_dtype`'s default.)
METHOD_PROFILE = {("galore", "lowmem"): {"galore": {"variant": "adamw8bit", "accumulate": "projected",
                                                    "targets": ["attn", "mlp", "embed_tokens"]}}}


# Rows sampled beyond `rows_per_source` so the few unusable rows (empty outputs) can be replaced.
ROW_SLACK = 10


@dataclass
class BenchSpec:
    method: str
    profile: str
    shape: str = "builtin:gemma-3-1b"
    tokenizer: str = "builtin:gemma-3-270m"
    sources: list[dict[str, str]] = field(default_factory=list)
    rows_per_source: int = 190  # the Tulu sample has 200 rows
    max_seq_length: int = 1024
    max_steps: int = -1
    work_dir: str = ""
    # Method settings over the profile's, `--set` style, e.g. ["quant.compute_dtype=bfloat16"] (A/B runs).
    overrides: list[str] = field(default_factory=list)


def default_sources(data_dir: str | None) -> list[dict[str, str]]:
    """The real samples when a folder is given, else the built-in demo data (CPU smoke runs)."""
    if not data_dir:
        return [{"name": n, "format": n, "path": f"demo:{n}:400"} for n in ("alpaca", "tulu", "ultrachat")]
    root = Path(data_dir)
    return [
        {"name": "alpaca", "format": "alpaca", "path": str(root / "alpaca" / "alpaca_4000.json")},
        {"name": "tulu", "format": "tulu", "path": str(root / "tulu-v2-sft-mixture" / "tulu_v2_200.jsonl")},
        {"name": "ultrachat", "format": "ultrachat", "path": str(root / "ultrachat_200k" / "ultrachat_800.jsonl")},
    ]


def method_settings(kind: str, spec: BenchSpec, profile: dict[str, Any]) -> dict[str, Any]:
    """One method's settings on the workload: the study's hyperparameters, the profile's levers, overrides."""
    from peftlab.config import apply_override

    method = {"kind": kind, "epochs": 1, "max_steps": spec.max_steps, "warmup_steps": 100,
              "weight_decay": 0.01, "scheduler": "cosine", "seed": 42, "loss_on": "all", "save_steps": 10**6,
              **STUDY_HYPERPARAMETERS[kind], **profile}
    if kind == "galore":
        method["galore"] = {"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std",
                            "targets": ["attn", "mlp"]}
    for key, value in METHOD_PROFILE.get((kind, spec.profile), {}).items():
        method[key] = {**method.get(key, {}), **value}
    for item in spec.overrides:
        apply_override(method, item)
    return method


def workload_config(spec: BenchSpec):
    """The workload as a study config: one method (a hybrid: its QLoRA and GaLore stages, one epoch
    each, with a merge between), the profile's batch settings."""
    from peftlab.config import config_from_dict

    profile = dict(PROFILES.get(spec.profile, {}))
    max_len = profile.pop("max_seq_length", spec.max_seq_length)
    liger = profile.pop("liger_kernel", False)
    if spec.method == "hybrid":
        methods = {kind: method_settings(kind, spec, profile) for kind in HYBRID_STAGES}
        methods["hybrid"] = {"kind": "hybrid", "stages": [{"method": HYBRID_STAGES[0]}, {"method": "merge"},
                                                          {"method": HYBRID_STAGES[1]}]}
    else:
        methods = {spec.method: method_settings(spec.method, spec, profile)}
    rows = spec.rows_per_source
    raw = {
        "name": "bench",
        "data": {"seed": 42, "train_per_source": rows, "test_per_source": 0, "train_buffer": rows + ROW_SLACK,
                 "test_buffer": 0, "max_seq_length": max_len, "sources": spec.sources},
        "model": {"name_or_path": spec.tokenizer, "config": spec.shape, "attn_implementation": "sdpa",
                  "liger_kernel": liger},
        "methods": methods,
    }
    return config_from_dict(raw, source="bench workload")


def flops_per_token(model_config: dict[str, Any], params: int, trains_all: bool, mean_seq: float) -> float:
    attention = 12 * model_config["num_hidden_layers"] * model_config["num_attention_heads"] \
        * model_config["head_dim"] * mean_seq
    return (6 if trains_all else 4) * params + attention


def peak_flops(gpu: str | None) -> float | None:
    for key, value in PEAK_BF16_FLOPS.items():
        if gpu and key in gpu:
            return value
    return None


# ---------------------------------------------------------------------------------------------
# Workers (one process per run)


def prepare_workload(spec: BenchSpec):
    """The workload rows, prepared exactly as a study prepares them (same rows for every run)."""
    from peftlab.data.prepare import prepare_data
    from peftlab.models import load_tokenizer

    config = workload_config(spec)
    run_dir = Path(spec.work_dir)
    prepare_data(config, run_dir, load_tokenizer(config.model))
    return config, run_dir


def stage_curve(curve: list[dict[str, Any]], stage: str) -> list[dict[str, Any]]:
    """One hybrid stage's losses from the hybrid's curve, its steps counted from 1."""
    return [{"step": index, "loss": point["loss"]}
            for index, point in enumerate((p for p in curve if p["stage"] == stage), start=1)]


def run_ours(spec: BenchSpec) -> dict[str, Any]:
    from peftlab.train.runner import train_method

    config, run_dir = prepare_workload(spec)
    metrics = train_method(config, run_dir, spec.method)
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


def run_reference(spec: BenchSpec) -> dict[str, Any]:
    """The study's recipe: TRL SFTTrainer with a plain TrainingArguments, as BASELINE.md describes."""
    try:
        import datasets
        from trl import SFTTrainer
    except ImportError:
        raise UserError("--reference needs trl and datasets: pip install 'peftlab[gpu]' datasets") from None
    from transformers import TrainingArguments

    from peftlab.data.prepare import read_split
    from peftlab.models import count_parameters, load_tokenizer, random_model_dir
    from peftlab.train.meter import StepTimes, measure

    config, run_dir = prepare_workload(spec)
    tokenizer = load_tokenizer(config.model)
    texts = [row["text"] for row in read_split(run_dir, "train")]
    dataset = datasets.Dataset.from_list([{"text": t} for t in texts]).shuffle(seed=42)
    path = str(random_model_dir(spec.shape, 0))
    method = config.methods[spec.method]
    model, optimizers, optim = _reference_model(spec.method, path, method)
    args = TrainingArguments(
        output_dir=str(Path(spec.work_dir) / "ref"), per_device_train_batch_size=4, gradient_accumulation_steps=4,
        num_train_epochs=1, max_steps=spec.max_steps, weight_decay=0.01, warmup_steps=100,
        lr_scheduler_type="cosine", bf16=True, gradient_checkpointing=True, seed=42, learning_rate=method.lr,
        max_grad_norm=method.max_grad_norm, optim=optim, report_to=[], save_strategy="no", logging_steps=1,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         optimizers=optimizers)
    counted = {"tokens": 0}
    collate = trainer.data_collator

    def counting_collator(batch):
        out = collate(batch)
        counted["tokens"] += int(out["attention_mask"].sum()) if "attention_mask" in out else int(out["input_ids"].numel())
        return out

    trainer.data_collator = counting_collator
    step_times = StepTimes()
    trainer.add_callback(step_times)
    with measure() as loop:
        trainer.train()
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    trainable, total = count_parameters(model)
    metrics = {
        "peak_gpu_alloc_gib": loop.peak_gpu_alloc_gib, "peak_gpu_reserved_gib": loop.peak_gpu_reserved_gib,
        "train_time_s": loop.seconds, "tokens_trained": counted["tokens"],
        "tokens_per_s": counted["tokens"] / loop.seconds, "optimizer_steps": trainer.state.global_step,
        "trainable_params": trainable, "total_params": total, **step_times.summary(),
        "loss_curve": [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e],
    }
    return {"metrics": metrics, "rows": len(texts), "mean_seq": statistics.fmean(lengths), "max_seq_length": 1024}


def _reference_model(kind: str, path: str, method):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    if kind == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float16)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                     attn_implementation="eager", device_map={"": 0})
        model = get_peft_model(prepare_model_for_kbit_training(model), lora)
        return model, (None, None), "paged_adamw_8bit"
    if kind == "lora":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
        model.enable_input_require_grads()
        return get_peft_model(model, lora), (None, None), "adamw_torch"
    if kind == "galore":
        from galore_torch import GaLoreAdamW

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager").cuda()
        plain = ("bias", "norm", "ln")
        projected = [p for n, p in model.named_parameters() if not any(k in n for k in plain)]
        rest = [p for n, p in model.named_parameters() if any(k in n for k in plain)]
        groups = [{"params": projected, "rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std",
                   "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}]
        return model, (GaLoreAdamW(groups, lr=method.lr), None), "adamw_torch"
    raise UserError(f"no reference recipe for method '{kind}' (qlora, lora, galore)")


def worker(spec_path: str, result_path: str) -> None:
    spec = BenchSpec(**json.loads(Path(spec_path).read_text()))
    result = run_reference(spec) if spec.profile == "reference" else run_ours(spec)
    Path(result_path).write_text(json.dumps(result, default=str))


# ---------------------------------------------------------------------------------------------
# Driver


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
        return {"reference": STUDY_HYPERPARAMETERS.get(spec.method, {})}
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
        "max_seq_length": result["max_seq_length"], "rows": result["rows"],
        "optimizer_steps": metrics["optimizer_steps"], "tokens_trained": metrics["tokens_trained"],
        "train_time_s": metrics["train_time_s"], "flops_per_token": per_token,
        "trainable_params": metrics["trainable_params"], "total_params": metrics["total_params"],
        "loss_curve": metrics.get("loss_curve", []),
        "settings": run_settings(spec),
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
        raise UserError("bench --resume needs --out (the report to continue)")
    if not out.exists():
        return []
    try:
        earlier = json.loads(out.read_text())
    except ValueError as exc:
        raise UserError(f"bench --resume: {out} is not a JSON report ({exc})") from None
    if not isinstance(earlier, dict) or not isinstance(earlier.get("runs"), list):
        raise UserError(f"bench --resume: {out} is not a bench report (no runs list)")
    if "workload" not in earlier:
        raise UserError(f"bench --resume: {out} predates --resume (it records no workload); use a new --out")
    if earlier["workload"] != workload:
        raise UserError(f"bench --resume: {out} was written for another workload ({earlier['workload']});"
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
        if method not in STUDY_HYPERPARAMETERS and method != "hybrid":
            raise UserError(f"bench --methods: unknown method '{method}'"
                            f" (known: {', '.join([*STUDY_HYPERPARAMETERS, 'hybrid'])})")
    for profile in profiles:
        if profile not in PROFILES:
            raise UserError(f"bench --profiles: unknown profile '{profile}' (known: {', '.join(PROFILES)})")
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
        with tempfile.TemporaryDirectory(prefix="peftlab-bench-") as work:
            spec = replace(spec, work_dir=work)
            result = _run_worker(spec, Path(work))
        if "stages" in result:
            rows = [stage_row(spec, stage, gpu) for stage in result["stages"]]
        else:
            rows = [bench_row(spec, result, gpu) if "metrics" in result else {"method": method, "profile": profile,
                                                                              **result}]
        report["runs"] = plan_order([*report["runs"], *rows], plan)
        if out is not None:
            _write(out, report)
    print(format_table(report["runs"]), file=sys.stderr)
    if out is not None:
        _write(out, report)  # also when every run was kept
        plot_loss_curves(report["runs"], out.with_suffix(".loss.png"))
        plot_speed_and_memory(report["runs"], out.with_suffix(".png"))
    return report


def plot_loss_curves(runs: list[dict[str, Any]], path: Path) -> Path | None:
    """One panel per method: the loss per optimizer step of every profile (quality must not move)."""
    from matplotlib.figure import Figure

    methods = list(dict.fromkeys(r["method"] for r in runs if r.get("loss_curve")))
    if not methods:
        return None
    figure = Figure(figsize=(4.2 * len(methods), 3.2), layout="constrained")
    for axis, method in zip(figure.subplots(1, len(methods), squeeze=False)[0], methods, strict=True):
        for run in (r for r in runs if r["method"] == method and r.get("loss_curve")):
            steps = [p["step"] for p in run["loss_curve"]]
            axis.plot(steps, [p["loss"] for p in run["loss_curve"]], marker=".", label=run["profile"])
        axis.set_title(method)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("training loss")
        axis.legend(frameon=False)
    figure.savefig(path, dpi=110)
    return path


def plot_speed_and_memory(runs: list[dict[str, Any]], path: Path) -> Path | None:
    """Side by side per run (method / profile): steady tokens/s and peak allocated memory, the
    references hatched, each bar labelled with its value: the bench table at a glance."""
    from matplotlib.figure import Figure

    rows = [r for r in runs if r.get("steady_tokens_per_s") or r.get("tokens_per_s")]
    if not rows:
        return None
    labels = [f"{r['method']} / {r['profile']}" for r in rows]
    panels = [("steady tokens/s (median step)", [r.get("steady_tokens_per_s") or r["tokens_per_s"] for r in rows],
               "{:,.0f}", "linear")]
    if all(r.get("peak_alloc_gib") for r in rows):  # no GPU: no peak to draw
        # Log scale: the low-memory peaks (1-9 GiB) stay visible beside the fast profiles' ~50 GiB.
        panels.append(("peak allocated GiB (log scale)", [r["peak_alloc_gib"] for r in rows], "{:.2f}", "log"))
    figure = Figure(figsize=(5.2 * len(panels), 0.42 * len(rows) + 1.2), layout="constrained")
    for axis, (title, values, fmt, scale) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        axis.set_xscale(scale)
        bars = axis.barh(range(len(rows)), values, color=["#bbbbbb" if r["profile"] == "reference" else "#4878a8"
                                                          for r in rows])
        for bar, run in zip(bars, rows, strict=True):
            if run["profile"] == "reference":
                bar.set_hatch("//")
        axis.bar_label(bars, labels=[fmt.format(v) for v in values], padding=3, fontsize=8)
        axis.set_yticks(range(len(rows)), labels if axis is figure.axes[0] else [""] * len(rows), fontsize=8)
        axis.invert_yaxis()
        axis.set_title(title, fontsize=10)
        if scale == "log":
            ticks = [t for t in (0.5, 1, 2, 5, 10, 20, 50, 100, 200) if min(values) / 2 <= t <= max(values) * 2]
            axis.set_xlim(min(values) / 2, max(values) * 2.5)
            axis.set_xticks(ticks, [f"{t:g}" for t in ticks])
            axis.minorticks_off()
        else:
            axis.margins(x=0.25)
    figure.savefig(path, dpi=110)
    return path


def _run_worker(spec: BenchSpec, work: Path) -> dict[str, Any]:
    spec_path, result_path = work / "spec.json", work / "result.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "peftlab.bench", "--worker", str(spec_path), str(result_path)],
                          env=env)
    if done.returncode != 0 or not result_path.exists():
        return {"error": f"worker exited with status {done.returncode}"}
    return json.loads(result_path.read_text())


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


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        try:
            worker(sys.argv[2], sys.argv[3])
        except UserError as exc:
            print(f"peftlab: error: {exc}", file=sys.stderr)
            sys.exit(2)
    else:
        print("usage: python -m peftlab.bench --worker SPEC.json RESULT.json (use `peftlab bench`)", file=sys.stderr)
        sys.exit(2)
