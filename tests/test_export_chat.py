"""Using a run's result: `peftlab export` (a folder plain transformers loads) and `peftlab chat`."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from peftlab.cli import main

SETTINGS = ["--set", "methods.qlora.max_steps=2", "--set", "methods.galore.max_steps=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, gemma_tokenizer):
    """A smoke run with qlora (adapters) and galore (full weights) trained and qlora evaluated on one row."""
    out = tmp_path_factory.mktemp("use") / "run"
    for argv in (["prepare"], ["train", "--method", "qlora"], ["train", "--method", "galore"],
                 ["evaluate", "--model", "qlora", "--limit", "1"]):
        assert main([argv[0], "smoke", "--out", str(out), *SETTINGS, *argv[1:]]) == 0
    return out


def _error_line(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("peftlab: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_export_merges_adapters_and_plain_transformers_generates(run, tmp_path):
    from peft import PeftModel

    from peftlab.models import load_model
    from peftlab.rundir import read_run_config

    qlora, galore = tmp_path / "qlora-export", tmp_path / "galore-export"
    assert main(["export", str(run), "--model", "qlora", "--out", str(qlora)]) == 0
    assert main(["export", str(run), "--model", "galore", "--out", str(galore)]) == 0
    for folder in (qlora, galore):
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names, names
        assert not any(name.endswith((".bin", ".pt")) or name.startswith("adapter") for name in names)
        config = json.loads((folder / "config.json").read_text())
        assert config["dtype"] == "float32" and "quantization_config" not in config  # CPU training dtype
        for path in folder.iterdir():  # no path of the run directory or of a cache
            text = path.read_bytes().decode("utf-8", errors="replace") if path.suffix != ".safetensors" else ""
            for private in (str(run), str(run.resolve()), "/.cache/", str(Path.home())):
                assert private not in text, (path.name, private)
    # A fresh interpreter with nothing of peftlab: plain transformers loads and generates.
    script = textwrap.dedent(f"""
        import json, sys
        from transformers import AutoModelForCausalLM, AutoTokenizer
        out = {{}}
        for folder in {[str(qlora), str(galore)]!r}:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder)
            ids = tokenizer.apply_chat_template([{{"role": "user", "content": "Name a colour."}}],
                                                add_generation_prompt=True, return_tensors="pt", return_dict=True)
            generated = model.generate(**ids, max_new_tokens=4, do_sample=False)
            out[folder] = generated.shape[1] - ids["input_ids"].shape[1]
        print(json.dumps(out))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                                             "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(1 <= count <= 4 for count in counts.values()), counts
    # The merged weights are the base plus the adapters (not the 4-bit weights the adapters trained on).
    config = read_run_config(run)
    ids = torch.tensor([[2, 105, 2364, 107, 9259, 106, 107, 105, 4368, 107]])
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(qlora)).eval()
    reference = PeftModel.from_pretrained(load_model(config.model, device="cpu", dtype=torch.float32),
                                          str(run / "train" / "qlora" / "final")).eval()
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, reference(ids).logits, atol=1e-4)


def test_the_model_card_carries_the_study_numbers(run, tmp_path):
    folder = tmp_path / "card"
    assert main(["export", str(run), "--model", "qlora", "--out", str(folder)]) == 0
    card = (folder / "README.md").read_text()
    evaluated = json.loads((run / "eval" / "qlora" / "metrics.json").read_text())
    trained = json.loads((run / "train" / "qlora" / "metrics.json").read_text())
    assert card.startswith("---\n") and "library_name: transformers" in card
    low, high = evaluated["rougeL_ci"]
    assert f"| qlora | {evaluated['bleu4']:.4f}" in card and f"{evaluated['rougeL']:.4f} [{low:.4f}, {high:.4f}]" in card
    assert f"{trained['train_time_s']:.1f} s" in card and f"{trained['peak_rss_gib']:.2f} GiB" in card
    assert "qlora:\n  kind: qlora" in card and "r: 4" in card and "quant_type: nf4" in card
    assert "galore:" not in card.split("```yaml")[1]  # only this method's settings


def test_export_refuses_what_it_cannot_write(run, tmp_path, capsys):
    assert "not one set of weights" in _error_line(capsys, "export", run, "--model", "ensemble", "--out", tmp_path / "e")
    assert "base model" in _error_line(capsys, "export", run, "--model", "base", "--out", tmp_path / "b")
    assert "unknown method 'dora'" in _error_line(capsys, "export", run, "--model", "dora", "--out", tmp_path / "d")
    assert "not trained yet" in _error_line(capsys, "export", run, "--model", "hybrid", "--out", tmp_path / "h")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    assert "not empty" in _error_line(capsys, "export", run, "--model", "qlora", "--out", occupied)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    assert "no such run directory" in _error_line(capsys, "export", tmp_path / "nowhere", "--model", "qlora",
                                                  "--out", tmp_path / "x")
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".*.tmp-*"))


def test_chat_answers_one_prompt_as_the_evaluator_does(run, capsys):
    row = json.loads((run / "eval" / "qlora" / "predictions.jsonl").read_text().splitlines()[0])
    test_row = next(json.loads(line) for line in (run / "data" / "test.jsonl").read_text().splitlines()
                    if json.loads(line)["id"] == row["id"])
    assert len(test_row["messages"]) == 2, "the first test row is single-turn"
    assert main(["chat", str(run), "--model", "qlora", "--prompt", test_row["messages"][0]["content"]]) == 0
    out = capsys.readouterr().out
    assert out == row["prediction"] + "\n"


def test_chat_reads_a_conversation_from_stdin(run, capsys, monkeypatch):
    from peftlab.chat import ChatSession, run_chat
    from peftlab.rundir import read_run_config

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nAnd again\n"))
    assert main(["chat", str(run), "--model", "galore", "--max-new-tokens", "3"]) == 0  # to EOF
    assert capsys.readouterr().out.count("\n") >= 2
    answers: list[str] = []
    lines = ["Hello there\n", "And again\n", "exit\n", "never read\n"]
    assert run_chat(run, "galore", max_new_tokens=3, lines=lines, write=answers.append) == 2
    assert run_chat(run, "galore", max_new_tokens=3, lines=["Hi\n", "\n", "never read\n"], write=answers.append) == 1
    session = ChatSession(read_run_config(run), run, "galore", max_new_tokens=3)
    assert session.reply("Hello there") == answers[0]  # greedy: the same answer every time
    session.reply("And again")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[1]["content"] == answers[0]
    assert session.prompt_text().count("Hello there") == 1 and session.prompt_text().endswith("model\n")


def test_chat_refuses_the_ensemble_and_bad_settings(run, capsys):
    assert "ensemble mixes" in _error_line(capsys, "chat", run, "--model", "ensemble", "--prompt", "hi")
    assert "--max-new-tokens" in _error_line(capsys, "chat", run, "--model", "qlora", "--prompt", "hi",
                                             "--max-new-tokens", "0")
