"""The command line: user errors are one line on stderr with exit status 2, never a traceback,
and never an output folder that looks complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftlab.cli import main

CONFIG = """
name: bad
data:
  train_per_source: 2
  test_per_source: 1
  train_buffer: 3
  test_buffer: 1
  max_seq_length: 128
  sources:
    - {{name: src, format: {fmt}, path: {path}}}
model: {{name_or_path: builtin:gemma-3-270m}}
methods: {{lora: {{kind: lora}}}}
"""


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def _config(tmp_path: Path, rows: str, fmt: str = "tulu", name: str = "rows.jsonl") -> Path:
    data = tmp_path / name
    data.write_text(rows)
    config = tmp_path / "study.yaml"
    config.write_text(CONFIG.format(fmt=fmt, path=data))
    return config


def _error_line(code: int, err: str) -> str:
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("peftlab: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    return lines[0]


def test_missing_config(capsys, tmp_path):
    line = _error_line(*_run(capsys, "prepare", tmp_path / "nope.yaml"))
    assert "nope.yaml: file not found" in line


def test_config_typo_names_the_key(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  seeed: 1\n")
    line = _error_line(*_run(capsys, "prepare", config))
    assert "unknown key 'data.seeed' (did you mean 'seed'?)" in line


def test_bad_set_override(capsys):
    line = _error_line(*_run(capsys, "prepare", "smoke", "--set", "data.seed=x"))
    assert "data.seed: expected an integer" in line


GOOD = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'


@pytest.mark.parametrize(("rows", "fmt", "expected"), [
    (GOOD * 2 + '{"messages": [}\n' + GOOD * 3, "tulu", "rows.jsonl line 3: malformed JSON"),
    (GOOD + '{"messages": [{"role": "robot", "content": "x"}]}\n' + GOOD * 4, "tulu", "unknown role 'robot'"),
    (GOOD + '{"text": "x"}\n' + GOOD * 4, "tulu", "missing field 'messages'"),
    ('{"messages": []}\n' * 6, "tulu", "only 0 usable train rows after filtering (3 sampled, dropped: empty_conversation 3)"),
    (GOOD * 2, "tulu", "has 2 rows, fewer than data.train_buffer + data.test_buffer = 4"),
])
def test_bad_data_is_one_line_and_leaves_no_data_folder(capsys, tmp_path, gemma_tokenizer, rows, fmt, expected):
    config = _config(tmp_path, rows, fmt)
    out = tmp_path / "run"
    line = _error_line(*_run(capsys, "prepare", config, "--out", out))
    assert expected in line
    assert not (out / "data").exists()


def test_missing_data_file(capsys, tmp_path, gemma_tokenizer):
    config = tmp_path / "study.yaml"
    config.write_text(CONFIG.format(fmt="alpaca", path=tmp_path / "absent.json"))
    line = _error_line(*_run(capsys, "prepare", config, "--out", tmp_path / "run"))
    assert "absent.json" in line and "not found" in line


def test_offline_hub_dataset_suggests_a_local_path(capsys, tmp_path, gemma_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    config = tmp_path / "study.yaml"
    config.write_text(CONFIG.format(fmt="alpaca", path="nobody/no-such-dataset"))
    line = _error_line(*_run(capsys, "prepare", config, "--out", tmp_path / "run"))
    assert "could not load hub dataset nobody/no-such-dataset" in line and "local" in line


def test_train_before_prepare_and_unknown_method(capsys, tmp_path):
    line = _error_line(*_run(capsys, "train", "smoke", "--method", "dora", "--out", tmp_path))
    assert "unknown method 'dora'" in line
    line = _error_line(*_run(capsys, "train", "smoke", "--method", "qlora", "--out", tmp_path))
    assert "run `peftlab prepare` first" in line


def test_score_prints_json(capsys, tmp_path):
    path = tmp_path / "preds.jsonl"
    rows = [{"prediction": "the cat sat on the mat", "reference": "the cat sat on the mat", "source_dataset": "a"},
            {"prediction": "a dog", "reference": "the dog ran off", "source_dataset": "b"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["score", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 2 and set(result["per_source"]) == {"a", "b"}
    assert 0 < result["bleu4"] < 1 and 0 < result["rougeL"] < 1
    path.write_text('{"prediction": "x"}\n')
    line = _error_line(*_run(capsys, "score", path))
    assert "line 1" in line and "reference" in line


def test_train_without_a_logged_loss_still_reports(capsys, tmp_path, gemma_tokenizer):
    assert main(["prepare", "smoke", "--out", str(tmp_path)]) == 0
    code = main(["train", "smoke", "--method", "galore", "--out", str(tmp_path),
                 "--set", "methods.galore.max_steps=2", "--set", "methods.galore.logging_steps=5"])
    assert code == 0
    assert "final loss n/a" in capsys.readouterr().err
