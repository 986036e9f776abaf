"""The config reference (docs/config.md) names every key a study YAML can set."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from peftlab.config import DataConfig, EvaluateConfig, MethodConfig, ModelConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


@pytest.mark.parametrize("section", [MethodConfig, ModelConfig, DataConfig, EvaluateConfig])
def test_every_config_key_is_documented(section):
    text = DOC.read_text(encoding="utf-8")
    keys = [f.name for f in dataclasses.fields(section) if not f.metadata.get("internal")]
    assert [key for key in keys if f"`{key}`" not in text] == []
