"""Gemma rendering, exactly one <bos>, and the assistant-token mask."""

from __future__ import annotations

from peftlab.data.chat import render, render_prompt, spans_to_mask, tokenize

CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And times 3?"},
    {"role": "assistant", "content": "The answer is 12."},
]


def test_render_is_the_gemma_turn_format():
    text = render(CONVERSATION).text
    assert text == (
        "<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"
        "<start_of_turn>user\nAnd times 3?<end_of_turn>\n<start_of_turn>model\nThe answer is 12.<end_of_turn>\n"
    )


def test_prompt_keeps_the_whole_conversation_before_the_last_answer():
    prompt = render_prompt(CONVERSATION)
    assert prompt.endswith("And times 3?<end_of_turn>\n<start_of_turn>model\n")
    assert "What is 2+2?" in prompt and "<start_of_turn>model\n4<end_of_turn>" in prompt
    assert "The answer is 12." not in prompt


def test_matches_the_tokenizers_chat_template(gemma_tokenizer):
    assert gemma_tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == render(CONVERSATION).text


def test_exactly_one_bos_and_the_mask_covers_the_answers(gemma_tokenizer):
    rendered = render(CONVERSATION)
    tokens = tokenize(rendered, gemma_tokenizer)
    bos = gemma_tokenizer.bos_token_id
    assert tokens.input_ids[0] == bos and tokens.input_ids.count(bos) == 1
    assert tokens.input_ids == gemma_tokenizer(rendered.text, add_special_tokens=False)["input_ids"]
    mask = spans_to_mask(len(tokens.input_ids), tokens.assistant_spans)
    answer = gemma_tokenizer.decode([t for t, m in zip(tokens.input_ids, mask, strict=True) if m])
    assert answer == "4<end_of_turn>The answer is 12.<end_of_turn>"
    assert len(tokens.assistant_spans) == 2


def test_truncation_cuts_ids_and_mask_together(gemma_tokenizer):
    full = tokenize(render(CONVERSATION), gemma_tokenizer)
    cut = tokenize(render(CONVERSATION), gemma_tokenizer, max_length=len(full.input_ids) - 3)
    assert cut.truncated and cut.input_ids == full.input_ids[:-3]
    full_mask = spans_to_mask(len(full.input_ids), full.assistant_spans)
    assert spans_to_mask(len(cut.input_ids), cut.assistant_spans) == full_mask[:-3]
