"""Generation: only generated ids become the prediction; ensemble decoding reduces to greedy."""

from __future__ import annotations

import pytest
import torch

from peftlab.config import load_config
from peftlab.errors import UserError
from peftlab.evaluate.ensemble import mixed_greedy
from peftlab.evaluate.generate import (
    cut_at_stop,
    generate_all,
    generate_token_ids,
    hf_greedy,
    length_sorted_batches,
    stop_token_ids,
)

PROMPTS = [
    "<bos><start_of_turn>user\nReverse the word apple.<end_of_turn>\n<start_of_turn>model\n",
    "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
    "<start_of_turn>user\nAdd 2 and 3, then tell me the answer in a full sentence please.<end_of_turn>\n"
    "<start_of_turn>model\n",
    "<bos><start_of_turn>user\nSort 3, 1, 2.<end_of_turn>\n<start_of_turn>model\n",
]


@pytest.fixture(scope="module")
def tiny_models(gemma_tokenizer):
    from peftlab.models import load_model

    config = load_config("smoke")
    first = load_model(config.model, device="cpu", dtype=torch.float32, seed=0).eval()
    second = load_model(config.model, device="cpu", dtype=torch.float32, seed=1).eval()
    return first, second


def test_prediction_is_the_generated_ids_only(gemma_tokenizer):
    stops = stop_token_ids(gemma_tokenizer)
    answer = gemma_tokenizer("The answer is 5.", add_special_tokens=False)["input_ids"]

    def decode(ids, mask):  # a model that echoes nothing of the prompt and stops at <end_of_turn>
        return torch.tensor([[*answer, stops[-1], 7, 7]] * ids.shape[0])

    outputs = generate_all(decode, gemma_tokenizer, PROMPTS, batch_size=2, device="cpu")
    assert [text for text, _ in outputs] == ["The answer is 5."] * 3
    assert all(count == len(answer) for _, count in outputs)


def test_no_prompts_no_work(gemma_tokenizer):
    assert generate_all(lambda ids, mask: ids, gemma_tokenizer, [], batch_size=2, device="cpu") == []


def test_batches_are_length_sorted_and_order_is_restored():
    assert length_sorted_batches([3, 9, 5, 9], 2) == [[1, 3], [2, 0]]
    assert cut_at_stop([5, 6, 1, 7], [1]) == [5, 6]


def test_left_padded_batches_match_one_by_one_greedy(tiny_models, gemma_tokenizer):
    model, _ = tiny_models
    decode = hf_greedy(model, gemma_tokenizer, max_new_tokens=6)
    batched = generate_all(decode, gemma_tokenizer, PROMPTS, batch_size=3, device="cpu")
    single = [generate_all(decode, gemma_tokenizer, [p], batch_size=1, device="cpu")[0] for p in PROMPTS]
    assert batched == single
    for (text, _), prompt in zip(batched, PROMPTS, strict=True):
        assert "Reverse the word" not in text and "<start_of_turn>" not in text and prompt not in text


def test_ensemble_with_alpha_one_is_model_a(tiny_models, gemma_tokenizer):
    first, second = tiny_models
    stops = stop_token_ids(gemma_tokenizer)
    greedy = generate_all(hf_greedy(first, gemma_tokenizer, 8), gemma_tokenizer, PROMPTS, 3, "cpu")
    alpha_one = mixed_greedy([first, second], [1.0, 0.0], stops, gemma_tokenizer.pad_token_id, 8)
    assert generate_all(alpha_one, gemma_tokenizer, PROMPTS, 3, "cpu") == greedy
    # The mixing path itself: two copies of one model mixed half and half is that model.
    halves = mixed_greedy([first, first], [0.5, 0.5], stops, gemma_tokenizer.pad_token_id, 8)
    assert generate_all(halves, gemma_tokenizer, PROMPTS, 3, "cpu") == greedy
    other = generate_all(hf_greedy(second, gemma_tokenizer, 8), gemma_tokenizer, PROMPTS, 3, "cpu")
    alpha_zero = mixed_greedy([first, second], [0.0, 1.0], stops, gemma_tokenizer.pad_token_id, 8)
    assert generate_all(alpha_zero, gemma_tokenizer, PROMPTS, 3, "cpu") == other


def _echo_last_token_decoder(limit: int, calls: list[tuple[int, int, bool]], concurrent: int = 1):
    """A decoder whose answer per row is its last prompt token twice, out of memory above `limit`
    padded prompt tokens in flight; `calls` gets (batches, tokens, ran out of memory) per call."""

    def decode_many(pairs):
        tokens = sum(ids.numel() for ids, _ in pairs)
        calls.append((len(pairs), tokens, tokens > limit))
        if tokens > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return [ids[:, -1:].repeat(1, 2) for ids, _ in pairs]

    def decode(ids, mask):
        return decode_many([(ids, mask)])[0]

    decode.decode_many = decode_many
    decode.concurrent = concurrent
    return decode


@pytest.mark.parametrize("concurrent", [1, 3])
def test_out_of_memory_steps_down_once_and_gives_the_same_result(concurrent, caplog):
    # 24 prompts of 6-9 tokens in 6 batches of 4 rows; at most 20 padded tokens fit: two rows of up to 9.
    encoded = [[1] * (5 + i % 4) + [100 + i] for i in range(24)]
    calls: list[tuple[int, int, bool]] = []
    roomy = generate_token_ids(_echo_last_token_decoder(10**6, []), encoded, 0, [], 4, "cpu")
    with caplog.at_level("WARNING"):
        tight = generate_token_ids(_echo_last_token_decoder(20, calls, concurrent), encoded, 0, [], 4, "cpu")
    assert tight == roomy == [[100 + i, 100 + i] for i in range(len(encoded))]
    # Each step down is kept for the batches after it: one failed call per step, one warning each.
    failed = [call for call in calls if call[2]]
    assert len(failed) == (2 if concurrent > 1 else 1)
    assert caplog.text.count("one batch at a time from here") == (1 if concurrent > 1 else 0)
    assert caplog.text.count("at most 2 rows per batch from here") == 1
    assert all(batches == 1 and tokens <= 20 for batches, tokens, _ in calls[len(failed):])


def test_out_of_memory_on_a_single_prompt_is_a_user_error():
    with pytest.raises(UserError, match="one prompt of 13 tokens with max_new_tokens 8"):
        generate_token_ids(_echo_last_token_decoder(12, []), [[1] * 12 + [5], [2, 3]], 0, [], 4, "cpu",
                           new_tokens=8)
    with pytest.raises(UserError, match=r"one prompt of 13 tokens: lower"):
        generate_token_ids(_echo_last_token_decoder(12, []), [[1] * 12 + [5]], 0, [], 4, "cpu")
