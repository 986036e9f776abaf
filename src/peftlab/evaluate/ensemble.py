"""Ensemble decoding (report 9.5, done properly): mix the models' next-token log-probabilities.

At every greedy step `log p = α log p_A + (1-α) log p_B` (a weighted geometric mixture of the two
distributions; the argmax does not need renormalising), for models that share a tokenizer. The
original code averaged generated token *ids*, which is meaningless. Hand-written because no
maintained library decodes with several models' mixed distributions; it is a plain KV-cached loop
(`evaluate.decoder: generate`). The default decoder runs the same rule on static caches and CUDA
graphs: `static_decode.static_mixed_greedy`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from peftlab.evaluate.generate import BatchDecoder


def _step(model, ids, mask, positions, past):
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                use_cache=True, logits_to_keep=1)
    return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1), out.past_key_values


def mixed_greedy(models: Sequence, weights: Sequence[float], stop_ids: Sequence[int], pad_id: int,
                 max_new_tokens: int) -> BatchDecoder:
    """A batch decoder for `generate_all`; models with weight 0 are not run at all."""
    active = [(m, w) for m, w in zip(models, weights, strict=True) if w != 0]
    if not active:
        raise ValueError("at least one ensemble weight must be non-zero")

    @torch.inference_mode()
    def decode(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        pasts: list = [None] * len(active)
        current, current_pos = ids, positions
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        stops = torch.tensor(list(stop_ids), device=ids.device)
        generated = []
        for _ in range(max_new_tokens):
            mixed = None
            for index, (model, weight) in enumerate(active):
                logp, pasts[index] = _step(model, current, mask, current_pos, pasts[index])
                mixed = weight * logp if mixed is None else mixed + weight * logp
            token = mixed.argmax(dim=-1)
            token = torch.where(finished, torch.full_like(token, pad_id), token)
            generated.append(token)
            finished |= torch.isin(token, stops)
            if bool(finished.all()):
                break
            current = token[:, None]
            current_pos = current_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(current)], dim=1)
        return torch.stack(generated, dim=1)

    return decode
