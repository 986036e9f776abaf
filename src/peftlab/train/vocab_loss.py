"""The vocabulary cross-entropy with its gradients written where they go: for a trained, tied output
projection, its weight gradient added in place (`summed_cross_entropy`); for the binned step, every
gradient computed in forward (`forward_gradient_loss`, at the end).

`runner.target_token_loss_sum` recomputes the logits chunk by chunk in backward; when the output
projection trains (GaLore, full fine-tuning: Gemma 3 ties it to the 262k x 1152 input embedding),
autograd then holds, besides `weight.grad`, a gradient buffer of the whole weight and each chunk's
full-size weight gradient before adding it: two extra weight-sized tensors at the loss's backward
(2 x 0.56 GiB for Gemma 3 in bf16). Here backward adds every chunk's share straight into
`weight.grad` (`addmm_`), as Megatron-LM's gradient-accumulation fusion does; no library offers it
for this loss with Gemma's soft-capping, so it is written here.

A weight with a `gradient_sink` (projected GaLore) gets its gradient by blocks of vocabulary rows
instead, handed to the sink; it then never exists whole.

On CUDA with liger-kernel installed, the forward-gradient loss runs each chunk through liger's Triton
cross-entropy kernel (called directly: liger's autograd functions read the target count on the host,
which a CUDA graph cannot capture).

Only for a single process and a weight that the input embedding shares: the embedding lookup's
gradient then still reaches the parameter through autograd, so hooks on it (layer-wise optimizers)
run once the whole gradient is in place. Under DDP / FSDP the reducers own `.grad`: not used there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from peftlab.train.batches import IGNORE

# Most vocabulary rows per block in the backward by rows: 8,192 x 1,152 bf16 is 18 MiB for Gemma 3.
MAX_ROW_BLOCK = 8192


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `targets` under logits `hidden @ weight.T` (soft-capped), `chunk` rows at
    a time in forward and in backward; backward returns the hidden states' gradient and adds the
    weight's into `weight.grad` itself (returning none for it)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk):
        total = hidden.new_zeros((), dtype=torch.float32)
        log_normalizers = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            logits = _capped(F.linear(hidden[start:start + chunk], weight).float(), softcap)[0]
            y = targets[start:start + chunk]
            log_normalizers[start:start + chunk] = torch.logsumexp(logits, dim=-1)
            total += (log_normalizers[start:start + chunk] - logits.gather(1, y[:, None])[:, 0]).sum()
        ctx.save_for_backward(hidden, targets, log_normalizers)
        ctx.weight, ctx.softcap, ctx.chunk = weight, softcap, chunk  # the parameter itself: its .grad is written
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        hidden, targets, log_normalizers = ctx.saved_tensors
        weight = ctx.weight
        sink = getattr(weight, "gradient_sink", None)
        if sink is not None:
            return _backward_by_vocabulary_rows(ctx, grad_total, hidden, targets, log_normalizers, sink)
        grad_hidden = torch.empty_like(hidden)
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        for start in range(0, hidden.shape[0], ctx.chunk):
            h, y = hidden[start:start + ctx.chunk], targets[start:start + ctx.chunk]
            # In place wherever possible: at most two fp32 (chunk x vocabulary) tensors at once.
            grad_logits = F.linear(h, weight).float()
            tanh = None
            if ctx.softcap:
                tanh = grad_logits.div_(ctx.softcap).tanh_()
                grad_logits = torch.softmax(tanh * ctx.softcap, dim=-1)
            else:
                grad_logits = torch.softmax(grad_logits, dim=-1)
            grad_logits[torch.arange(y.shape[0], device=y.device), y] -= 1  # softmax - one-hot
            if tanh is not None:
                grad_logits.mul_(tanh.mul_(tanh).neg_().add_(1))  # the soft-cap's derivative, 1 - tanh^2
                del tanh
            grad_logits = grad_logits.mul_(grad_total).to(weight.dtype)
            grad_hidden[start:start + ctx.chunk] = grad_logits @ weight
            weight.grad.addmm_(grad_logits.t(), h)
            del grad_logits
        return grad_hidden, None, None, None, None


def _backward_by_vocabulary_rows(ctx, grad_total, hidden, targets, log_normalizers, sink):
    """Backward one block of vocabulary rows at a time, for a weight whose gradient goes to `sink`
    (`methods/galore_projected.py`): each block's rows of the weight gradient are complete, so they are
    handed over whole and no weight-sized gradient ever exists. Blocks hold about `chunk` x vocabulary
    logits, as the token chunks do, and at most MAX_ROW_BLOCK rows of the weight gradient (a few tokens
    would otherwise make one block of the whole vocabulary)."""
    weight, softcap = ctx.weight, ctx.softcap
    tokens = hidden.shape[0]
    block = min(MAX_ROW_BLOCK, max(256, ctx.chunk * weight.shape[0] // max(tokens, 1)))
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    positions = torch.arange(tokens, device=hidden.device)
    for start in range(0, weight.shape[0], block):
        rows = weight[start:start + block]
        grad_logits = F.linear(hidden, rows).float()
        tanh = None
        if softcap:
            tanh = grad_logits.div_(softcap).tanh_()
            grad_logits = (tanh * softcap).sub_(log_normalizers[:, None]).exp_()
        else:
            grad_logits = grad_logits.sub_(log_normalizers[:, None]).exp_()
        inside = (targets >= start) & (targets < start + rows.shape[0])
        grad_logits[positions[inside], targets[inside] - start] -= 1  # softmax - one-hot
        if tanh is not None:
            grad_logits.mul_(tanh.mul_(tanh).neg_().add_(1))
            del tanh
        grad_logits = grad_logits.mul_(grad_total).to(weight.dtype)
        grad_hidden += grad_logits @ rows
        sink.absorb_rows(weight, start, grad_logits.t() @ hidden)
        del grad_logits
    return grad_hidden.to(hidden.dtype), None, None, None, None


def _capped(logits: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not softcap:
        return logits, None
    tanh = torch.tanh(logits / softcap)
    return tanh * softcap, tanh


def applies(lm_head, input_embeddings) -> bool:
    """Whether `summed_cross_entropy` may serve this output projection (see the module docstring)."""
    weight = getattr(lm_head, "weight", None)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1
    # Under autocast the checkpointed chunks replay its casts, this backward would not; a gradient dtype
    # other than the weight's would not take `addmm_` into a weight-dtype chunk.
    return (isinstance(lm_head, torch.nn.Linear) and lm_head.bias is None and weight is not None
            and weight.requires_grad and torch.is_grad_enabled() and not distributed
            and not torch.is_autocast_enabled(weight.device.type)
            and getattr(weight, "grad_dtype", None) in (None, weight.dtype)
            and getattr(input_embeddings, "weight", None) is weight)


def summed_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, lm_head, softcap: float | None,
                         chunk: int) -> torch.Tensor:
    return _ChunkedCrossEntropy.apply(hidden, lm_head.weight, targets, softcap, chunk)


class _CrossEntropyWithForwardGradient(torch.autograd.Function):
    """Summed cross-entropy over every position (-100: no target) divided by `count`, with its gradients
    computed in forward, one chunk of logits at a time: the hidden states' gradient is kept for
    backward, a trained weight's is added straight into `weight.grad`. Two vocabulary matmuls per
    chunk (three with a trained weight) instead of the checkpointed chunk's four (five), and one pass
    over each chunk's fp32 logits instead of three. The weight's gradient assumes the loss is
    backpropagated as it is (upstream gradient 1): `forward_gradient_loss` is used only by the binned
    step (`peftlab.train.graphs`), which calls `backward()` on this loss itself."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, count, softcap, chunk, triton):
        with torch.autocast(hidden.device.type, enabled=False):
            hidden = hidden.to(weight.dtype)
            scale = count.to(torch.float32).reciprocal()
            total = hidden.new_zeros((), dtype=torch.float32)
            grad_hidden = torch.empty_like(hidden)
            trains = weight.requires_grad
            if trains and weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            fused = _liger_kernel() if hidden.is_cuda and triton else None
            for start in range(0, hidden.shape[0], chunk):
                h, y = hidden[start:start + chunk], targets[start:start + chunk]
                if fused is not None:
                    grad_logits = F.linear(h, weight)
                    total += _fused_softmax_gradient_(fused, grad_logits, y, softcap)
                    torch.mm(grad_logits, weight, out=grad_hidden[start:start + chunk]).mul_(scale)
                    if trains:
                        weight.grad.addmm_(grad_logits.t(), h * scale)
                    del grad_logits
                    continue
                valid = y != IGNORE
                picked = y.clamp(min=0)[:, None]
                logits, tanh = _capped(F.linear(h, weight).float(), softcap)
                log_normalizers = torch.logsumexp(logits, dim=-1)
                total += ((log_normalizers - logits.gather(1, picked)[:, 0]) * valid).sum()
                grad_logits = logits.sub_(log_normalizers[:, None]).exp_()  # softmax, in place
                grad_logits.scatter_add_(1, picked, -valid[:, None].to(grad_logits.dtype))  # - one-hot
                grad_logits.mul_((valid.to(grad_logits.dtype) * scale)[:, None])
                if tanh is not None:
                    grad_logits.mul_(tanh.mul_(tanh).neg_().add_(1))  # the soft-cap's derivative
                    del tanh
                grad_logits = grad_logits.to(weight.dtype)
                grad_hidden[start:start + chunk] = grad_logits @ weight
                if trains:
                    weight.grad.addmm_(grad_logits.t(), h)
                del grad_logits, logits
        ctx.save_for_backward(grad_hidden)
        return total * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None, None, None, None


def triton_cross_entropy_available() -> bool:
    """Whether `forward_gradient_loss` can run liger-kernel's Triton cross-entropy here (CUDA, liger 0.8)."""
    return torch.cuda.is_available() and _liger_kernel() is not None


def _liger_kernel():
    """liger-kernel's cross-entropy Triton kernel when it is installed with the arguments used here."""
    try:
        from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel
    except Exception:  # not installed, or no Triton for this device
        return None
    names = set(getattr(liger_cross_entropy_kernel, "arg_names", ()))
    # Every argument known: a release that adds or renames one (and may compute otherwise) is not used.
    if not _LIGER_ARGUMENTS <= names <= _LIGER_ARGUMENTS | _LIGER_OPTIONAL.keys():
        return None
    return liger_cross_entropy_kernel


# The arguments this module passes (liger-kernel 0.8); a kernel with any other argument is not used.
_LIGER_ARGUMENTS = {"X_ptr", "X_stride", "Y_ptr", "Y_stride", "loss_ptr", "loss_stride", "n_cols", "n_non_ignore",
                    "ignore_index", "label_smoothing", "reduction", "softcap", "RETURN_Z_LOSS", "BLOCK_SIZE",
                    "HAS_SOFTCAPPING"}
_LIGER_OPTIONAL = {"weight_ptr": None, "z_loss_ptr": None, "token_accuracy_ptr": None, "token_accuracy_stride": 0,
                   "predicted_tokens_ptr": None, "predicted_tokens_stride": 0, "sum_non_ignore_weight": 1.0,
                   "weight_sum": 0.0, "lse_square_scale": 0.0, "RETURN_TOKEN_ACCURACY": False,
                   "RETURN_PREDICTED_TOKENS": False, "HAS_WEIGHT": False, "HAS_GRADIENTS": True}


def _fused_softmax_gradient_(kernel, logits: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """The summed cross-entropy of a chunk of logits, whose values are replaced in place by their
    gradient (softmax - one-hot; zero at -100): one Triton kernel reading the logits twice in their own
    dtype with fp32 arithmetic, instead of an fp32 copy and its passes (29 ms of an H100 step)."""
    import triton

    rows, vocabulary = logits.shape
    losses = torch.zeros(rows, dtype=torch.float32, device=logits.device)
    # A fresh (aligned) copy: Triton specialises on pointer alignment, and a view's chunks alternate in it.
    targets = targets.clone()
    names = set(kernel.arg_names)
    optional = {key: value for key, value in _LIGER_OPTIONAL.items() if key in names}
    kernel[(rows,)](X_ptr=logits, X_stride=logits.stride(0), Y_ptr=targets, Y_stride=targets.stride(0),
                    loss_ptr=losses, loss_stride=1, n_cols=vocabulary, n_non_ignore=1.0, ignore_index=IGNORE,
                    label_smoothing=0.0, reduction="sum", softcap=softcap, RETURN_Z_LOSS=False,
                    HAS_SOFTCAPPING=bool(softcap), BLOCK_SIZE=min(32768, triton.next_power_of_2(vocabulary)),
                    num_warps=16 if torch.version.hip else 32, **optional)  # liger's own choice per vendor
    return losses.sum()


def forward_gradient_applies(lm_head) -> bool:
    """Whether `forward_gradient_loss` can serve this output projection: a bias-free nn.Linear whose
    weight's gradient goes to `.grad` (not to a projected GaLore's `gradient_sink`)."""
    return (isinstance(lm_head, torch.nn.Linear) and lm_head.bias is None and torch.is_grad_enabled()
            and getattr(lm_head.weight, "gradient_sink", None) is None)


def forward_gradient_loss(hidden: torch.Tensor, targets: torch.Tensor, lm_head, count: torch.Tensor,
                          softcap: float | None, chunk: int, triton: bool = True) -> torch.Tensor:
    """The token-mean cross-entropy (sum over targets / `count`) with gradients computed in forward
    (see `_CrossEntropyWithForwardGradient`); on CUDA through liger-kernel's Triton cross-entropy when it
    is installed and `triton`."""
    return _CrossEntropyWithForwardGradient.apply(hidden, lm_head.weight, targets, count, softcap, chunk, triton)
