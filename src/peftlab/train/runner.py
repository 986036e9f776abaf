"""Train one method: checks -> data -> execution -> recipe -> trainer -> train -> save -> metrics.

Writes `train/<method>/`: `checkpoints/` (for --resume; removed once the run is done unless
`keep_checkpoints`), `final/` (adapters or full weights, HF format, safetensors), `loss.csv`, and
`metrics.json` last, which marks the method as done. A hybrid
is a sequence of these runs (`peftlab.hybrid`).
"""

from __future__ import annotations

import csv
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from peftlab.config import MethodConfig, StudyConfig
from peftlab.data.prepare import read_split, tokenizer_fingerprint
from peftlab.distributed import distributed_rank_world, gather_ranks, total_over_ranks
from peftlab.errors import UserError
from peftlab.fingerprints import train_sections, write_fingerprint
from peftlab.methods import BuildContext, build
from peftlab.models import (
    base_model,
    compile_decoder_layers,
    compile_stats,
    count_parameters,
    device_name,
    load_tokenizer,
    resolve_dtype,
)
from peftlab.rundir import atomic_dir, package_versions, read_json, write_json
from peftlab.train.batches import PadCollator, TokenizedRows
from peftlab.train.checkpoints import (
    allow_galore_checkpoints,
    drop_tied_head,
    last_checkpoint,
    prepare_output,
    remove_checkpoints,
)
from peftlab.train.execution import choose_execution, explicit_keys
from peftlab.train.graphs import bin_sizes
from peftlab.train.kernel_warmup import KernelWarmup
from peftlab.train.launch import check_launch
from peftlab.train.meter import StepTimes, measure, release_memory
from peftlab.train.packing import PackedCollator, load_name
from peftlab.train.segments import RunSegments, prior_segments
from peftlab.train.trainer import (
    StopAfter,
    TargetTokenTrainer,
    TrainingProgress,
    adapter_inputs_uncast,
    training_arguments,
)


def train_method(
    config: StudyConfig,
    run_dir: Path,
    name: str,
    *,
    resume: bool = False,
    method: MethodConfig | None = None,
    out: Path | None = None,
    source: str | None = None,
    stop_after: int | None = None,
    callbacks: list[TrainerCallback] | None = None,
    fsdp: bool = False,
) -> dict[str, Any]:
    """Train `name` (or an explicit `method` config, for a hybrid's stages) and return its metrics.

    `source` starts from a saved model instead of `model:` (a hybrid's previous stage). `fsdp` shards
    weights, gradients and optimizer states over the processes (FSDP2 through accelerate) instead of
    replicating them (DDP). Only rank 0 returns the metrics.
    """
    rank, world = distributed_rank_world()
    fingerprint = None  # a hybrid's stage is covered by the hybrid's
    if method is None:
        check_launch(config, name, world=world, fsdp=fsdp)
        method = config.method(name)
        fingerprint = train_sections(config, name)
    out = out or run_dir / "train" / name
    device = device_name()
    if device == "cuda" and world > 1:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dtype = resolve_dtype(config.model, device)

    # Execution: how the recipe's steps run on this device (the recipe itself is unchanged)
    recipe_config = method
    shape = _model_shape(config, source, device)
    execution = choose_execution(method, explicit_keys(method), device=device, gpu_memory_gib=_gpu_memory_gib(device),
                                 model=config.model, shape=shape,
                                 max_seq_length=config.data.max_seq_length, world=world, fsdp=fsdp)
    method = execution.method
    model_config = replace(config.model, attn_implementation=load_name(execution.attention),
                           liger_kernel=execution.liger)
    # Triton kernels compile in the background while the data and the model load; the first step waits.
    warmup = None
    if shape is not None and (execution.liger or execution.liger_loss):
        warmup = KernelWarmup(shape, dtype, modules=execution.liger, loss=execution.liger_loss,
                              autocast_bf16=dtype == torch.bfloat16, trains_base=method.kind in ("galore", "full"),
                              tokens=bin_sizes(method.graph_tokens) if method.graph_tokens else None,
                              device=f"cuda:{torch.cuda.current_device()}").start()

    # Data
    started = time.perf_counter()
    tokenizer = load_tokenizer(config.model)
    _check_tokenizer(run_dir, tokenizer)
    dataset = TokenizedRows(read_split(run_dir, "train"), method.loss_on)
    data_seconds = time.perf_counter() - started

    # Recipe: the model, which parameters train, and their optimizer
    started = time.perf_counter()
    torch.manual_seed(method.seed)
    recipe = build(method.kind)(BuildContext(model_config, method, device, dtype, source, fsdp))
    if method.torch_compile:
        recipe.notes["compiled_layers"] = compile_decoder_layers(recipe.model)
    load_seconds = time.perf_counter() - started
    trainable, total = count_parameters(recipe.model)

    # Trainer
    allow_galore_checkpoints()
    args = training_arguments(method, out, device, dtype, recipe, fsdp)
    _ = args.device  # sets up the process group under torchrun / accelerate launch
    if world == 1 and args.n_gpu > 1:
        args._n_gpu = 1  # one process trains on one GPU; several GPUs go through --gpus (DDP), never nn.DataParallel
    checkpoint = prepare_output(out, resume, fsdp) if rank == 0 else None
    if rank == 0 and fingerprint is not None:
        write_fingerprint(out, "train", fingerprint)
    if world > 1:
        torch.distributed.barrier()
        checkpoint = last_checkpoint(out) if resume else None
    if checkpoint is not None and not recipe.resumable:
        raise UserError(f"{out}: {recipe.optimizer_name} cannot resume (transformers does not save its per-weight"
                        " optimizer states); start again without --resume, or use galore.variant adamw / adamw8bit")
    prior, recorded = prior_segments(checkpoint)
    if not recorded and rank == 0:
        print(f"peftlab: {checkpoint} carries no record of its training time (written by an older peftlab):"
              " train_time_s and the peaks cover the steps after it only", file=sys.stderr, flush=True)
    segments = RunSegments(prior)
    step_times = StepTimes()
    trainer = TargetTokenTrainer(
        model=recipe.model,
        args=args,
        train_dataset=dataset,
        data_collator=PackedCollator() if method.padding_free else PadCollator(tokenizer.pad_token_id),
        optimizers=(recipe.optimizer, None),
        callbacks=[step_times, segments, TrainingProgress(name), *([StopAfter(stop_after)] if stop_after else []),
                   *(callbacks or [])],
        loss_chunk_tokens=method.loss_chunk_tokens,
        micro_batch_tokens=method.micro_batch_tokens,
        galore_projection=recipe.galore_projection,
        segments=segments,
        pad_tokens_to_multiple_of=method.pad_tokens_to_multiple_of,
        pad_id=tokenizer.pad_token_id,
        avoid_host_syncs=method.avoid_host_syncs,
        graph_tokens=method.graph_tokens,
        cuda_graphs=method.cuda_graphs,
        max_row_tokens=config.data.max_seq_length,
        triton_loss=execution.liger_loss,
        kernel_warmup=warmup,
    )

    # Train (checkpoint writes are timed apart: see peftlab.train.segments)
    with measure() as loop, adapter_inputs_uncast(recipe.model, args.bf16):
        segments.meter = loop
        result = trainer.train(resume_from_checkpoint=checkpoint)
    segments.meter = None
    run = segments.whole_run(loop)
    if warmup is not None:
        warmup.wait()  # a run that never stepped (resumed at its end) has not waited yet
        warmup.finish()
    if method.torch_compile:
        recipe.notes["compile"] = compile_stats()
    if stop_after and trainer.state.global_step < trainer.state.max_steps:
        raise KeyboardInterrupt  # simulated interruption: checkpoints are kept, nothing is final

    # Save
    tokens = int(trainer.tokens_seen.item()) if trainer.tokens_seen is not None else 0  # this segment
    ranks = gather_ranks({"rank": rank, "tokens_trained": tokens, "train_time_s": run["records"][-1]["train_time_s"],
                          "peak_gpu_alloc_gib": loop.peak_gpu_alloc_gib,
                          "peak_gpu_reserved_gib": loop.peak_gpu_reserved_gib, "peak_rss_gib": loop.peak_rss_gib},
                         world)
    gathered = out / ".final-gathered"
    if fsdp:  # every rank takes part in gathering the full weights; rank 0 writes them
        trainer.save_model(str(gathered))
    if rank != 0:
        del trainer, recipe
        release_memory()
        torch.distributed.barrier()  # rank 0 is writing final/: the next stage reads it
        return {}
    losses = [entry for entry in trainer.state.log_history if "loss" in entry]
    _write_loss_csv(out / "loss.csv", losses)
    _save_final(out, recipe.model, tokenizer, gathered if fsdp else None)

    # Metrics (metrics.json last: it marks the method as done). Time and peaks cover every segment of
    # the run (resumes included); per_rank covers this process's segment.
    tokens_trained = int(trainer.state.num_input_tokens_seen or sum(r["tokens_trained"] for r in ranks))
    # Without earlier records the time covers this segment: so must the tokens of the rate.
    timed_tokens = tokens_trained if recorded else sum(r["tokens_trained"] for r in ranks)
    metrics = {
        "method": name,
        "kind": method.kind,
        "saves": recipe.saves,
        "device": device,
        "gpu_name": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "dtype": str(dtype).removeprefix("torch."),
        "optimizer": recipe.optimizer_name,
        "peak_gpu_alloc_gib": run["peak_gpu_alloc_gib"],
        "peak_gpu_reserved_gib": run["peak_gpu_reserved_gib"],
        "peak_rss_gib": run["peak_rss_gib"],
        "world_size": world,
        "strategy": "fsdp" if trainer.is_fsdp_enabled else ("ddp" if world > 1 else "single"),
        "per_rank": ranks,
        "peak_gpu_alloc_gib_total": total_over_ranks(ranks, "peak_gpu_alloc_gib"),
        "model_load_s": load_seconds,
        "data_load_s": data_seconds,
        "train_time_s": run["train_time_s"],
        "checkpoint_save_s": run["checkpoint_save_s"],
        "tokens_trained": tokens_trained,
        "tokens_per_s": timed_tokens / run["train_time_s"] if run["train_time_s"] > 0 else None,
        "optimizer_steps": trainer.state.global_step,
        **step_times.summary(),
        "resumed": run["resumed"],
        "segments": run["segments"],
        "segment_records": run["records"],
        "resumed_from": checkpoint,
        "trainable_params": trainable,
        "total_params": total,
        "final_loss": losses[-1]["loss"] if losses else None,
        "train_loss_mean": sum(e["loss"] for e in losses) / len(losses) if losses else result.training_loss,
        "loss_curve": [{"step": e["step"], "loss": e["loss"]} for e in losses],
        "rows": len(dataset),
        "method_config": asdict(recipe_config),
        "execution": {**execution.described,
                      **({"kernel_warmup": warmup.describe()} if warmup is not None else {}),
                      **({"graphs": {**trainer.graphed.describe(), "fused_lora_layers": trainer.fused_adapters}}
                         if trainer.graphed is not None else {})},
        "notes": recipe.notes,
        "versions": package_versions(),
    }
    write_json(out / "metrics.json", metrics)
    if not method.keep_checkpoints:
        remove_checkpoints(out)  # final/ and metrics.json are written: nothing is left to resume
    del trainer, recipe
    release_memory()
    if world > 1:
        torch.distributed.barrier()
    return metrics


def _gpu_memory_gib(device: str) -> float | None:
    if device != "cuda":
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30


def _model_shape(config: StudyConfig, source: str | None, device: str) -> dict[str, Any] | None:
    """The model's text config as a dict (for the execution's memory estimate; GPU only)."""
    if device != "cuda":
        return None
    from transformers import AutoConfig

    from peftlab.models import model_dir

    path = source or model_dir(config.model)[0]
    loaded = AutoConfig.from_pretrained(path, trust_remote_code=config.model.trust_remote_code)
    return getattr(loaded, "text_config", loaded).to_dict()


def _save_final(out: Path, model, tokenizer, gathered: Path | None) -> None:
    """`final/`, atomically: the trained weights (adapters or full) and the tokenizer. Under FSDP the
    full weights were gathered into `gathered` by every rank; they move in, less a duplicate tied head."""
    with atomic_dir(out / "final") as final:
        if gathered is not None:
            for item in gathered.iterdir():
                item.rename(final / item.name)
            gathered.rmdir()
            if getattr(base_model(model).config, "tie_word_embeddings", False):
                drop_tied_head(final)
        else:
            model.save_pretrained(final, safe_serialization=True)
        tokenizer.save_pretrained(final)


def _check_tokenizer(run_dir: Path, tokenizer) -> None:
    stats = read_json(run_dir / "data" / "stats.json")
    if stats.get("tokenizer") != tokenizer_fingerprint(tokenizer):
        raise UserError(
            f"{run_dir / 'data'}: prepared with another tokenizer than model.name_or_path / model.tokenizer;"
            " re-run `peftlab prepare`"
        )


def _write_loss_csv(path: Path, entries: list[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "epoch", "loss", "learning_rate", "grad_norm"])
        for entry in entries:
            writer.writerow([entry.get("step"), entry.get("epoch"), entry.get("loss"),
                             entry.get("learning_rate"), entry.get("grad_norm")])
