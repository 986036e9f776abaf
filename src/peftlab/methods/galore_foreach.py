"""GaLore-AdamW's update with the element-wise work as foreach (multi-tensor) operations.

galore-torch's `GaLoreAdamW.step` updates one parameter at a time: about 15 kernels each, ~5,000
launches per step for Gemma 3 1B, 70 ms of an H100's time per step (the default execution's profile,
`benchmarks/results/h100-2026-12-06-profile-default.json`). `ForeachGaLoreAdamW` is the same class with
the same states and arithmetic: each parameter's gradient is projected (and its update projected back)
on its own, as there; the moments, the normalised step, the update and the weight decay run as a
handful of foreach kernels over all parameters of a group that share a step count. Every operation is
the one galore-torch applies, in the same order and dtype (tested against it to the bit on CUDA; fp32
on a CPU), so the checkpoints are interchangeable. Written here because galore-torch has no multi-tensor path.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from galore_torch import GaLoreAdamW
from galore_torch.galore_projector import GaLoreProjector


class ForeachGaLoreAdamW(GaLoreAdamW):
    """`galore_torch.GaLoreAdamW` with foreach moments and updates (see the module docstring).

    `foreach`: None = on CUDA only. (On a CPU, PyTorch's per-tensor `mul_` by a Python number rounds
    bf16 differently from its foreach kernel; on CUDA both compute in fp32. CPU runs gain nothing from
    it anyway: they run galore-torch's own loop.)
    `refresh`: how the Gram projectors due for a refresh get their bases before the parameter loop
    (`galore_basis.prefetch_bases`): `batched` (one batched eigensolve per gradient shape), `threads`
    (one per weight, over `REFRESH_THREADS` threads and CUDA streams), or None (each at its own
    `project`, as galore-torch does).

    `while_refreshing`: called on this thread while `threads` computes the bases (the GPU's eigensolvers
    are latency-bound, so the host is free: the Trainer captures its remaining CUDA graphs then)."""

    REFRESH_THREADS = 4

    def __init__(self, *args, foreach: bool | None = None, refresh: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if refresh not in (None, "batched", "threads"):
            raise ValueError(f"refresh: {refresh!r} is not None, 'batched' or 'threads'")
        self.foreach = foreach
        self.refresh = refresh
        self.while_refreshing: Callable[[], Any] | None = None

    @torch.no_grad()
    def step(self, closure=None):
        first = next((p for group in self.param_groups for p in group["params"]), None)
        if not (self.foreach if self.foreach is not None else first is not None and first.is_cuda):
            return super().step(closure)
        loss = None
        if closure is not None:
            loss = closure()
        if self.refresh is not None:
            self._prefetch_due_bases()
        for group in self.param_groups:
            # Parameters that share a step count share the bias correction: one batch of foreach ops each.
            batches: dict[int, list[tuple[torch.Tensor, torch.Tensor, dict]]] = defaultdict(list)
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")
                state = self.state[param]
                if "step" not in state:
                    state["step"] = 0
                grad = param.grad
                if "rank" in group:
                    if "projector" not in state:
                        state["projector"] = GaLoreProjector(group["rank"], update_proj_gap=group["update_proj_gap"],
                                                             scale=group["scale"], proj_type=group["proj_type"])
                    grad = state["projector"].project(grad, state["step"])
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                state["step"] += 1
                batches[state["step"]].append((param, grad, state))
            for step, batch in batches.items():
                self._update(group, step, batch)
        return loss

    def _prefetch_due_bases(self) -> None:
        """Bases for every projector that this step's `project` will refresh (galore-torch's rule: no
        basis yet, or the step count a multiple of `update_proj_gap`), computed together."""
        from peftlab.methods.galore_basis import prefetch_bases
        from peftlab.models.kernels import release_side_stream_workspaces

        due = []
        for group in self.param_groups:
            if "rank" not in group:
                continue
            for param in group["params"]:
                projector = self.state[param].get("projector") if param in self.state else None
                if param.grad is None or projector is None:
                    continue
                if projector.ortho_matrix is None or self.state[param].get("step", 0) % projector.update_proj_gap == 0:
                    due.append((projector, param.grad))
        if not due:
            return
        workers = self.REFRESH_THREADS if self.refresh == "threads" else 0
        prefetch_bases(due, workers=workers, meanwhile=self.while_refreshing if workers else None)
        if workers:
            release_side_stream_workspaces()  # the worker streams' cuBLAS workspaces, kept for good otherwise

    @staticmethod
    def _update(group: dict, step: int, batch: list[tuple[torch.Tensor, torch.Tensor, dict]]) -> None:
        params = [param for param, _, _ in batch]
        grads = [grad for _, grad, _ in batch]
        exp_avgs = [state["exp_avg"] for _, _, state in batch]
        exp_avg_sqs = [state["exp_avg_sq"] for _, _, state in batch]
        beta1, beta2 = group["betas"]
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denoms, group["eps"])
        step_size = group["lr"]
        if group["correct_bias"]:
            step_size = step_size * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)
        updates = torch._foreach_div(exp_avgs, denoms)
        del denoms
        if "rank" in group:
            updates = [state["projector"].project_back(update) for update, (_, _, state) in zip(updates, batch,
                                                                                                strict=True)]
        torch._foreach_add_(params, updates, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            torch._foreach_add_(params, params, alpha=-group["lr"] * group["weight_decay"])
