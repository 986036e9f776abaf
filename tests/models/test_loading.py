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


def test_provenance_says_whether_the_checkout_had_local_changes(tmp_path, monkeypatch):
    import subprocess

    from peftlab import rundir

    repo = tmp_path / "repo"
    (repo / "src" / "peftlab").mkdir(parents=True)
    (repo / "tracked.txt").write_text("a\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "tracked.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    monkeypatch.setattr(rundir, "__file__", str(repo / "src" / "peftlab" / "rundir.py"))
    assert len(rundir.git_commit()) == 40 and rundir.git_dirty() is False
    (repo / "tracked.txt").write_text("b\n")
    assert rundir.git_dirty() is True


def test_liger_module_patches_are_undone_for_a_plain_model(monkeypatch):
    """liger-kernel replaces Gemma 3's RMSNorm, MLP and RoPE at module level; a model loaded later
    without `liger_kernel` (the evaluator's) must get transformers' own again."""
    import torch
    from transformers.models.gemma3 import modeling_gemma3

    from peftlab.config import load_config
    from peftlab.models import load_model
    from peftlab.models.kernels import LIGER_GEMMA3_NAMES

    originals = {name: getattr(modeling_gemma3, name) for name in LIGER_GEMMA3_NAMES}
    monkeypatch.setattr(modeling_gemma3, "_peftlab_unpatched", originals, raising=False)
    for name in LIGER_GEMMA3_NAMES:  # what apply_liger_kernel_to_gemma3_text leaves behind
        monkeypatch.setattr(modeling_gemma3, name, object())
    model = load_model(load_config("smoke").model, device="cpu", dtype=torch.float32)
    assert all(getattr(modeling_gemma3, name) is originals[name] for name in LIGER_GEMMA3_NAMES)
    assert type(model.model.norm) is originals["Gemma3RMSNorm"]
