"""GaLore whose gradients never persist at full size (`galore.accumulate: projected`).

Plain GaLore (galore-torch) keeps a full gradient of every weight until the optimizer step and
projects it to rank r there. With micro-batches that gradient set is the largest thing in memory
after the weights (1.86 GiB for Gemma 3 1B in bf16). Projection is linear, so the sum of the
micro-batches' projected gradients is the projection of their sum: here each target weight's
gradient is projected as soon as backward produces it (a post-accumulate-grad hook), added to a
rank-r accumulator, and freed. Every `update_proj_gap` steps GaLore recomputes the projection from
the whole step's gradient; on those steps the full gradients are summed in host memory instead and
projected at the step, so the projections are GaLore's own.

The tied 262k-row embedding never gets a full gradient on the GPU: the vocabulary loss
(`train/vocab_loss.py`) and the lookup (`route_embedding_gradient`) hand their gradients to this
optimizer in row blocks. Projections come from the eigenvectors of the Gram matrix summed block by
block (`galore_basis`), so no fp32 copy of the whole matrix is made on the device; with
`projection: svd` only matrices that large do.

galore-torch updates layer by layer without accumulation but never accumulates in the projected
space, so this is written here; the Adam updates are galore-torch's / bitsandbytes'. Gradient clipping uses the norm of the gradients the update sees
(the targets' projected ones and the other parameters'). Single process only.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from peftlab.errors import UserError
from peftlab.methods.galore_basis import ROW_BLOCK, basis_from_gram, gram_of_row_blocks

# With `projection: svd`, a tall target with at least this many elements still takes its projection from
# G^T G (see the docstring).
GRAM_MIN_ELEMENTS = 32 * 1024 * 1024
# Embedding classes whose forward is nn.Embedding's times `embed_scale` (what the routed lookup computes).
SCALED_EMBEDDINGS = {"Gemma3TextScaledWordEmbedding"}


class ProjectedGaLore(torch.optim.Optimizer):
    """GaLore-AdamW (`eight_bit`: bitsandbytes' 8-bit states, as GaLoreAdamW8bit) over `targets`,
    with projected gradient accumulation; `others` are plain parameter groups (AdamW)."""

    def __init__(self, targets: list[nn.Parameter], others: list[dict[str, Any]], *, lr: float, rank: int,
                 update_proj_gap: int, scale: float, weight_decay: float, max_grad_norm: float,
                 eight_bit: bool, projection: str = "gram", gram_min_elements: int = GRAM_MIN_ELEMENTS) -> None:
        super().__init__([{"params": list(targets), "weight_decay": weight_decay}, *others],
                         {"lr": lr, "weight_decay": 0.0})
        self.targets = list(targets)
        self.rank, self.update_proj_gap, self.scale = rank, update_proj_gap, scale
        self.max_grad_norm = max_grad_norm
        self.projection, self.gram_min_elements = projection, gram_min_elements
        self.steps_taken = 0
        self.last_grad_norm: float | None = None
        self.ortho: dict[nn.Parameter, torch.Tensor] = {}
        self.projected: dict[nn.Parameter, torch.Tensor] = {}  # this step's summed projected gradients
        self.host: dict[nn.Parameter, torch.Tensor] = {}  # projection steps: full gradients, fp32, in host memory
        # Targets that had no gradient on a projection step: they take a new projection from their next one.
        self.stale: set[nn.Parameter] = set()
        # The Adam update runs on a stand-in of the projected shape (what galore-torch does with p.data).
        self.stand_ins = {p: nn.Parameter(p.new_empty(0), requires_grad=False) for p in self.targets}
        inner_groups = [{"params": list(self.stand_ins.values()), "weight_decay": 0.0}]
        inner_groups += [{"params": list(g["params"]), "weight_decay": g.get("weight_decay", 0.0)} for g in others]
        if eight_bit:
            import bitsandbytes as bnb

            self.inner = bnb.optim.AdamW8bit(inner_groups, lr=lr)
        else:
            from galore_torch import GaLoreAdamW

            self.inner = GaLoreAdamW(inner_groups, lr=lr, no_deprecation_warning=True)
        self._hooks = [p.register_post_accumulate_grad_hook(self._absorb_grad) for p in self.targets]

    # -- gradients in, as backward produces them ------------------------------------------------------

    def projecting_step(self) -> bool:
        """Whether this step recomputes the projections (GaLore: every `update_proj_gap` steps, from 0)."""
        return self.steps_taken % self.update_proj_gap == 0

    @torch.no_grad()
    def _absorb_grad(self, param: nn.Parameter) -> None:
        grad, param.grad = param.grad, None
        if grad is not None:  # autograd runs the hook also when a function returned no gradient for it
            self.absorb_rows(param, 0, grad)

    @torch.no_grad()
    def absorb_rows(self, param: nn.Parameter, start: int, rows: torch.Tensor) -> None:
        """Add `rows`, the gradient of `param[start:start + len(rows)]`."""
        end = start + rows.shape[0]
        if self._needs_full(param):
            self._host_sum(param)[start:end] += rows.cpu().float()  # no fp32 copy on the GPU
        elif self._tall(param):
            self._projected_sum(param)[start:end] += rows @ self.ortho[param].t()
        else:
            self._projected_sum(param).addmm_(self.ortho[param][start:end].t(), rows)

    @torch.no_grad()
    def absorb_index(self, param: nn.Parameter, index: torch.Tensor, rows: torch.Tensor) -> None:
        """Add `rows[i]` to the gradient of `param[index[i]]` (repeated indices add up)."""
        if self._needs_full(param):
            self._host_sum(param).index_add_(0, index.cpu(), rows.cpu().float())
        elif self._tall(param):
            self._projected_sum(param).index_add_(0, index, rows @ self.ortho[param].t())
        else:
            self._projected_sum(param).addmm_(self.ortho[param][index].t(), rows)

    def _needs_full(self, param: nn.Parameter) -> bool:
        """Whether this step's gradient of `param` is summed whole, to compute its projection from."""
        return self.projecting_step() or param not in self.ortho or param in self.stale

    def _host_sum(self, param: nn.Parameter) -> torch.Tensor:
        if param not in self.host:
            self.host[param] = torch.zeros(param.shape, dtype=torch.float32, device="cpu")
        return self.host[param]

    def _projected_sum(self, param: nn.Parameter) -> torch.Tensor:
        if param not in self.projected:
            rows, cols = param.shape
            shape = (rows, self._kept(param)) if self._tall(param) else (self._kept(param), cols)
            self.projected[param] = torch.zeros(shape, dtype=param.dtype, device=param.device)
        return self.projected[param]

    @staticmethod
    def _tall(param: nn.Parameter) -> bool:
        """GaLore's `std` projection: a tall matrix keeps rank-r rows of its right factor, a wide one columns."""
        return param.shape[0] >= param.shape[1]

    def _kept(self, param: nn.Parameter) -> int:
        return min(self.rank, *param.shape)

    # -- the step ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for param in self.targets:  # a projection step's, or a first gradient of a weight unused until now
            if param in self.host:
                self._set_projection(param, self.host.pop(param))
                self.stale.discard(param)
            elif self.projecting_step():
                self.stale.add(param)
        self._clip()
        for inner_group, group in zip(self.inner.param_groups, self.param_groups, strict=True):
            inner_group["lr"] = group["lr"]
        for param, stand_in in self.stand_ins.items():
            if param in self.projected:
                stand_in.data = torch.zeros_like(self.projected[param])
                stand_in.grad = self.projected[param]
        self.inner.step()
        lr, decay = self.param_groups[0]["lr"], self.param_groups[0]["weight_decay"]
        for param, stand_in in self.stand_ins.items():
            if stand_in.grad is None:
                continue
            self._add_back(param, stand_in.data)
            if decay > 0:
                param.add_(param, alpha=-lr * decay)  # galore-torch's order: after the update
            stand_in.grad = None
            stand_in.data = param.new_empty(0)
        self.projected.clear()
        self.steps_taken += 1
        return loss

    def _add_back(self, param: nn.Parameter, low_rank: torch.Tensor) -> None:
        """param += scale x the update projected back, in place: galore-torch's `project_back` makes two
        weight-sized temporaries (1.1 GiB for the tied embedding), measured as the step's peak."""
        ortho = self.ortho[param]
        if self._tall(param):
            param.addmm_(low_rank, ortho, alpha=self.scale)
        else:
            param.addmm_(ortho, low_rank, alpha=self.scale)

    def _clip(self) -> None:
        grads = list(self.projected.values())
        grads += [p.grad for group in self.param_groups[1:] for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]))
        self.last_grad_norm = float(norm)
        if self.max_grad_norm > 0 and self.last_grad_norm > self.max_grad_norm:
            for grad in grads:
                grad.mul_(self.max_grad_norm / (self.last_grad_norm + 1e-6))

    @torch.no_grad()
    def _set_projection(self, param: nn.Parameter, summed: torch.Tensor) -> None:
        """The step's projection from its whole gradient (host-summed, rounded to the weight's dtype, as
        galore-torch sees it), and the projected gradient; both computed block by block on the device."""
        device, dtype, tall = param.device, param.dtype, self._tall(param)
        if self.projection == "svd" and not (tall and summed.numel() >= self.gram_min_elements):
            from galore_torch.galore_projector import GaLoreProjector

            grad = summed.to(dtype).to(device)
            self.ortho[param] = GaLoreProjector(self.rank).get_orthogonal_matrix(grad, self.rank, "right" if tall else "left")
            self.projected[param] = grad @ self.ortho[param].t() if tall else self.ortho[param].t() @ grad
            return
        rows = summed if tall else summed.t()  # the Gram matrix of its rows is G^T G (tall) or G G^T (wide)

        def blocks():
            for start in range(0, rows.shape[0], ROW_BLOCK):
                yield start, rows[start:start + ROW_BLOCK].to(dtype).to(device)

        gram = gram_of_row_blocks((block for _, block in blocks()), rows.shape[1], device)
        basis = self.ortho[param] = basis_from_gram(gram, self._kept(param), "right" if tall else "left", dtype)
        projected = self._projected_sum(param)
        for start, block in blocks():
            if tall:  # rows of G times the r x n basis
                projected[start:start + block.shape[0]] = block @ basis.t()
            else:  # columns of G: U_r^T G[:, s:e], as galore-torch's U_r^T G computes them
                projected[:, start:start + block.shape[0]] = basis.t() @ block.t()

    # -- checkpoints (--resume) ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        index = {p: i for i, p in enumerate(self.targets)}
        return {"inner": self.inner.state_dict(), "steps_taken": self.steps_taken,
                "rank": self.rank, "update_proj_gap": self.update_proj_gap,
                "stale": sorted(index[p] for p in self.stale),
                "ortho": {index[p]: o for p, o in self.ortho.items()},
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = (state_dict.get("rank"), state_dict.get("update_proj_gap"))
        if saved != (self.rank, self.update_proj_gap):
            raise UserError(f"the checkpoint's GaLore optimizer has rank {saved[0]} and update_proj_gap {saved[1]};"
                            f" this config has {self.rank} and {self.update_proj_gap}: resume with the same settings")
        self.inner.load_state_dict(state_dict["inner"])
        self.stale = {self.targets[int(i)] for i in state_dict.get("stale", [])}
        self.steps_taken = int(state_dict["steps_taken"])
        self.ortho = {self.targets[int(i)]: o.to(self.targets[int(i)].device) for i, o in state_dict["ortho"].items()}
        for group, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
            group.update(saved)


class _LookupIntoSink(torch.autograd.Function):
    """The embedding lookup, whose weight gradient goes to `sink.absorb_index` instead of `.grad`."""

    @staticmethod
    def forward(ctx, input_ids, weight, padding_idx, sink):
        ctx.save_for_backward(input_ids)
        ctx.weight, ctx.padding_idx, ctx.sink = weight, padding_idx, sink
        return F.embedding(input_ids, weight, padding_idx)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (input_ids,) = ctx.saved_tensors
        index = input_ids.reshape(-1)
        rows = grad_output.reshape(-1, grad_output.shape[-1])
        if ctx.padding_idx is not None:
            keep = index != ctx.padding_idx  # nn.Embedding leaves the padding row's gradient at zero
            index, rows = index[keep], rows[keep]
        ctx.sink.absorb_index(ctx.weight, index, rows.to(ctx.weight.dtype))
        return None, None, None, None


def route_embedding_gradient(embedding: nn.Embedding, sink: ProjectedGaLore) -> None:
    """Send the lookup's and (if tied) the vocabulary loss's gradient of `embedding.weight` to `sink`.

    Serves nn.Embedding and the embeddings in SCALED_EMBEDDINGS. A deep copy of the module (whose
    weight loses the `gradient_sink` attribute) looks up as a plain embedding again."""
    plain = type(embedding) is nn.Embedding
    if not plain and type(embedding).__name__ not in SCALED_EMBEDDINGS:
        raise TypeError(f"{type(embedding).__name__}: an embedding whose forward is not known here")
    if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
        raise TypeError("embeddings with max_norm, scale_grad_by_freq or sparse gradients are not supported")
    embedding.weight.gradient_sink = sink  # the fused vocabulary loss looks for it too
    embedding.forward = types.MethodType(_routed_lookup, embedding)


def _routed_lookup(self: nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
    sink = getattr(self.weight, "gradient_sink", None)
    if sink is None:
        looked_up = F.embedding(input_ids, self.weight, self.padding_idx)
    else:
        looked_up = _LookupIntoSink.apply(input_ids, self.weight, self.padding_idx, sink)
    scale = getattr(self, "embed_scale", None)
    return looked_up if scale is None else looked_up * scale.to(self.weight.dtype)
