"""The Trainer that runs every method's steps: `TargetTokenTrainer` (the target-token loss, token-budget
micro-batch slices, GaLore projector seeding), its `TrainingArguments`, and the loop's callbacks."""

from __future__ import annotations

import contextlib
import inspect
import time
import types
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from peftlab.config import MethodConfig
from peftlab.console import StageProgress
from peftlab.methods import Recipe
from peftlab.methods.lora import fuse_adapter_additions
from peftlab.models import base_model
from peftlab.train.batches import IGNORE
from peftlab.train.graphs import (
    BinLayout,
    GraphedForwardBackward,
    bin_size,
    bin_sizes,
    bin_tensors,
    pack_bins,
    row_slots,
)
from peftlab.train.kernel_warmup import KernelWarmup
from peftlab.train.loss import (
    TargetTokens,
    bin_loss,
    enable_target_token_forward,
    final_hidden_states,
    target_token_mean,
)
from peftlab.train.optimizers import without_step_syncs
from peftlab.train.packing import attention_inputs, is_packed, packed_slices, pad_to_multiple, select_rows
from peftlab.train.segments import RunSegments


class TargetTokenTrainer(Trainer):
    """`Trainer` whose loss computes vocabulary logits only at positions that have a target.

    The vocabulary is 262,144 for Gemma 3: logits for every position of every row dominate memory
    and time, while the loss needs them only where labels are set (assistant tokens by default),
    and even those are computed in recomputed chunks. The value equals the usual token-mean
    cross-entropy over the accumulated batch (tested). Under FSDP the same loss is computed inside the
    wrapped forward (`enable_target_token_forward`).
    """

    def __init__(self, *args, loss_chunk_tokens: int = 256, micro_batch_tokens: int | None = None,
                 galore_projection: str | None = None, segments: RunSegments | None = None,
                 pad_tokens_to_multiple_of: int | None = None, pad_id: int = 0, avoid_host_syncs: bool = False,
                 graph_tokens: int | None = None, cuda_graphs: bool = True, max_row_tokens: int = 2048,
                 triton_loss: bool = True, kernel_warmup: KernelWarmup | None = None, **kwargs) -> None:
        """`loss_chunk_tokens`: vocabulary logits computed this many target tokens at a time.
        `micro_batch_tokens`: split each micro-batch into slices of at most this many tokens (padded
        tokens, rows x longest, for padded batches; real tokens for padding-free ones).
        `galore_projection`: a GaLore recipe's `galore.projection`; the per-weight optimizers that
        transformers builds (layer-wise) get its projectors, and a resumed optimizer's are restored.
        `segments`: times each checkpoint write and stores the run's segment records in it (pass it
        among the callbacks too).

        `pad_tokens_to_multiple_of` / `pad_id`: padding-free forwards padded to a multiple of tokens.
        `avoid_host_syncs` (the method's key): count a padding-free batch's tokens from its host-side row
        lengths (one process: no device-to-host sync per micro-batch), step bitsandbytes' optimizers without
        their syncs (`peftlab.train.optimizers`), and read logged values one step later (`PendingLog`).

        `graph_tokens`: padding-free batches run as bins of exactly this many tokens (`peftlab.train.graphs`),
        on CUDA captured once as a CUDA graph of forward + backward unless `cuda_graphs` is false;
        `max_row_tokens`: the longest row the data holds (the variable-length kernels' fixed bound);
        `triton_loss`: the bins' vocabulary loss uses liger-kernel's Triton cross-entropy (on CUDA, when
        installed; `Execution.liger_loss`).
        `kernel_warmup`: a started `KernelWarmup`; the first training step waits for it."""
        super().__init__(*args, **kwargs)
        # With disable_tqdm the Trainer prints every log as a dict; `TrainingProgress` shows the loss instead.
        self.remove_callback(PrinterCallback)
        self.segments = segments
        self.loss_chunk_tokens = loss_chunk_tokens
        self.micro_batch_tokens = micro_batch_tokens
        self.galore_projection = galore_projection
        self.pad_tokens_to_multiple_of = pad_tokens_to_multiple_of
        self.pad_id = pad_id
        self.avoid_host_syncs = avoid_host_syncs
        self.tokens_seen: torch.Tensor | None = None
        self._batch_targets: torch.Tensor | None = None
        self.graph_tokens = graph_tokens
        self.cuda_graphs = cuda_graphs
        self.triton_loss = triton_loss
        self.kernel_warmup = kernel_warmup
        self.max_row_tokens = max_row_tokens
        self.graphed: GraphedForwardBackward | None = None
        self.fused_adapters = 0  # LoRA layers adding their output with one addmm (the binned step's)
        self._pending_log: PendingLog | None = None
        if self.is_fsdp_enabled:
            # Before accelerate wraps the root's forward (for `full`, the causal LM is the root).
            enable_target_token_forward(base_model(self.model))

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.avoid_host_syncs:  # bitsandbytes' step without its syncs
            without_step_syncs(optimizer)
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

    def _save_checkpoint(self, model, trial):
        if self.args.device.type == "cuda":
            # Nothing in a step waits for the GPU (`avoid_host_syncs`): finish the queued steps first, so the
            # write reads their results (bitsandbytes' paged states are read on the host without a sync) and
            # their time counts as training, not as the save's.
            torch.cuda.synchronize()
        if self.segments is None:
            return super()._save_checkpoint(model, trial)
        # A checkpoint written before the records existed has no entry; transformers expects one.
        self.state.stateful_callbacks.setdefault(type(self.segments).__name__, {})
        with self.segments.timing_save():
            return super()._save_checkpoint(model, trial)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """transformers' estimate (6 x input tokens x parameters without embeddings), the parameters counted
        once: transformers counts them again at every step, ~2,000 module walks for a 1B PEFT model."""
        main = getattr(self.model, "main_input_name", "input_ids")
        if main not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if getattr(self, "_counted_parameters", None) is None:
            self._counted_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main].numel() * self._counted_parameters

    def _track_num_input_tokens(self, inputs):
        if not (is_packed(inputs) and self.args.include_num_input_tokens_seen != "no"):
            return super()._track_num_input_tokens(inputs)
        tokens = sum(inputs["row_lengths"])
        if self.args.world_size > 1 or not self.avoid_host_syncs:
            tokens = int(self.accelerator.gather(torch.tensor(tokens, device=self.args.device)).sum().item())
        self.state.num_input_tokens_seen += tokens

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.kernel_warmup is not None:
            self.kernel_warmup.wait()
        if self.graph_tokens is not None and is_packed(inputs):
            return self._binned_step(model, inputs, num_items_in_batch)
        if self.micro_batch_tokens is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if is_packed(inputs):
            spans = packed_slices(inputs["row_lengths"], self.micro_batch_tokens)
            parts = [lambda span=span: select_rows(inputs, *span) for span in spans]
        else:
            slices = token_budget_slices(inputs["attention_mask"], self.micro_batch_tokens)
            shape = inputs["attention_mask"].shape
            parts = [lambda rows=rows, length=length: {
                key: value[rows, :length] if torch.is_tensor(value) and value.shape[:2] == shape else value
                for key, value in inputs.items()} for rows, length in slices]
        if len(parts) == 1:
            return super().training_step(model, inputs, num_items_in_batch)
        if num_items_in_batch is None:
            # Each slice's loss is divided by the whole batch's target count, not its own (see compute_loss).
            self._batch_targets = target_count(inputs["labels"])
        deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        total = None
        try:
            for index, make_part in enumerate(parts):
                part = make_part()
                # DDP: all-reduce the gradients once, on the batch's last slice.
                last = index == len(parts) - 1
                sync = contextlib.nullcontext() if last or deepspeed or not hasattr(model, "no_sync") else model.no_sync()
                with sync:
                    loss = super().training_step(model, part, num_items_in_batch)
                total = loss if total is None else total + loss
        finally:
            self._batch_targets = None
        return total

    def _clip_grad_norm(self, model):
        """Binned steps (one process, no loss scaler): torch's `clip_grad_norm_` over the trained parameters,
        as accelerate calls it there with every parameter (the frozen ones have no gradient, so the norm
        and the clipping are the same), without walking the model's ~2,000 modules twice per step."""
        if self.graphed is None or self.accelerator.distributed_type != DistributedType.NO \
                or getattr(self.accelerator, "scaler", None) is not None:
            return super()._clip_grad_norm(model)
        return torch.nn.utils.clip_grad_norm_(self.graphed.params, self.args.max_grad_norm)

    def _add_tokens_seen(self, seen) -> None:
        self.tokens_seen = torch.as_tensor(seen) if self.tokens_seen is None else self.tokens_seen + seen

    def _binned_step(self, model, inputs, num_items_in_batch):
        """The batch's rows as fixed-size bins, each one forward + backward, captured and replayed as a
        CUDA graph after the first bins (`peftlab.train.graphs`); the loss the Trainer logs."""
        # `train()` walks every module (~10 ms of host time per QLoRA step): at the first step, and after
        # anything that put the model in eval mode (PEFT's wrapper is in training mode while the model
        # it wraps is not, hence the first step).
        if self.graphed is None or not model.training:
            model.train()
        lengths = inputs["row_lengths"]
        if max(lengths) > self.max_row_tokens:
            raise ValueError(f"a row of {max(lengths)} tokens is longer than max_row_tokens={self.max_row_tokens}")
        self._add_tokens_seen(sum(lengths))
        if num_items_in_batch is None:
            num_items_in_batch = target_count(inputs["labels"])
        if self.graphed is None:
            self.fused_adapters = fuse_adapter_additions(model)
            trained = [param for param in model.parameters() if param.requires_grad]
            self.graphed = GraphedForwardBackward(self._bin_loss(model), trained,
                                                  capture=self.cuda_graphs and self.args.device.type == "cuda")
            # The Trainer's `model.zero_grad()` after each step walks every module for the few that train.
            model.zero_grad = types.MethodType(_zero_grad_of(trained), model)
            self._capture_during_refresh()
        rows_per_bin = self.args.per_device_train_batch_size
        total = None
        for rows in pack_bins(lengths, self.graph_tokens, rows_per_bin):
            size = bin_size(sum(lengths[row] for row in rows), self.graph_tokens)
            layout = BinLayout(lengths, rows, size, row_slots(size, rows_per_bin),
                               pin=self.args.device.type == "cuda")
            values = {key: value.to(self.args.device, non_blocking=True)
                      for key, value in bin_tensors(inputs, layout, self.pad_id).items()}
            loss = self.graphed(values, num_items_in_batch)
            total = loss if total is None else total + loss
        return total

    def _capture_during_refresh(self) -> None:
        """A GaLore optimizer refreshing its bases in threads lets the host capture the bin sizes not
        seen yet meanwhile (`GraphedForwardBackward.capture_ahead`): the first refresh and those captures
        overlap instead of following each other."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper
        if not hasattr(optimizer, "while_refreshing"):
            return
        graphed, rows_per_bin, sizes = self.graphed, self.args.per_device_train_batch_size, bin_sizes(self.graph_tokens)
        optimizer.while_refreshing = lambda: graphed.capture_ahead(sizes, lambda size: row_slots(size, rows_per_bin),
                                                                   self.pad_id)

    def _bin_loss(self, model):
        causal_lm = base_model(model)
        decoder = causal_lm.get_decoder()
        longest = self.max_row_tokens
        chunk = self.loss_chunk_tokens
        bf16 = self.args.bf16 and self.args.device.type == "cuda"

        def loss(buffers: dict[str, torch.Tensor]) -> torch.Tensor:
            packed = {"position_ids": buffers["position_ids"], "cu_seq_lens": buffers["cu_seq_lens"],
                      "max_length": longest}
            forward = {"position_ids": buffers["position_ids"], **attention_inputs(causal_lm.config, packed)}
            # Autocast's weight-cast cache cannot live across graph replays.
            precision = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if bf16 \
                else contextlib.nullcontext()
            with precision:
                hidden = decoder(input_ids=buffers["input_ids"], use_cache=False, **forward).last_hidden_state
            return bin_loss(causal_lm, hidden, buffers["labels"], buffers["count"], chunk, triton=self.triton_loss)

        return loss

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        # An optimizer that clips its own gradients (projected GaLore) knows the norm; `.grad` does not.
        own = getattr(self.optimizer, "optimizer", self.optimizer)
        if getattr(own, "last_grad_norm", None) is not None:
            grad_norm = own.last_grad_norm
        if not self._defers_logs(tr_loss):
            return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)
        bound = inspect.signature(Trainer._maybe_log_save_evaluate).bind(self, tr_loss, grad_norm, *args, **kwargs)
        earlier, self._pending_log = self._pending_log, None
        if self.control.should_log and self.state.global_step > self._globalstep_last_logged:
            self._pending_log = PendingLog(self, tr_loss, grad_norm, bound.arguments.get("start_time"),
                                           bound.arguments.get("learning_rate"))
            tr_loss -= tr_loss  # what transformers does once it has read the value
            self._globalstep_last_logged = self.state.global_step
            self.store_flos()
        if earlier is not None:
            earlier.write(self)
        # Before anything that reads the log history or ends the loop, this step's log too.
        if (self.control.should_save or self.control.should_evaluate or self.control.should_training_stop
                or self.state.global_step >= self.state.max_steps):
            self._write_pending_log()
        self.control.should_log = False  # written (or pending) here
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    def _write_pending_log(self) -> None:
        pending, self._pending_log = self._pending_log, None
        if pending is not None:
            pending.write(self)

    def train(self, *args, **kwargs):
        self._pending_log = None  # one left by an interrupted earlier call belongs to no run
        return super().train(*args, **kwargs)

    def _finalize_training(self, *args, **kwargs):
        self._write_pending_log()  # a log made by the loop's last call (e.g. at an epoch's end)
        return super()._finalize_training(*args, **kwargs)

    def _defers_logs(self, tr_loss) -> bool:
        """`avoid_host_syncs` on one GPU: a logged step's loss and gradient norm are copied to the host
        without waiting, and written at the next step's log (`PendingLog`): reading them at once
        (`.item()`) would make the host wait for the GPU at every logged step, and the GPU then idles
        while the host prepares the next step."""
        return (self.avoid_host_syncs and torch.is_tensor(tr_loss) and tr_loss.is_cuda
                and self.args.world_size == 1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        packed = is_packed(inputs)
        self._add_tokens_seen(sum(inputs["row_lengths"]) if packed else inputs["attention_mask"].sum())
        causal_lm = base_model(model)
        if packed:
            inputs = pad_to_multiple(inputs, self.pad_tokens_to_multiple_of, self.pad_id)
            forward = {"position_ids": inputs["position_ids"], **attention_inputs(causal_lm.config, inputs)}
        else:
            forward = {"attention_mask": inputs["attention_mask"]}
        labels = inputs["labels"]
        if num_items_in_batch is not None:
            count = num_items_in_batch
        else:
            count = self._batch_targets if self._batch_targets is not None else target_count(labels)
        # `count` is the token count of all ranks, and DDP / FSDP average gradients over ranks.
        scale = (self.accelerator.num_processes
                 if num_items_in_batch is not None and self.args.average_tokens_across_devices else None)
        if self.is_fsdp_enabled:
            # Sharded weights exist whole only inside the wrapped forward: the loss is computed there
            # (`enable_target_token_forward`), through the root so that FSDP gathers them.
            request = TargetTokens(labels, count, scale, self.loss_chunk_tokens)
            with self.accelerator.autocast():
                returned = model(input_ids=inputs["input_ids"], target_tokens=request, **forward).loss
            loss = returned.float()
            if returned.dtype != torch.float32:
                # FSDP's mixed-precision policy cast the returned loss to bf16: restore the fp32 value;
                # the gradient still flows through `returned` (FSDP's pre-backward hooks are on it).
                loss = loss + (request.value - loss.detach())
            return (loss, None) if return_outputs else loss
        # accelerate's mixed precision wraps only the top-level forward, which a single process skips.
        with self.accelerator.autocast():
            hidden = final_hidden_states(model, causal_lm, inputs["input_ids"], **forward)
        loss = target_token_mean(causal_lm, hidden, labels, count, scale, self.loss_chunk_tokens)
        return (loss, None) if return_outputs else loss


class PendingLog:
    """One logged step's values on their way to the host (`TargetTokenTrainer._defers_logs`): the loss
    sum and gradient norm copied into pinned memory behind the step's kernels, an event after them,
    and the step's counters. `write` waits for the event only (work queued before it: the GPU is a
    step further by then) and logs as transformers would have at that step."""

    def __init__(self, trainer: Trainer, tr_loss: torch.Tensor, grad_norm, start_time: float | None,
                 learning_rate: float | None) -> None:
        state = trainer.state
        self.steps = state.global_step - trainer._globalstep_last_logged
        self.step, self.epoch, self.tokens = state.global_step, state.epoch, state.num_input_tokens_seen
        self.start_time = start_time
        self.created = time.time()
        self.learning_rate = learning_rate if learning_rate is not None else trainer._get_learning_rate()
        self.loss = _to_host(tr_loss)
        self.grad_norm = _to_host(grad_norm) if torch.is_tensor(grad_norm) else grad_norm
        self.ready = None
        if tr_loss.is_cuda:
            self.ready = torch.cuda.Event()
            self.ready.record()

    def write(self, trainer: Trainer) -> None:
        if self.ready is not None:
            self.ready.synchronize()
        loss = self.loss.item()
        logs: dict[str, float] = {"loss": loss / self.steps}
        if self.grad_norm is not None:
            logs["grad_norm"] = self.grad_norm.item() if torch.is_tensor(self.grad_norm) else self.grad_norm
        logs["learning_rate"] = self.learning_rate
        trainer._total_loss_scalar += loss
        state = trainer.state
        now = state.global_step, state.epoch, state.num_input_tokens_seen
        state.global_step, state.epoch, state.num_input_tokens_seen = self.step, self.epoch, self.tokens
        # transformers' speed fields divide by the time since `start_time`: as of the logged step.
        start_time = None if self.start_time is None else self.start_time + (time.time() - self.created)
        try:
            trainer.log(logs, start_time)
        finally:
            state.global_step, state.epoch, state.num_input_tokens_seen = now


def _to_host(value: torch.Tensor) -> torch.Tensor:
    if not value.is_cuda:
        return value.detach().clone()
    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
    host.copy_(value.detach(), non_blocking=True)
    return host


def _zero_grad_of(trained: list[torch.Tensor]):
    """`Module.zero_grad` for a model whose only gradients are those of `trained`: what the Trainer calls
    (set to None) touches those alone; zeroing in place stays `Module.zero_grad`'s own."""
    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none:
            return torch.nn.Module.zero_grad(self, set_to_none=False)
        for param in trained:
            param.grad = None

    return zero_grad


def target_count(labels: torch.Tensor) -> torch.Tensor:
    """The batch's target tokens: labels shifted by one, -100 ignored (what the loss divides by)."""
    return (labels[:, 1:] != IGNORE).sum()


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


class TrainingProgress(TrainerCallback):
    """One bar per training run (rank 0): optimizer steps done, and the loss every `logging_steps`."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: StageProgress | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = StageProgress(state.max_steps, f"train {self.label}", "step", initial=state.global_step,
                                 enabled=state.is_world_process_zero)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.advance_to(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.note(f"loss {float(logs['loss']):.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StopAfter(TrainerCallback):
    """Stops training after a given optimizer step (used to test interrupt + resume)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True
        return control


def training_arguments(method: MethodConfig, out: Path, device: str, dtype, recipe: Recipe,
                       fsdp: bool = False) -> TrainingArguments:
    # `method` is the resolved execution's (peftlab.train.execution): its batch split, checkpointing.
    """The Trainer's arguments for one method: its hyperparameters, checkpoints under `out`, the device's
    precision, and (with `fsdp`) sharding of every decoder layer."""
    extra: dict[str, Any] = {}
    if fsdp:
        layer = base_model(recipe.model).get_decoder().layers[0]
        extra["fsdp"] = True
        # Checkpointing stays the Trainer's: accelerate's FSDP activation checkpointing renames the
        # wrapped modules (PEFT then saves empty adapters) and replays dropout with a new RNG state.
        extra["fsdp_config"] = {"transformer_layer_cls_to_wrap": [type(layer).__name__],
                                "state_dict_type": "FULL_STATE_DICT", "activation_checkpointing": False}
    if method.avoid_host_syncs and device == "cuda":
        # Pinned batches copied without blocking the host: a blocking copy waits for the previous step's
        # kernels, and the GPU then idles while the host prepares the next ones.
        extra["accelerator_config"] = {"non_blocking": True}
        extra["dataloader_pin_memory"] = True
    if recipe.trainer_optim_args is not None:
        extra["optim_args"] = recipe.trainer_optim_args
        extra["optim_target_modules"] = recipe.trainer_optim_targets
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
        **_checkpointing_arguments(method.gradient_checkpointing),
        optim=recipe.trainer_optim,
        report_to=method.report_to if isinstance(method.report_to, str) else list(method.report_to),
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=device == "cpu",
        disable_tqdm=True,  # our bar instead (TrainingProgress)
        # The NaN check of every micro-batch's loss reads it on the host (a sync per micro-batch).
        logging_nan_inf_filter=not method.avoid_host_syncs,
        **extra,
    )


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


def _checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """Activation checkpointing in the installed transformers' words: newer releases renamed
    `gradient_checkpointing` to `activation_checkpointing` (the old name warns); older ones know only it."""
    known = inspect.signature(TrainingArguments.__init__).parameters
    name = "activation_checkpointing" if "activation_checkpointing" in known else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}}
