"""Test rows longer than max_seq_length: cut back to the last exchange that fits (a prompt ending in
a user turn and its answer as the reference), counted in data/stats.json and in the eval metrics."""

from __future__ import annotations

import json

import pytest

from peftlab.config import load_config
from peftlab.data.chat import chat_template, fit_exchanges, render_prompt
from peftlab.data.prepare import prepare_data, read_split
from peftlab.errors import UserError

MAX_LEN = 80  # two multi-turn UltraChat demo test rows of the smoke config exceed it


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, gemma_tokenizer):
    config = load_config("smoke", [f"data.max_seq_length={MAX_LEN}"])
    run_dir = tmp_path_factory.mktemp("short")
    stats = prepare_data(config, run_dir, gemma_tokenizer)
    return config, run_dir, stats


def test_fit_exchanges_keeps_whole_turns(gemma_tokenizer):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": ("more " * 50).strip()}, {"role": "assistant", "content": "sure"}]
    chat = chat_template(gemma_tokenizer)
    assert fit_exchanges(turns, chat, 1000) == turns
    assert fit_exchanges(turns, chat, 30) == turns[:2]
    assert fit_exchanges(turns, chat, 5) is None


def test_overlength_test_rows_fit_and_are_counted(short_run, gemma_tokenizer):
    _, run_dir, stats = short_run
    rows = read_split(run_dir, "test")
    cut = [row for row in rows if row["truncated"]]
    assert len(cut) == stats["splits"]["test"]["overlength_rows"] == 2
    for row in rows:
        messages = row["messages"]
        assert messages[-1]["role"] == "assistant" and messages[-2]["role"] == "user"
        # The prompt and its reference together fit what training sees.
        chat = chat_template(gemma_tokenizer)
        assert len(chat.tokenize(chat.render(messages)).input_ids) == row["num_tokens"] <= MAX_LEN
        assert render_prompt(messages, gemma_tokenizer).endswith("<start_of_turn>model\n")
    written = json.loads((run_dir / "data" / "stats.json").read_text())
    assert written["splits"]["test"]["overlength_rows"] == 2


def test_evaluation_counts_overlength_rows_and_refuses_old_data(short_run):
    from peftlab.evaluate.runner import evaluate_model

    config, run_dir, _ = short_run
    metrics = evaluate_model(config, run_dir, "base")
    assert metrics["overlength_rows"] == 2 and metrics["n"] == 12
    stats_path = run_dir / "data" / "stats.json"
    stats = json.loads(stats_path.read_text())
    del stats["splits"]["test"]["overlength_rows"]  # as an older peftlab wrote it
    stats_path.write_text(json.dumps(stats))
    with pytest.raises(UserError, match=r"2 test rows are longer than data\.max_seq_length"):
        evaluate_model(config, run_dir, "base")
