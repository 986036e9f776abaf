"""The target-token loss: cross-entropy over the assistant (target) tokens only, with the vocabulary
logits computed in recomputed chunks.

Gemma 3's vocabulary is 262,144 tokens: the logits of every position of every row would dominate a
step's memory and time, while the loss needs them only where labels are set. `target_token_mean`
gathers the final hidden states at target positions and computes the summed cross-entropy
`chunk` tokens at a time, each chunk recomputed in backward, so at most one chunk's logits exist.
The value equals the usual token-mean cross-entropy over the optimizer step's target tokens
(`count` is the whole step's target count, so micro-batches, slices and ranks add up to it).

- `target_token_loss_sum`: the chunked, checkpointed sum (any output projection).
- `vocab_loss.summed_cross_entropy`: the same sum with the tied embedding's gradient added in place
  (used when it applies; see `peftlab.train.vocab_loss`).
- `TargetTokens` / `enable_target_token_forward`: under FSDP the loss runs inside the wrapped
  forward, where the sharded vocabulary projection exists whole.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from peftlab.train import vocab_loss


def target_token_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, lm_head, softcap: float | None,
                          chunk: int = 256, preserve_rng_state: bool = True) -> torch.Tensor:
    """Summed cross-entropy of `targets` (-100: no target) given final hidden states, `chunk` tokens at a
    time, each chunk recomputed in backward, so the (tokens x vocabulary) logits never exist all at once.
    `preserve_rng_state=False` under CUDA-graph capture (the loss draws no random numbers)."""

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = lm_head(h).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, y, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start:start + chunk], targets[start:start + chunk]
        if torch.is_grad_enabled() and hidden.shape[0] > chunk:
            total = total + torch.utils.checkpoint.checkpoint(chunk_loss, h, y, use_reentrant=False,
                                                              preserve_rng_state=preserve_rng_state)
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


def bin_loss(causal_lm, hidden: torch.Tensor, labels: torch.Tensor, count: torch.Tensor, chunk: int,
             triton: bool = True) -> torch.Tensor:
    """The loss of a [1, tokens] packed bin: cross-entropy summed at every position (labels shifted by
    one, -100 contributing nothing) over `count`, the step's target count. Fixed shapes and no boolean
    indexing, so a CUDA graph can capture it (`peftlab.train.graphs`); the same value as
    `target_token_mean`'s. Gradients are computed in forward where the output projection allows
    (`vocab_loss.forward_gradient_loss`, through liger-kernel's Triton cross-entropy on CUDA if `triton`);
    else chunks recomputed in backward."""
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
    lm_head = causal_lm.get_output_embeddings()
    if vocab_loss.forward_gradient_applies(lm_head):
        return vocab_loss.forward_gradient_loss(hidden[0, :-1], labels[0, 1:], lm_head, count, softcap, chunk,
                                                triton=triton)
    summed = target_token_loss_sum(hidden[0, :-1], labels[0, 1:], lm_head, softcap, chunk, preserve_rng_state=False)
    return summed / count


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
        decoder_inputs = {key: value for key, value in kwargs.items() if key not in ("labels", "use_cache")}
        hidden = causal_lm.get_decoder()(**decoder_inputs).last_hidden_state
        loss = target_token_mean(causal_lm, hidden, target_tokens.labels, target_tokens.count, target_tokens.scale,
                                 target_tokens.chunk, sharded=True)
        target_tokens.value = loss.detach()
        return CausalLMOutputWithPast(loss=loss)

    causal_lm.forward = forward
    causal_lm._target_token_forward = True


def final_hidden_states(model, causal_lm, input_ids: torch.Tensor, **inputs) -> torch.Tensor:
    """The decoder's final-norm output, i.e. what the vocabulary projection reads. `inputs`: the
    attention inputs (`attention_mask`; padding-free batches: `position_ids`, masks or row bounds).

    A single process calls the decoder directly. Under DistributedDataParallel the call must go
    through the wrapper (its forward arms the gradient all-reduce), so the model runs with its head
    on one position only and a hook on the final norm keeps that norm's full output.
    """
    decoder = causal_lm.get_decoder()
    if getattr(model, "module", None) is None or not hasattr(decoder, "norm"):
        return decoder(input_ids=input_ids, **inputs).last_hidden_state
    captured: list[torch.Tensor] = []
    handle = decoder.norm.register_forward_hook(lambda _module, _args, output: captured.append(output))
    try:
        model(input_ids=input_ids, logits_to_keep=1, use_cache=False, **inputs)
    finally:
        handle.remove()
    return captured[-1]
