"""Training tests' shared fixture: the smoke study's data, prepared once per test module."""

from __future__ import annotations

import pytest

from peftlab.config import load_config
from peftlab.data.prepare import prepare_data


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, gemma_tokenizer):
    """(the smoke config, a run directory holding its prepared data)."""
    config = load_config("smoke")
    run_dir = tmp_path_factory.mktemp("smoke")
    prepare_data(config, run_dir, gemma_tokenizer)
    return config, run_dir
