"""Optimizer steps without needless GPU syncs or per-parameter dispatch.

bitsandbytes' 8-bit optimizers (`paged_adamw_8bit`, QLoRA's) call `torch.cuda.synchronize()` after
every parameter's update: 364 syncs per QLoRA step on Gemma 3 1B, ~45 ms of a 260 ms step on an H100
(`benchmarks/results/h100-2026-12-06-profile-default.json`). Kernels on one stream run in order
anyway; `step_without_syncs` runs the same per-parameter updates (the same bitsandbytes kernels)
without them. bitsandbytes' paged states are prefetched and updated by kernels on the default stream,
in order with the training's own, so no sync is needed at the end of the step either: the host goes
on to the next step while the GPU finishes this one.

On CUDA an 8-bit blockwise update calls bitsandbytes' CUDA implementation directly instead of
through its `torch.ops` registration: the same kernel with the same arguments, without ~0.1 ms of
dispatch per parameter (36 ms of host time per QLoRA step, `h100-2026-12-06-first-steps.json`).
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable

import torch


def without_step_syncs(optimizer: torch.optim.Optimizer) -> bool:
    """Give a bitsandbytes 8-bit optimizer (this instance) `step_without_syncs`; False if it is none."""
    try:
        from bitsandbytes.optim.optimizer import Optimizer8bit
    except ImportError:
        return False
    # torch wraps each optimizer class's `step` in a profiling hook; unwrap it to compare.
    if inspect.unwrap(type(optimizer).step) is not inspect.unwrap(Optimizer8bit.step):
        return False  # not bitsandbytes' own loop (e.g. galore-torch's 8-bit GaLore)
    optimizer.step = types.MethodType(step_without_syncs, optimizer)
    return True


@torch.no_grad()
def step_without_syncs(self, closure=None):
    """bitsandbytes' `Optimizer8bit.step` (0.50) less the sync after each parameter and at the end."""
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    if not self.initialized:
        self.check_overrides()
        self.to_gpu()
        self.initialized = True
    # Only Optimizer2State's own update (AdEMAMix, a subclass, schedules its alpha and beta3 in its own).
    from bitsandbytes.optim.optimizer import Optimizer2State

    own_update = inspect.unwrap(type(self).update_step) is inspect.unwrap(Optimizer2State.update_step)
    direct = _direct_8bit_update() if own_update else None
    for gindex, group in enumerate(self.param_groups):
        for pindex, param in enumerate(group["params"]):
            if param.grad is None:
                continue
            if len(self.state[param]) == 0:
                self.init_state(group, param, gindex, pindex)
            self.prefetch_state(param)
            if direct is None or not _update_8bit_blockwise(self, group, param, gindex, pindex, direct):
                self.update_step(group, param, gindex, pindex)
    return loss


@functools.cache
def _direct_8bit_update() -> Callable | None:
    """bitsandbytes' CUDA implementation of `optimizer_update_8bit_blockwise` (what its `torch.ops`
    registration calls on CUDA), or None where it is not importable (no CUDA, another release) or takes
    other parameters than the public function whose arguments are passed to it."""
    if not torch.cuda.is_available():
        return None
    try:
        import bitsandbytes.functional as functional
        from bitsandbytes.backends.cuda.ops import _optimizer_update_8bit_blockwise_impl
    except (ImportError, AttributeError):
        return None
    names = list(inspect.signature(_optimizer_update_8bit_blockwise_impl).parameters)
    if names != list(inspect.signature(functional.optimizer_update_8bit_blockwise).parameters):
        return None
    return _optimizer_update_8bit_blockwise_impl


def _update_8bit_blockwise(self, group: dict, param: torch.Tensor, gindex: int, pindex: int, direct: Callable) -> bool:
    """`Optimizer2State.update_step` for an 8-bit blockwise state on CUDA, calling `direct`; False (nothing
    done) for any other state, which `update_step` then handles."""
    state = self.state[param]
    if not param.is_cuda or state["state1"].dtype != torch.uint8 or "absmax1" not in state:
        return False
    if not param.is_contiguous():
        param.data = param.data.contiguous()
    if not param.grad.is_contiguous():
        param.grad = param.grad.contiguous()
    config = self.get_config(gindex, pindex, group)
    state["step"] += 1
    betas = config["betas"]
    direct(self.optimizer_name, param.grad, param, state["state1"], state["state2"], betas[0], betas[1],
           betas[2] if len(betas) >= 3 else 0.0, config.get("alpha", 0.0), config["eps"], state["step"],
           config["lr"], state["qmap1"], state["qmap2"], state["absmax1"], state["absmax2"],
           config["weight_decay"], 1.0, config["skip_zeros"])
    return True
