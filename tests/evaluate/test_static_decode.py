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


def test_concurrent_batches_decode_as_one_at_a_time(tiny_model, gemma_tokenizer):
    encoded = encode_prompts(gemma_tokenizer, PROMPTS)
    pad = gemma_tokenizer.pad_token_id
    alone = generate_token_ids(static_greedy(tiny_model, gemma_tokenizer, 24), encoded, pad, [], 1, "cpu")
    stats = DecodeStats()
    decode = static_greedy(tiny_model, gemma_tokenizer, 24, concurrent=3, stats=stats)
    calls = []
    original = decode.decode_many
    decode.decode_many = lambda pairs: calls.append(len(pairs)) or original(pairs)
    assert generate_token_ids(decode, encoded, pad, [], 1, "cpu") == alone
    assert calls == [3, 1] and stats.batches == 4 and stats.steps == 4 * 23


def test_a_stopped_batch_leaves_the_wave_early(tiny_model, gemma_tokenizer, monkeypatch):
    # Stop tokens = the first token the short prompt's row generates: its batch leaves at the first
    # check, the other batch runs to max_new_tokens; both give what they give decoded alone.
    short, long = torch.tensor([[2, 12]]), torch.tensor([[2, 10, 11, 13]])
    ones = torch.ones_like
    plain = static_greedy(tiny_model, gemma_tokenizer, 40)
    first_short = int(plain(short, ones(short))[0, 0])
    long_alone = plain(long, ones(long))
    monkeypatch.setattr(static_decode, "stop_token_ids", lambda tokenizer: [first_short])
    stats = DecodeStats()
    decode = static_greedy(tiny_model, gemma_tokenizer, 40, concurrent=2, stats=stats)
    out_short, out_long = decode.decode_many([(short, ones(short)), (long, ones(long))])
    assert out_short.shape[1] == static_decode.STOP_CHECK_EVERY
    assert int(out_short[0, 0]) == first_short
    assert first_short not in long_alone[0].tolist()  # (seed 0) the long row never stops: it runs to the end
    assert torch.equal(out_long, long_alone)
    assert stats.steps == (static_decode.STOP_CHECK_EVERY - 1) + 39


def test_compiled_layers_decode_the_same_tokens(gemma_tokenizer):
    """`evaluate.torch_compile`: the decoder layers compiled in place (inductor on CPU), same greedy tokens."""
    from peftlab.models import load_model

    model = load_model(load_config("smoke").model, device="cpu", dtype=torch.float32, seed=0).eval()
    encoded = encode_prompts(gemma_tokenizer, PROMPTS)
    pad = gemma_tokenizer.pad_token_id
    plain = generate_token_ids(hf_greedy(model, gemma_tokenizer, 12), encoded, pad, [], 2, "cpu")
    stats = DecodeStats()
    decode = static_greedy(model, gemma_tokenizer, 12, torch_compile=True, stats=stats)
    assert generate_token_ids(decode, encoded, pad, [], 2, "cpu") == plain
    record = stats.as_dict()
    assert record["compiled_layers"] == 2
    assert record["compile"]["frames_ok"] >= 1 and record["compile"]["frames_ok"] == record["compile"]["frames_total"]


def test_packed_decode_attention_equals_transformers_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 4, True
    query, key, value = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 20, 16), torch.randn(3, 2, 20, 16)
    mask = torch.rand(3, 1, 1, 20) > 0.3
    mask[:, :, :, -1] = True
    ours, _ = static_decode.decode_attention(module, query, key, value, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert ours.shape == theirs.shape == (3, 1, 8, 16)
    torch.testing.assert_close(ours, theirs)


def test_decode_steps_use_the_packed_attention_and_restore_sdpa(tiny_model, gemma_tokenizer, monkeypatch):
    packed_calls = []
    original = static_decode.decode_attention

    def spy(module, query, key, value, *args, **kwargs):
        packed_calls.append((query.shape[2], key.shape[1] < query.shape[1]))
        return original(module, query, key, value, *args, **kwargs)

    monkeypatch.setattr(static_decode, "decode_attention", spy)
    decode = static_greedy(tiny_model, gemma_tokenizer, 5)
    ids = torch.tensor([[2, 10, 11]])
    decode(ids, torch.ones_like(ids))
    layers = tiny_model.config.num_hidden_layers
    assert packed_calls == [(1, True)] * (4 * layers)  # 4 decoding steps after the prefill
    assert tiny_model.config._attn_implementation == "sdpa"


def test_static_ensemble_matches_the_mixing_loop(gemma_tokenizer):
    from peftlab.evaluate.ensemble import mixed_greedy
    from peftlab.evaluate.generate import stop_token_ids
    from peftlab.evaluate.static_decode import static_mixed_greedy
    from peftlab.models import load_model

    model_config = load_config("smoke").model
    first = load_model(model_config, device="cpu", dtype=torch.float32, seed=0).eval()
    second = load_model(model_config, device="cpu", dtype=torch.float32, seed=1).eval()
    encoded = encode_prompts(gemma_tokenizer, PROMPTS)
    pad, stops = gemma_tokenizer.pad_token_id, stop_token_ids(gemma_tokenizer)
    for weights in ([0.5, 0.5], [0.25, 0.75], [1.0, 0.0]):
        loop = generate_token_ids(mixed_greedy([first, second], weights, stops, pad, 40), encoded, pad, stops, 2, "cpu")
        stats = DecodeStats()
        ours = generate_token_ids(static_mixed_greedy([first, second], weights, gemma_tokenizer, 40, stats=stats),
                                  encoded, pad, stops, 2, "cpu")
        assert ours == loop, weights
        assert stats.steps == 2 * 39  # two batches, 39 steps each
    alone = generate_token_ids(hf_greedy(second, gemma_tokenizer, 40), encoded, pad, [], 2, "cpu")
    mixed = generate_token_ids(static_mixed_greedy([first, second], [0.5, 0.5], gemma_tokenizer, 40), encoded, pad,
                               [], 2, "cpu")
    assert mixed != alone  # the mix is not one of its members


@pytest.mark.parametrize("chunk_tokens", [1, 20, 45])
def test_chunked_prefill_decodes_the_same_tokens(tiny_model, gemma_tokenizer, chunk_tokens):
    """`evaluate.prefill_chunk_tokens`: the prompt prefilled in slices (1 token per row per forward, slices
    across the 32-token sliding window, ragged last slices) gives the same tokens as one prefill."""
    encoded = encode_prompts(gemma_tokenizer, PROMPTS)
    pad = gemma_tokenizer.pad_token_id
    whole = generate_token_ids(static_greedy(tiny_model, gemma_tokenizer, 40), encoded, pad, [], 4, "cpu")
    chunked = generate_token_ids(static_greedy(tiny_model, gemma_tokenizer, 40, prefill_chunk_tokens=chunk_tokens),
                                 encoded, pad, [], 4, "cpu")
    assert chunked == whole


# -- other architectures --------------------------------------------------------------------------

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
            vocab_size=512, max_position_embeddings=256, bos_token_id=2, eos_token_id=1, pad_token_id=0)


def tiny_random(model_type: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**TINY, **extra})
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


class _Ids:
    """What the decoders read from a tokenizer: pad and EOS (no chat template: EOS is the only stop)."""

    pad_token_id, eos_token_id, chat_template = 0, 1, None


@pytest.mark.parametrize(("model_type", "extra"), [
    ("llama", {"head_dim": 16}), ("mistral", {"sliding_window": None}), ("qwen2", {}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    ("qwen3", {"head_dim": 16}), ("phi3", {}),
])
def test_static_decoder_matches_generate_for_every_checked_architecture(model_type, extra):
    model = tiny_random(model_type, **extra)
    assert static_decode.unsupported_reason([model]) is None
    generator = torch.Generator().manual_seed(1)
    encoded = [[2, *torch.randint(3, 500, (n,), generator=generator).tolist()] for n in (5, 14, 20, 9)]
    plain = generate_token_ids(hf_greedy(model, _Ids, 24), encoded, 0, [1], 4, "cpu")
    assert generate_token_ids(static_greedy(model, _Ids, 24), encoded, 0, [1], 4, "cpu") == plain
    assert sum(map(len, plain)) > 40


def test_unchecked_architectures_are_named_for_the_fallback():
    reason = static_decode.unsupported_reason([tiny_random("gpt2", n_embd=64, n_layer=2, n_head=4)])
    assert reason is not None and "gpt2" in reason and "generate" in reason
    mistral = tiny_random("mistral", sliding_window=8)  # a window without per-layer types
    assert "sliding window" in static_decode.unsupported_reason([mistral])


def test_the_evaluator_falls_back_to_generate_and_records_why(chat_tokenizer):
    from peftlab.evaluate.generate import EvalExample
    from peftlab.evaluate.runner import _generate, _single_decoder

    config = load_config("smoke")
    tokenizer = chat_tokenizer("chatml")
    gpt2 = tiny_random("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=1024)
    decode = _single_decoder(config, gpt2, tokenizer)
    assert decode.kind == "generate" and "gpt2" in decode.fallback
    examples = [EvalExample("r1", "src", "p", "ref", [5, 6, 7]), EvalExample("r2", "src", "p", "ref", [8, 9])]
    _, speed = _generate(config, decode, tokenizer, examples, "test")
    assert speed["decoder_kind"] == "generate" and "gpt2" in speed["decoder_fallback"]
    llama = tiny_random("llama", head_dim=16, vocab_size=1024)
    decode = _single_decoder(config, llama, tokenizer)
    assert decode.kind == "static" and not getattr(decode, "fallback", None)
    assert _generate(config, decode, tokenizer, examples, "test")[1]["decoder_kind"] == "static"
