"""`peftlab prepare` on the real samples: counts, disjointness, one BOS, role rules, determinism."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from peftlab.config import load_config
from peftlab.data.prepare import prepare_data, sample_indices, source_rng
from peftlab.errors import UserError


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, samples_sources, gemma_tokenizer):
    config = load_config("samples", samples_sources)
    out = tmp_path_factory.mktemp("samples")
    stats = prepare_data(config, out, gemma_tokenizer)
    return config, out, stats


def test_exact_counts_per_source(prepared):
    _config, out, stats = prepared
    for split, per_source in (("train", 120), ("test", 40), ("validation", 10)):
        rows = _read(out / "data" / f"{split}.jsonl")
        counts = {name: sum(r["source_dataset"] == name for r in rows) for name in ("alpaca", "tulu", "ultrachat")}
        assert counts == {"alpaca": per_source, "tulu": per_source, "ultrachat": per_source}, split
    assert stats["splits"]["train"]["rows"] == 360


def test_splits_are_disjoint_and_ids_stable(prepared):
    _, out, _ = prepared
    ids = {split: [r["id"] for r in _read(out / "data" / f"{split}.jsonl")] for split in ("train", "test", "validation")}
    for split, values in ids.items():
        assert len(values) == len(set(values)), split
    assert not set(ids["train"]) & set(ids["test"])
    assert not set(ids["validation"]) & (set(ids["train"]) | set(ids["test"]))
    row = _read(out / "data" / "train.jsonl")[0]
    assert row["id"] == f"{row['source_dataset']}-{row['source_index']}"


def test_every_row_has_one_bos_and_valid_roles(prepared, gemma_tokenizer):
    _, out, _ = prepared
    bos = gemma_tokenizer.bos_token_id
    for split in ("train", "test"):
        for row in _read(out / "data" / f"{split}.jsonl"):
            assert row["input_ids"][0] == bos and row["input_ids"].count(bos) == 1
            assert row["text"].count("<bos>") == 1
            roles = [m["role"] for m in row["messages"]]
            assert roles[0] == "user" and roles[-1] == "assistant"
            assert all(a != b for a, b in itertools.pairwise(roles))
            assert set(roles) <= {"user", "assistant"}
            assert len(row["input_ids"]) <= 2048 and row["assistant_spans"]


def test_tulu_system_messages_are_prepended(prepared, samples_dir):
    _, out, _ = prepared
    source_rows = [json.loads(x) for x in (samples_dir / "tulu-v2-sft-mixture" / "tulu_v2_200.jsonl").read_text().splitlines()]
    rows = [r for r in _read(out / "data" / "train.jsonl") if r["source_dataset"] == "tulu"]
    with_system = [r for r in rows if source_rows[r["source_index"]]["messages"][0]["role"] == "system"]
    assert with_system, "the sample has open_orca rows with a system message"
    for row in with_system:
        original = source_rows[row["source_index"]]["messages"]
        expected = f"{original[0]['content'].strip()}\n\n{original[1]['content'].strip()}"
        assert row["messages"][0]["content"] == expected


def test_alpaca_input_is_joined(prepared, samples_dir):
    _, out, _ = prepared
    source_rows = json.loads((samples_dir / "alpaca" / "alpaca_4000.json").read_text())
    rows = [r for r in _read(out / "data" / "train.jsonl") if r["source_dataset"] == "alpaca"]
    with_input = [r for r in rows if source_rows[r["source_index"]]["input"].strip()]
    assert with_input
    for row in with_input:
        src = source_rows[row["source_index"]]
        assert row["messages"][0]["content"] == f"{src['instruction'].strip()}\n\nInput: {src['input'].strip()}"


def test_stats_and_examples(prepared):
    _, out, _stats = prepared
    written = json.loads((out / "data" / "stats.json").read_text())
    assert written["sources"]["tulu"]["train"]["sampled"] == 145
    assert written["sources"]["tulu"]["train"]["selected"] == 120
    for name in ("alpaca", "tulu", "ultrachat"):
        text = (out / "data" / "examples" / f"{name}_example.txt").read_text()
        assert "<start_of_turn>model\n" in text
    assert set(written["file_hashes"]) == {"train.jsonl", "test.jsonl", "validation.jsonl"}


def test_same_config_gives_identical_bytes(prepared, tmp_path, gemma_tokenizer):
    config, out, _ = prepared
    prepare_data(config, tmp_path, gemma_tokenizer)
    for name in ("train.jsonl", "test.jsonl", "validation.jsonl", "stats.json"):
        assert (tmp_path / "data" / name).read_bytes() == (out / "data" / name).read_bytes(), name


def test_each_source_draws_independently():
    alone = sample_indices(4000, 145, 50, source_rng(42, "alpaca"))
    again = sample_indices(4000, 145, 50, source_rng(42, "alpaca"))
    other = sample_indices(800, 145, 50, source_rng(42, "ultrachat"))
    assert alone == again and alone[0] != other[0]
    train, test = alone
    assert len(set(train)) == 145 and len(set(test)) == 50 and not set(train) & set(test)


def test_removing_a_source_does_not_change_another_sources_rows(prepared, tmp_path, gemma_tokenizer):
    config, out, _ = prepared
    config.data.sources = [s for s in config.data.sources if s.name != "alpaca"]
    prepare_data(config, tmp_path, gemma_tokenizer)
    def tulu_ids(base):
        return sorted(r["id"] for r in _read(base / "data" / "train.jsonl") if r["source_dataset"] == "tulu")
    assert tulu_ids(tmp_path) == tulu_ids(out)


def test_too_few_rows_names_the_source_and_the_buffer(tmp_path, gemma_tokenizer, samples_sources):
    config = load_config("samples", [*samples_sources, "data.max_seq_length=64", "prepare.overlength=drop"])
    with pytest.raises(UserError) as error:
        prepare_data(config, tmp_path, gemma_tokenizer)
    message = str(error.value)
    assert "usable train rows after filtering" in message and "overlength" in message
    assert "raise data.train_buffer (now 145)" in message
    config = load_config("samples", [*samples_sources, "data.train_buffer=3000"])
    with pytest.raises(UserError, match=r"'tulu'.* has 200 rows"):
        prepare_data(config, tmp_path, gemma_tokenizer)
    assert not (tmp_path / "data").exists()
