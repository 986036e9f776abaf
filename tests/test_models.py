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
