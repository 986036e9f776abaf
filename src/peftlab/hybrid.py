"""The sequential hybrid (report section 9): a sequence of methods whose outputs feed the next.

The study's hybrid is `qlora` (2 epochs) -> `merge` -> `galore` (1 epoch). `merge` folds the
adapters into the **bf16 base weights** loaded fresh from the original checkpoint (never into the
NF4 weights, which would bake the quantisation error into the result) and saves a full model that
the next stage loads. Each stage keeps its own time and peak memory; a finished stage is not re-run.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from peftlab.config import MethodConfig, StudyConfig
from peftlab.distributed import distributed_rank_world, join_process_group
from peftlab.fingerprints import train_sections, write_fingerprint
from peftlab.models import device_name, load_model, load_tokenizer, resolve_dtype
from peftlab.rundir import atomic_dir, read_json, write_json
from peftlab.train.launch import check_launch
from peftlab.train.meter import measure, release_memory
from peftlab.train.runner import train_method


def merged_model(config: StudyConfig, adapter_dir: Path, base_source: str | None, *, device: str, dtype):
    """The unquantised base (`base_source`, or what `model:` names) loaded fresh in `dtype`, with the
    adapters of `adapter_dir` merged into its weights: one plain transformers model."""
    from peft import PeftModel

    base = load_model(config.model, device=device, dtype=dtype, source=base_source)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def merge_adapters(config: StudyConfig, adapter_dir: Path, out: Path, base_source: str | None) -> dict[str, Any]:
    """Load the unquantised base in the training dtype, apply the adapters, merge, save full weights."""
    device = device_name()
    dtype = resolve_dtype(config.model, device)
    with measure() as meter:
        merged = merged_model(config, adapter_dir, base_source, device=device, dtype=dtype)
        with atomic_dir(out / "final") as final:
            merged.save_pretrained(final, safe_serialization=True)
            load_tokenizer(config.model).save_pretrained(final)
    metrics = {
        "kind": "merge",
        "dtype": str(dtype).removeprefix("torch."),
        "merge_time_s": meter.seconds,
        "peak_gpu_alloc_gib": meter.peak_gpu_alloc_gib,
        "peak_gpu_reserved_gib": meter.peak_gpu_reserved_gib,
        "peak_rss_gib": meter.peak_rss_gib,
    }
    write_json(out / "metrics.json", metrics)
    del merged
    release_memory()
    return metrics


def train_hybrid(config: StudyConfig, run_dir: Path, name: str, *, resume: bool = False) -> dict[str, Any]:
    """Run the hybrid `name`'s stages in order, each skipped when its outputs are complete; rank 0
    returns the hybrid's metrics (times summed, peaks the maximum over stages)."""
    rank, world = distributed_rank_world()
    check_launch(config, name, world=world, fsdp=False)
    join_process_group()
    hybrid = config.method(name)
    out = run_dir / "train" / name
    if not resume and rank == 0 and out.exists():
        shutil.rmtree(out)  # a fresh run never reuses stages of an earlier config
    if rank == 0:
        write_fingerprint(out, "train", train_sections(config, name))
    if world > 1:
        import torch.distributed

        torch.distributed.barrier()
    started = time.perf_counter()
    source: str | None = None  # None = the model that `model:` names
    adapters: Path | None = None
    adapter_base: str | None = None
    stages: list[dict[str, Any]] = []
    for index, stage in enumerate(hybrid.stages):
        stage_out = out / "stages" / f"{index}-{stage.method}"
        done = (stage_out / "metrics.json").exists() and (stage_out / "final").exists()
        if stage.method == "merge":
            assert adapters is not None  # validated in config
            if done:
                metrics = read_json(stage_out / "metrics.json")
            elif rank == 0:  # one process merges; the others wait for its files
                metrics = merge_adapters(config, adapters, stage_out, adapter_base)
            if world > 1:
                import torch.distributed

                torch.distributed.barrier()
                metrics = read_json(stage_out / "metrics.json")
            source, adapters = str(stage_out / "final"), None
        else:
            method = stage_method(config, stage.method, stage.epochs, stage.max_steps, seed=hybrid.seed)
            has_checkpoint = any((stage_out / "checkpoints").glob("checkpoint-*"))
            metrics = read_json(stage_out / "metrics.json") if done else train_method(
                config, run_dir, f"{name}/{stage.method}", method=method, out=stage_out, source=source,
                resume=resume and has_checkpoint)
            if method.kind in ("qlora", "lora"):
                adapters, adapter_base = stage_out / "final", source
            else:
                source = str(stage_out / "final")
        # A stage finished by an earlier process of a resumed hybrid is reused, not trained again.
        stages.append({**metrics, "stage": index, "method": stage.method, "reused": bool(done and resume)})
    if rank != 0:
        return {}
    assert source is not None  # validated: the stages end on a full model
    with atomic_dir(out / "final") as final:
        # Hard links (a copy across filesystems): the last stage keeps its final/, so a re-run after a
        # kill here finds every stage done and only repeats this step.
        shutil.copytree(source, final, dirs_exist_ok=True, copy_function=_link_or_copy)
    metrics = summarize_stages(name, stages, time.perf_counter() - started)
    _write_curve(out / "loss.csv", metrics["loss_curve"])
    write_json(out / "metrics.json", metrics)
    return metrics


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _write_curve(path: Path, curve: list[dict[str, Any]]) -> None:
    lines = ["step,stage,loss", *(f"{p['step']},{p['stage']},{p['loss']}" for p in curve)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def summarize_stages(name: str, stages: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    trained = [s for s in stages if s.get("kind") != "merge"]

    def peak(key: str) -> float | None:
        values = [s[key] for s in stages if s.get(key) is not None]
        return max(values) if values else None

    train_time = sum(s["train_time_s"] for s in trained)
    tokens = sum(s["tokens_trained"] for s in trained)
    curve, offset = [], 0
    for s in trained:
        curve += [{"step": p["step"] + offset, "loss": p["loss"], "stage": s["method"]} for p in s["loss_curve"]]
        offset += s["optimizer_steps"]
    last = trained[-1]
    return {
        "method": name,
        "kind": "hybrid",
        "saves": "full",
        "device": last["device"],
        "gpu_name": last.get("gpu_name"),
        "dtype": last["dtype"],
        "peak_gpu_alloc_gib": peak("peak_gpu_alloc_gib"),
        "peak_gpu_reserved_gib": peak("peak_gpu_reserved_gib"),
        "peak_rss_gib": peak("peak_rss_gib"),
        "model_load_s": sum(s.get("model_load_s", 0.0) for s in trained),
        "data_load_s": sum(s.get("data_load_s", 0.0) for s in trained),
        "merge_time_s": sum(s.get("merge_time_s", 0.0) for s in stages),
        "train_time_s": train_time,
        "checkpoint_save_s": sum(s.get("checkpoint_save_s") or 0.0 for s in trained),
        "wall_time_s": wall_s,
        "tokens_trained": tokens,
        "tokens_per_s": tokens / train_time if train_time > 0 else None,
        "optimizer_steps": sum(s["optimizer_steps"] for s in trained),
        # Resumed: a stage resumed from a checkpoint, or finished by an earlier process and reused.
        "resumed": any(s.get("resumed") or s.get("reused") for s in stages),
        "segments": max(s.get("segments") or 1 for s in trained),
        "trainable_params": max(s["trainable_params"] for s in trained),
        "total_params": last["total_params"],
        "final_loss": last["final_loss"],
        "loss_curve": curve,
        "stages": [{k: v for k, v in s.items() if k not in ("loss_curve", "versions", "method_config", "segment_records")}
                   for s in stages],
        "versions": last.get("versions"),
    }


def stage_method(config: StudyConfig, stage_method_name: str, epochs: float | None,
                 max_steps: int | None, *, seed: int | None = None) -> MethodConfig:
    """A hybrid stage's config: the named method's recipe with the stage's epochs/steps, and the
    hybrid run's training seed (each seed repeat of a hybrid repeats all its stages)."""
    base = config.method(stage_method_name)
    changes: dict[str, Any] = {} if seed is None else {"seed": seed}
    if epochs is not None:
        changes["epochs"] = epochs
        changes["max_steps"] = -1  # the stage's epochs win over the method's own step cap
    if max_steps is not None:
        changes["max_steps"] = max_steps
    return replace(base, **changes)
