"""Model loading switches that only apply on a GPU refuse clearly elsewhere."""

from __future__ import annotations

import pytest

from peftlab.config import ModelConfig
from peftlab.errors import UserError
from peftlab.models import load_model


def test_liger_kernel_on_cpu_is_a_clear_error():
    with pytest.raises(UserError, match="liger_kernel needs a CUDA GPU"):
        load_model(ModelConfig(name_or_path="builtin:gemma-3-270m", config="builtin:tiny-gemma3", liger_kernel=True),
                   device="cpu", dtype=None)
