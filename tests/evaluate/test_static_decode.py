"""The static-cache decoder: token-identical to plain `generate` (fp32), across the sliding window."""

from __future__ import annotations

import pytest
import torch

from peftlab.config import load_config
from peftlab.evaluate import static_decode
from peftlab.evaluate.generate import encode_prompts, generate_token_ids, hf_greedy, length_sorted_batches
from peftlab.evaluate.static_decode import DecodeStats, static_greedy

# Prompts of 10-30 tokens and 40 new tokens: decoding crosses the tiny shape's 32-token sliding window.
PROMPTS = [
    "<bos><start_of_turn>user\nReverse the word apple, please, and tell me more about it in great detail."
    "<end_of_turn>\n<start_of_turn>model\n",
    "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "<bos><start_of_turn>user\nSort 3, 1, 2.<end_of_turn>\n<start_of_turn>model\n",
    "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
    "<start_of_turn>user\nAnd now?<end_of_turn>\n<start_of_turn>model\n",
]


@pytest.fixture(scope="module")
def tiny_model():
    from peftlab.models import load_model

    return load_model(load_config("smoke").model, device="cpu", dtype=torch.float32, seed=0).eval()


def test_static_decoder_matches_generate_token_for_token(tiny_model, gemma_tokenizer):
    assert tiny_model.config.sliding_window == 32 and "sliding_attention" in tiny_model.config.layer_types
    encoded = encode_prompts(gemma_tokenizer, PROMPTS)
    assert max(map(len, encoded)) + 40 > 2 * 32 and min(map(len, encoded)) < 32
    pad = gemma_tokenizer.pad_token_id
    plain = generate_token_ids(hf_greedy(tiny_model, gemma_tokenizer, 40), encoded, pad, [], 4, "cpu")
    stats = DecodeStats()
    ours = generate_token_ids(static_greedy(tiny_model, gemma_tokenizer, 40, stats=stats), encoded, pad, [], 4, "cpu")
    assert ours == plain and all(len(tokens) == 40 for tokens in ours)
    assert stats.batches == 1 and stats.steps == 39 and stats.graph_steps == 0
    # Batches of one and two rows (other padding) give the same tokens.
    assert generate_token_ids(static_greedy(tiny_model, gemma_tokenizer, 40), encoded, pad, [], 1, "cpu") == plain
    assert generate_token_ids(static_greedy(tiny_model, gemma_tokenizer, 40), encoded, pad, [], 2, "cpu") == plain


def test_static_decoder_stops_when_every_row_has_stopped(tiny_model, gemma_tokenizer, monkeypatch):
    # Every token is a stop token: all rows stop at their first token, the loop at the first check.
    monkeypatch.setattr(static_decode, "stop_token_ids", lambda tokenizer: list(range(tiny_model.config.vocab_size)))
    stats = DecodeStats()
    decode = static_greedy(tiny_model, gemma_tokenizer, 200, stats=stats)
    ids, mask = torch.tensor([[2, 10, 11], [0, 2, 12]]), torch.tensor([[1, 1, 1], [0, 1, 1]])
    out = decode(ids, mask)
    assert out.shape == (2, static_decode.STOP_CHECK_EVERY) and stats.steps == static_decode.STOP_CHECK_EVERY - 1


def test_token_budget_splits_long_prompts_from_short_ones():
    lengths = [100, 10, 12, 11, 9, 10]
    assert length_sorted_batches(lengths, 4) == [[0, 2, 3, 1], [5, 4]]
    # rows x (longest + 10 new) <= 200: the 100-token prompt goes alone, then 4 short rows, then the last.
    assert length_sorted_batches(lengths, 4, max_tokens=200, new_tokens=10) == [[0], [2, 3, 1, 5], [4]]
    assert length_sorted_batches([500], 4, max_tokens=10, new_tokens=10) == [[0]]  # never an empty batch
