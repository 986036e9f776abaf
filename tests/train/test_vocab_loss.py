"""The fused vocabulary loss: same loss and gradients as the checkpointed chunks, weight gradient in place."""

from __future__ import annotations

import pytest
import torch

from peftlab.train import vocab_loss
from peftlab.train.loss import target_token_loss_sum


def _tied(vocab: int = 50, width: int = 8):
    torch.manual_seed(0)
    embed = torch.nn.Embedding(vocab, width)
    head = torch.nn.Linear(width, vocab, bias=False)
    head.weight = embed.weight
    return embed, head


def _loss_and_grads(summed, embed, head, ids, targets, softcap, chunk, earlier_grad=None):
    embed.weight.grad = None if earlier_grad is None else earlier_grad.clone()
    hidden = torch.tanh(embed(ids) * 3)  # the lookup's gradient reaches the tied weight too
    hidden.retain_grad()
    loss = summed(hidden, targets, head, softcap, chunk)
    loss.backward()
    return loss.detach(), hidden.grad.clone(), embed.weight.grad.clone()


@pytest.mark.parametrize("softcap", [None, 2.0, 0.5])
@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_same_loss_and_gradients_as_the_checkpointed_chunks(softcap, chunk):
    embed, head = _tied()
    ids = torch.randint(0, 50, (13,))
    targets = torch.randint(0, 50, (13,))
    assert vocab_loss.applies(head, embed)
    for earlier in (None, torch.randn(50, 8)):  # a gradient accumulated by an earlier micro-batch
        plain = _loss_and_grads(target_token_loss_sum, embed, head, ids, targets, softcap, chunk, earlier)
        fused = _loss_and_grads(vocab_loss.summed_cross_entropy, embed, head, ids, targets, softcap, chunk, earlier)
        for a, b in zip(plain, fused, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(fused[0]) > 0 and fused[2].abs().sum() > 0


def test_only_for_a_trained_tied_projection_without_bias():
    embed, head = _tied()
    assert vocab_loss.applies(head, embed)
    assert not vocab_loss.applies(head, torch.nn.Embedding(50, 8))  # untied
    with torch.no_grad():
        assert not vocab_loss.applies(head, embed)  # no backward to save memory in
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not vocab_loss.applies(head, embed)  # its backward would not replay autocast's casts
    embed.weight.requires_grad_(False)
    assert not vocab_loss.applies(head, embed)  # frozen (LoRA, QLoRA): the checkpointed chunks serve
    biased = torch.nn.Linear(8, 50)
    assert not vocab_loss.applies(biased, biased)


def test_bf16_matches_the_checkpointed_chunks_when_nothing_accumulated():
    embed, head = _tied(vocab=300, width=16)
    embed.to(torch.bfloat16)
    ids, targets = torch.randint(0, 300, (21,)), torch.randint(0, 300, (21,))
    plain = _loss_and_grads(target_token_loss_sum, embed, head, ids, targets, 3.0, 8)
    fused = _loss_and_grads(vocab_loss.summed_cross_entropy, embed, head, ids, targets, 3.0, 8)
    torch.testing.assert_close(fused[0], plain[0])
    torch.testing.assert_close(fused[1], plain[1])
    torch.testing.assert_close(fused[2].float(), plain[2].float(), rtol=2e-2, atol=2e-3)  # bf16 rounding


class _DenseSink:
    """Collects the row blocks a routed weight's gradient arrives in (projected GaLore's interface)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.grad = torch.zeros_like(weight)
        self.blocks: list[int] = []

    def absorb_rows(self, param, start, rows):
        self.grad[start:start + rows.shape[0]] += rows
        self.blocks.append(rows.shape[0])


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_a_routed_weight_gets_the_same_gradient_by_vocabulary_rows(softcap, monkeypatch):
    monkeypatch.setattr(vocab_loss, "MAX_ROW_BLOCK", 16)  # 50 rows: blocks of 16, 16, 16, 2
    embed, head = _tied()
    ids = torch.randint(0, 50, (3,))  # few tokens: without the cap one block would be the whole vocabulary
    targets = torch.randint(0, 50, (3,))
    plain = _loss_and_grads(target_token_loss_sum, embed, head, ids, targets, softcap, 2)
    sink = _DenseSink(embed.weight)
    embed.weight.gradient_sink = sink
    try:
        routed = _loss_and_grads(vocab_loss.summed_cross_entropy, embed, head, ids, targets, softcap, 2)
    finally:
        del embed.weight.gradient_sink
    torch.testing.assert_close(routed[0], plain[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routed[1], plain[1], rtol=1e-5, atol=1e-6)
    # .grad holds only the lookup's share; the vocabulary loss's share arrived by rows
    torch.testing.assert_close(routed[2] + sink.grad, plain[2], rtol=1e-5, atol=1e-6)
    assert sink.blocks == [16, 16, 16, 2] and sink.grad.abs().sum() > 0
