"""Train one method: build its recipe, run the shared loop under the resource meter, save, account.

Writes `train/<method>/`: `checkpoints/` (for --resume), `final/` (adapters or full weights, HF
format, safetensors), `loss.csv`, and `metrics.json` last, which marks the method as done.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.modeling_outputs import CausalLMOutputWithPast

from peftlab.models.kernels import compile_decoder_layers, compile_stats
from peftlab.config import MethodConfig, StudyConfig
from peftlab.data.prepare import read_split, tokenizer_fingerprint
from peftlab.errors import UserError
from peftlab.methods import BuildContext, Recipe, build
from peftlab.models import base_model, count_parameters, device_name, load_tokenizer, resolve_dtype
from peftlab.rundir import atomic_dir, package_versions, read_json, write_json
from peftlab.train import vocab_loss
from peftlab.train.batches import PadCollator, TokenizedRows
from peftlab.train.meter import StepTimes, measure


def target_token_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, lm_head, softcap: float | None,
                          chunk: int = 256) -> torch.Tensor:
    """Summed cross-entropy of `targets` given final hidden states, `chunk` tokens at a time, each chunk
    recomputed in backward, so the (tokens x vocabulary) logits never exist all at once."""

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = lm_head(h).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, y, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start:start + chunk], targets[start:start + chunk]
        if torch.is_grad_enabled() and hidden.shape[0] > chunk:
            total = total + torch.utils.checkpoint.checkpoint(chunk_loss, h, y, use_reentrant=False)
        else:
            total = total + chunk_loss(h, y)
    return total


def target_token_mean(causal_lm, hidden: torch.Tensor, labels: torch.Tensor, count, scale: int | None,
                      chunk: int, sharded: bool = False) -> torch.Tensor:
    """The loss `compute_loss` returns, from the decoder's final hidden states: cross-entropy summed
    over the target tokens (labels shifted by one, -100 ignored), divided by `count`, times `scale`.
    A trained tied output projection gets its gradient added in place (`vocab_loss`), except when FSDP
    (`sharded`) owns the gradients."""
    targets = labels[:, 1:]
    keep = targets != -100
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
    lm_head = causal_lm.get_output_embeddings()
    fused = not sharded and vocab_loss.applies(lm_head, causal_lm.get_input_embeddings())
    summed = vocab_loss.summed_cross_entropy if fused else target_token_loss_sum
    loss = summed(hidden[:, :-1][keep], targets[keep], lm_head, softcap, chunk)
    loss = loss / count
    if scale is not None:
        loss = loss * scale
    return loss


class TargetTokens:
    """A request, passed as the `target_tokens` keyword through the (FSDP-wrapped) model call, for the
    target-token loss instead of logits (see `enable_target_token_forward`).

    A plain object on purpose: FSDP's input and output casts traverse tensors, dataclasses and
    containers, and must leave this one alone. `value` receives the loss in fp32 before FSDP's
    mixed-precision policy casts the returned one to bf16.
    """

    def __init__(self, labels: torch.Tensor, count, scale: int | None, chunk: int) -> None:
        self.labels, self.count, self.scale, self.chunk = labels, count, scale, chunk
        self.value: torch.Tensor | None = None


def enable_target_token_forward(causal_lm) -> None:
    """Give `causal_lm` (this instance only) a forward that, when called with `target_tokens=`, returns
    the target-token loss (`target_token_mean`) as `loss` and no logits; without it, the usual forward.

    Under FSDP the tied embedding / vocabulary projection is sharded outside the wrapped forward, so
    the chunked loss must run inside it: the Trainer calls the root (PEFT model or the causal LM),
    PEFT passes the keyword on to this forward, and the root's gathered weights serve the chunks in
    forward and, until the end of backward, their recomputation.
    """
    if getattr(causal_lm, "_target_token_forward", False):
        return
    original = causal_lm.forward

    @functools.wraps(original)
    def forward(*args, target_tokens: TargetTokens | None = None, **kwargs):
        if target_tokens is None:
            return original(*args, **kwargs)
        hidden = causal_lm.get_decoder()(input_ids=kwargs["input_ids"],
                                          attention_mask=kwargs["attention_mask"]).last_hidden_state
        loss = target_token_mean(causal_lm, hidden, target_tokens.labels, target_tokens.count, target_tokens.scale,
                                 target_tokens.chunk, sharded=True)
        target_tokens.value = loss.detach()
        return CausalLMOutputWithPast(loss=loss)

    causal_lm.forward = forward
    causal_lm._target_token_forward = True


class TargetTokenTrainer(Trainer):
    """`Trainer` whose loss computes vocabulary logits only at positions that have a target.

    The vocabulary is 262,144 for Gemma 3: logits for every position of every row dominate memory
    and time, while the loss needs them only where labels are set (assistant tokens by default),
    and even those are computed in recomputed chunks. The value equals the usual token-mean
    cross-entropy over the accumulated batch (tested). Under FSDP the same loss is computed inside the
    wrapped forward (`enable_target_token_forward`).
    """

    tokens_seen: torch.Tensor | None = None
    loss_chunk_tokens: int = 256
    micro_batch_tokens: int | None = None
    _batch_targets: torch.Tensor | None = None
    # `galore.projection` of a GaLore method (None otherwise): layer-wise GaLore's per-weight optimizers,
    # which transformers builds, get its projectors; a resumed galore-torch optimizer's projectors are
    # brought back to it (layer-wise runs do not resume: see train_method).
    galore_projection: str | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.is_fsdp_enabled:
            # Before accelerate wraps the root's forward (for `full`, the causal LM is the root).
            enable_target_token_forward(base_model(self.model))

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.galore_projection == "gram":
            from peftlab.methods.galore_basis import seed_projectors

            for inner in (getattr(optimizer, "optimizer_dict", None) or {}).values():
                seed_projectors(inner)
        return optimizer

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.galore_projection is not None:
            from peftlab.methods.galore_basis import restore_projectors

            restore_projectors(getattr(self.optimizer, "optimizer", self.optimizer),  # accelerate's wrapper
                               self.galore_projection)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.micro_batch_tokens is None:
            return super().training_step(model, inputs, num_items_in_batch)
        slices = token_budget_slices(inputs["attention_mask"], self.micro_batch_tokens)
        if len(slices) == 1:
            return super().training_step(model, inputs, num_items_in_batch)
        if num_items_in_batch is None:
            # Each slice's loss is divided by the whole batch's target count, not its own (see compute_loss).
            self._batch_targets = (inputs["labels"][:, 1:] != -100).sum()
        shape = inputs["attention_mask"].shape
        deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        total = None
        try:
            for index, (rows, length) in enumerate(slices):
                part = {key: value[rows, :length] if torch.is_tensor(value) and value.shape[:2] == shape else value
                        for key, value in inputs.items()}
                # DDP: all-reduce the gradients once, on the batch's last slice.
                last = index == len(slices) - 1
                sync = contextlib.nullcontext() if last or deepspeed or not hasattr(model, "no_sync") else model.no_sync()
                with sync:
                    loss = super().training_step(model, part, num_items_in_batch)
                total = loss if total is None else total + loss
        finally:
            self._batch_targets = None
        return total

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        # An optimizer that clips its own gradients (projected GaLore) knows the norm; `.grad` does not.
        own = getattr(self.optimizer, "optimizer", self.optimizer)
        if getattr(own, "last_grad_norm", None) is not None:
            grad_norm = own.last_grad_norm
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        seen = inputs["attention_mask"].sum()
        self.tokens_seen = seen if self.tokens_seen is None else self.tokens_seen + seen
        labels = inputs["labels"]
        if num_items_in_batch is not None:
            count = num_items_in_batch
        else:
            count = self._batch_targets if self._batch_targets is not None else (labels[:, 1:] != -100).sum()
        # `count` is the token count of all ranks, and DDP / FSDP average gradients over ranks.
        scale = (self.accelerator.num_processes
                 if num_items_in_batch is not None and self.args.average_tokens_across_devices else None)
        causal_lm = base_model(model)
        if self.is_fsdp_enabled:
            # Sharded weights exist whole only inside the wrapped forward: the loss is computed there
            # (`enable_target_token_forward`), through the root so that FSDP gathers them.
            request = TargetTokens(labels, count, scale, self.loss_chunk_tokens)
            with self.accelerator.autocast():
                returned = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                 target_tokens=request).loss
            loss = returned.float()
            if returned.dtype != torch.float32:
                # FSDP's mixed-precision policy cast the returned loss to bf16: restore the fp32 value;
                # the gradient still flows through `returned` (FSDP's pre-backward hooks are on it).
                loss = loss + (request.value - loss.detach())
            return (loss, None) if return_outputs else loss
        # accelerate's mixed precision wraps only the top-level forward, which a single process skips.
        with self.accelerator.autocast():
            hidden = final_hidden_states(model, causal_lm, inputs["input_ids"], inputs["attention_mask"])
        loss = target_token_mean(causal_lm, hidden, labels, count, scale, self.loss_chunk_tokens)
        return (loss, None) if return_outputs else loss


def token_budget_slices(attention_mask: torch.Tensor, budget: int | None) -> list[tuple[torch.Tensor, int]]:
    """Split a right-padded batch into slices of at most `budget` padded tokens (rows x longest row).

    Rows are taken longest first, so each slice is cut to its own longest row; a row longer than the
    budget forms a slice alone. Returns (row indices, length) per slice; one slice = no split needed.
    """
    lengths = attention_mask.sum(dim=1)
    if budget is None or attention_mask.shape[0] * int(lengths.max()) <= budget:
        return [(torch.arange(attention_mask.shape[0], device=attention_mask.device), attention_mask.shape[1])]
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    values = lengths.tolist()
    slices: list[list[int]] = []
    for row in order:
        if slices and (len(slices[-1]) + 1) * values[slices[-1][0]] <= budget:
            slices[-1].append(row)
        else:
            slices.append([row])
    return [(torch.tensor(rows, device=attention_mask.device), int(values[rows[0]])) for rows in slices]


def final_hidden_states(model, causal_lm, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The decoder's final-norm output, i.e. what the vocabulary projection reads.

    A single process calls the decoder directly. Under DistributedDataParallel the call must go
    through the wrapper (its forward arms the gradient all-reduce), so the model runs with its head
    on one position only and a hook on the final norm keeps that norm's full output.
    """
    decoder = causal_lm.get_decoder()
    if getattr(model, "module", None) is None or not hasattr(decoder, "norm"):
        return decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    captured: list[torch.Tensor] = []
    handle = decoder.norm.register_forward_hook(lambda _module, _args, output: captured.append(output))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    return captured[-1]


class StopAfter(TrainerCallback):
    """Stops training after a given optimizer step (used to test interrupt + resume)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True
        return control


def drop_tied_head(directory: Path) -> bool:
    """Remove `lm_head.weight` from a saved full model whose head is tied to the input embedding.

    `save_pretrained` drops a tied head only when both names share one tensor; FSDP's gathered state
    dict holds two copies (the 262k x 1152 embedding twice for Gemma 3), and loading re-ties them
    anyway. Handles one file or an indexed set of shards; returns whether anything was removed."""
    from safetensors.torch import load_file, save_file

    index_path = directory / "model.safetensors.index.json"
    index = read_json(index_path) if index_path.exists() else None
    names = [index["weight_map"]["lm_head.weight"]] if index and "lm_head.weight" in index["weight_map"] else (
        ["model.safetensors"] if index is None and (directory / "model.safetensors").exists() else [])
    removed = False
    for name in names:
        tensors = load_file(str(directory / name))
        if tensors.pop("lm_head.weight", None) is None:
            continue
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        removed = True
    if removed and index is not None:
        index["weight_map"].pop("lm_head.weight")
        write_json(index_path, index)
    return removed


def allow_galore_checkpoints() -> None:
    """GaLore's optimizer state holds projector objects; allow exactly those classes in weights-only loads."""
    try:
        from galore_torch.galore_projector import GaLoreProjector

        from peftlab.methods.galore_basis import GramProjector
    except ImportError:
        return
    torch.serialization.add_safe_globals([GaLoreProjector, GramProjector])


def check_single_process(config: StudyConfig, name: str, method: MethodConfig) -> None:
    """Refuse under several processes, before any stage trains, a GaLore whose hooks own the gradients."""
    trained = [config.method(s.method) for s in method.stages if s.method != "merge"] \
        if method.kind == "hybrid" else [method]
    for stage in trained:
        if stage.kind == "galore" and (stage.galore.accumulate == "projected" or stage.galore.variant == "layerwise"):
            raise UserError(f"method '{name}': galore with accumulate projected or variant layerwise is single-GPU"
                            " (it updates from inside backward); use accumulate full and variant adamw with --gpus")


def check_fsdp(name: str, method: MethodConfig, world: int) -> None:
    """`--fsdp` only where it can run: lora/qlora/full, several CUDA processes, a non-bitsandbytes optimizer."""
    if method.kind in ("galore", "hybrid"):
        raise UserError(f"method '{name}' ({method.kind}): GaLore projects whole weight matrices, which FSDP"
                        " splits across processes; train it with DDP (drop --fsdp)")
    if method.micro_batch_tokens is not None:
        raise UserError(f"method '{name}': micro_batch_tokens runs a different number of forwards per process,"
                        " which FSDP's collective weight gathering cannot do; drop it or use DDP (drop --fsdp)")
    if method.torch_compile:
        raise UserError(f"method '{name}': torch_compile is not supported with --fsdp yet; drop one of them")
    if world < 2:
        raise UserError("--fsdp shards over several processes: use it with --gpus 2 or more")
    if not torch.cuda.is_available():
        raise UserError("--fsdp needs CUDA GPUs (accelerate engages FSDP only on GPU process groups); use DDP here")
    if any(key in method.optimizer for key in ("8bit", "paged", "bnb")):
        raise UserError(f"method '{name}': optimizer {method.optimizer} (bitsandbytes) cannot step FSDP's sharded"
                        " parameters; use adamw_torch or leave optimizer: auto")


def training_arguments(method: MethodConfig, out: Path, device: str, dtype, recipe: Recipe,
                       fsdp: bool = False) -> TrainingArguments:
    extra: dict[str, Any] = {}
    if fsdp:
        layer = base_model(recipe.model).get_decoder().layers[0]
        extra["fsdp"] = True
        # Checkpointing stays the Trainer's: accelerate's FSDP activation checkpointing renames the
        # wrapped modules (PEFT then saves empty adapters) and replays dropout with a new RNG state.
        extra["fsdp_config"] = {"transformer_layer_cls_to_wrap": [type(layer).__name__],
                                "state_dict_type": "FULL_STATE_DICT", "activation_checkpointing": False}
    if "optim_args" in recipe.notes:
        extra["optim_args"] = recipe.notes["optim_args"]
        extra["optim_target_modules"] = recipe.notes["optim_target_modules"]
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=method.batch_size,
        gradient_accumulation_steps=method.grad_accum,
        learning_rate=method.lr,
        weight_decay=method.weight_decay,
        warmup_steps=method.warmup_steps,
        lr_scheduler_type=method.scheduler,
        max_grad_norm=0.0 if recipe.clips_gradients else method.max_grad_norm,
        num_train_epochs=method.epochs,
        max_steps=method.max_steps,
        logging_steps=method.logging_steps,
        save_steps=method.save_steps,
        save_total_limit=method.save_total_limit,
        save_only_model=False,
        seed=method.seed,
        data_seed=method.seed,
        train_sampling_strategy=method.sampling,
        include_num_input_tokens_seen="non_padding",  # kept in checkpoints: totals survive --resume
        bf16=device == "cuda" and dtype == torch.bfloat16,
        gradient_checkpointing=method.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        optim=recipe.optim if recipe.optimizer is None else "adamw_torch",
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=device == "cpu",
        disable_tqdm=False,
        **extra,
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
    """Train `name` (or an explicit `method` config, for hybrid stages) and return its metrics.

    `fsdp` shards weights, gradients and optimizer states over the processes (FSDP2 through
    accelerate) instead of replicating them (DDP); it needs more than one process.
    """
    method = method or config.method(name)
    rank, world = distributed_rank_world()
    if fsdp:
        check_fsdp(name, method, world)
    if world > 1:
        check_single_process(config, name, method)
    if method.kind == "hybrid":
        from peftlab.methods.hybrid import train_hybrid

        return train_hybrid(config, run_dir, name, resume=resume)
    out = out or run_dir / "train" / name
    device = device_name()
    if device == "cuda" and world > 1:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dtype = resolve_dtype(config.model, device)

    started = time.perf_counter()
    tokenizer = load_tokenizer(config.model)
    rows = read_split(run_dir, "train")
    _check_tokenizer(run_dir, tokenizer)
    dataset = TokenizedRows(rows, method.loss_on)
    data_seconds = time.perf_counter() - started

    started = time.perf_counter()
    torch.manual_seed(method.seed)
    recipe = build(method.kind)(BuildContext(config.model, method, device, dtype, source, fsdp))
    if method.torch_compile:
        recipe.notes["compiled_layers"] = compile_decoder_layers(recipe.model)
    load_seconds = time.perf_counter() - started
    trainable, total = count_parameters(recipe.model)

    allow_galore_checkpoints()
    args = training_arguments(method, out, device, dtype, recipe, fsdp)
    _ = args.device  # sets up the process group under torchrun / accelerate launch
    if world == 1 and args.n_gpu > 1:
        args._n_gpu = 1  # one process trains on one GPU; several GPUs go through --gpus (DDP), never nn.DataParallel
    checkpoint = _prepare_output(out, resume, fsdp) if rank == 0 else None
    if world > 1:
        torch.distributed.barrier()
        checkpoint = _last_checkpoint(out) if resume else None
    if checkpoint is not None and recipe.optim == "galore_adamw_layerwise":
        # transformers saves only the layer-wise dummy optimizer, not the per-weight ones: a resume would
        # silently restart every Adam moment and projection.
        raise UserError(f"{out}: galore.variant layerwise cannot resume (transformers does not save its"
                        " per-weight optimizer states); start again without --resume, or use adamw / adamw8bit")
    step_times = StepTimes()
    trainer = TargetTokenTrainer(
        model=recipe.model,
        args=args,
        train_dataset=dataset,
        data_collator=PadCollator(tokenizer.pad_token_id),
        optimizers=(recipe.optimizer, None),
        callbacks=[step_times, *([StopAfter(stop_after)] if stop_after else []), *(callbacks or [])],
    )
    trainer.loss_chunk_tokens = method.loss_chunk_tokens
    trainer.micro_batch_tokens = method.micro_batch_tokens
    trainer.galore_projection = method.galore.projection if recipe.optim.startswith("galore") else None
    with measure() as loop, adapter_inputs_uncast(recipe.model, args.bf16):
        result = trainer.train(resume_from_checkpoint=checkpoint)
    if method.torch_compile:
        recipe.notes["compile"] = compile_stats()
    if stop_after and trainer.state.global_step < trainer.state.max_steps:
        raise KeyboardInterrupt  # simulated interruption: checkpoints are kept, nothing is final

    tokens = int(trainer.tokens_seen.item()) if trainer.tokens_seen is not None else 0  # this segment
    ranks = _gather_ranks({"rank": rank, "tokens_trained": tokens, "peak_gpu_alloc_gib": loop.peak_gpu_alloc_gib,
                           "peak_gpu_reserved_gib": loop.peak_gpu_reserved_gib, "peak_rss_gib": loop.peak_rss_gib},
                          world)
    tokens = sum(r["tokens_trained"] for r in ranks)
    losses = [entry for entry in trainer.state.log_history if "loss" in entry]
    gathered = out / ".final-gathered"
    if fsdp:  # every rank takes part in gathering the full weights; rank 0 writes them
        trainer.save_model(str(gathered))
    if rank != 0:
        del trainer, recipe
        release_memory()
        torch.distributed.barrier()  # rank 0 is writing final/: the next stage reads it
        return {}
    _write_loss_csv(out / "loss.csv", losses)
    with atomic_dir(out / "final") as final:
        if fsdp:
            for item in gathered.iterdir():
                item.rename(final / item.name)
            gathered.rmdir()
            if getattr(base_model(recipe.model).config, "tie_word_embeddings", False):
                drop_tied_head(final)
        else:
            recipe.model.save_pretrained(final, safe_serialization=True)
        tokenizer.save_pretrained(final)
    metrics = {
        "method": name,
        "kind": method.kind,
        "saves": recipe.saves,
        "device": device,
        "gpu_name": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "dtype": str(dtype).removeprefix("torch."),
        "optimizer": recipe.optim,
        "peak_gpu_alloc_gib": loop.peak_gpu_alloc_gib,
        "peak_gpu_reserved_gib": loop.peak_gpu_reserved_gib,
        "peak_rss_gib": loop.peak_rss_gib,
        "world_size": world,
        "strategy": "fsdp" if trainer.is_fsdp_enabled else ("ddp" if world > 1 else "single"),
        "per_rank": ranks,
        "peak_gpu_alloc_gib_total": _total(ranks, "peak_gpu_alloc_gib"),
        "model_load_s": load_seconds,
        "data_load_s": data_seconds,
        "train_time_s": loop.seconds,
        # The whole run's tokens (restored on resume); time and tokens/s cover this process's segment.
        "tokens_trained": int(trainer.state.num_input_tokens_seen or tokens),
        "tokens_per_s": tokens / loop.seconds if loop.seconds > 0 else None,
        "optimizer_steps": trainer.state.global_step,
        **step_times.summary(),
        "resumed_from": checkpoint,
        "trainable_params": trainable,
        "total_params": total,
        "final_loss": losses[-1]["loss"] if losses else None,
        "train_loss_mean": sum(e["loss"] for e in losses) / len(losses) if losses else result.training_loss,
        "loss_curve": [{"step": e["step"], "loss": e["loss"]} for e in losses],
        "rows": len(dataset),
        "method_config": asdict(method),
        "notes": recipe.notes,
        "versions": package_versions(),
    }
    write_json(out / "metrics.json", metrics)
    del trainer, recipe
    release_memory()
    if world > 1:
        torch.distributed.barrier()
    return metrics


def adapter_inputs_uncast(model, autocast_bf16: bool):
    """Under bf16 autocast, stop PEFT from casting every adapter input to the adapters' fp32.

    Autocast (on for every forward: see `TargetTokenTrainer.compute_loss`) runs the adapter matmuls
    in bf16 anyway, so that cast only adds two copies of each adapted layer's input per step (fp32
    copies were 12% of QLoRA's GPU time in the H200 profile). Without autocast (CPU, fp32) it is off.
    """
    from contextlib import nullcontext

    if not autocast_bf16 or not hasattr(model, "peft_config"):
        return nullcontext()
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model)


def _gather_ranks(mine: dict[str, Any], world: int) -> list[dict[str, Any]]:
    if world == 1:
        return [mine]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def _total(ranks: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in ranks if r[key] is not None]
    return sum(values) if values else None


def release_memory() -> None:
    """Free the finished stage's tensors so the next stage's peak starts from what it allocates itself."""
    import gc
    import sys

    if "bitsandbytes" in sys.modules:
        # transformers' Trainer registers embedding modules with bitsandbytes' process-wide optimizer
        # manager, which would otherwise keep the finished stage's embedding (0.56 GiB for Gemma 3 1B) alive.
        manager = sys.modules["bitsandbytes"].optim.GlobalOptimManager.get_instance()
        manager.module_weight_config_triple = []
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def join_process_group() -> None:
    """Under torchrun, join the process group the way the Trainer will (accelerate's PartialState),
    for code that synchronises before any Trainer exists (hybrid stages)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        from datetime import timedelta

        from accelerate import PartialState

        PartialState(timeout=timedelta(seconds=1800))  # the Trainer's ddp_timeout default


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) as torchrun / accelerate launch set them; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def check_checkpoint_strategy(checkpoint: str, fsdp: bool) -> None:
    """A checkpoint resumes only under the strategy that wrote it (FSDP shards its states differently)."""
    written_by_fsdp = any(Path(checkpoint).glob("*fsdp*"))
    if written_by_fsdp != fsdp:
        how = "with" if written_by_fsdp else "without"
        raise UserError(f"--resume: {checkpoint} was written {how} --fsdp; resume it the same way")


def _last_checkpoint(out: Path) -> str | None:
    found = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(found[-1]) if found else None


def _prepare_output(out: Path, resume: bool, fsdp: bool = False) -> str | None:
    """The checkpoint to resume from, or None after clearing a previous attempt."""
    if resume:
        found = _last_checkpoint(out)
        if found is None:
            raise UserError(f"--resume: no checkpoint under {out / 'checkpoints'}; run without --resume to start")
        check_checkpoint_strategy(found, fsdp)
        (out / "metrics.json").unlink(missing_ok=True)
        return found
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return None


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


def stage_method(config: StudyConfig, stage_method_name: str, epochs: float | None, max_steps: int | None) -> MethodConfig:
    """A hybrid stage's config: the named method's recipe with the stage's epochs/steps."""
    base = config.method(stage_method_name)
    changes: dict[str, Any] = {}
    if epochs is not None:
        changes["epochs"] = epochs
        changes["max_steps"] = -1  # the stage's epochs win over the method's own step cap
    if max_steps is not None:
        changes["max_steps"] = max_steps
    return replace(base, **changes)
