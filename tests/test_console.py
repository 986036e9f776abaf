"""The console (progress lines in a log, the libraries kept quiet, the study's summary) and the disk
(only the Trainer's checkpoints are removed)."""

from __future__ import annotations

import warnings

import pytest

from peftlab.console import StageProgress, disk_usage, human_bytes, quiet_libraries, results_table
from peftlab.train.checkpoints import remove_checkpoints


def test_progress_in_a_log_prints_notes_or_every_tenth(capsys):
    with StageProgress(6, "train qlora", "step") as bar:
        for step in range(1, 7):
            bar.advance()
            if step % 2 == 0:
                bar.note(f"loss {10 - step:.4f}")
    lines = capsys.readouterr().err.splitlines()
    # Steps before the first note print alone; after it, notes are the progress lines (every logging_steps).
    assert lines == ["  train qlora: 1/6 steps", "  train qlora: 2/6 steps", "  train qlora: 2/6 steps  loss 8.0000",
                     "  train qlora: 4/6 steps  loss 6.0000", "  train qlora: 6/6 steps  loss 4.0000"]
    with StageProgress(100, "eval base", "row") as bar:
        for _ in range(10):
            bar.advance(10)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"  eval base: {n}/100 rows" for n in range(10, 100, 10)]
    with StageProgress(5, "quiet", "row", enabled=False) as bar:
        bar.advance(5)
        bar.note("x")
    assert capsys.readouterr().err == ""


def test_quiet_libraries_turns_off_load_bars_and_library_deprecations_then_restores():
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_libraries():
            assert not hf_logging.is_progress_bar_enabled()
            assert not hub_utils.are_progress_bars_disabled()  # downloads keep their bar
            warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1)
            warnings.warn("`torch.jit.script_method` is deprecated. Please switch", DeprecationWarning, stacklevel=1)
            warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
    assert hf_logging.is_progress_bar_enabled()


def test_results_table_shows_every_model_with_time_and_memory():
    results = {
        "models": {"base": {"bleu4": 0.1, "rougeL": 0.2},
                   "qlora": {"bleu4": 0.3, "rougeL": 0.4, "rougeL_sd": 0.01, "bleu4_sd": 0.02}},
        "training": {"qlora": {"train_time_s": 10.0, "merge_time_s": None, "peak_gpu_alloc_gib": 1.5}},
    }
    lines = results_table(results).splitlines()
    assert lines[0].split() == ["model", "BLEU-4", "ROUGE-L", "train", "time", "peak", "memory"]
    assert lines[2].split()[:3] == ["base", "0.1000", "0.2000"] and lines[2].rstrip().endswith("-")
    assert "0.3000 ± 0.0200" in lines[3] and "10.0 s" in lines[3] and "1.50 GiB GPU" in lines[3]
    assert len({len(line) for line in lines}) == 1  # aligned columns


def test_disk_usage_and_sizes(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 2048)
    assert disk_usage(tmp_path) == 3048
    assert human_bytes(3048) == "3.0 KiB" and human_bytes(512) == "512 B" and human_bytes(3 * 2**30) == "3.0 GiB"


def test_only_the_trainers_checkpoints_are_removed(tmp_path):
    folder = tmp_path / "checkpoints"
    for name in ("checkpoint-2", "checkpoint-4"):
        (folder / name).mkdir(parents=True)
        (folder / name / "trainer_state.json").write_text("{}")
        (folder / name / "model.safetensors").write_bytes(b"0" * 10)
    (folder / "checkpoint-mine").mkdir()
    (folder / "checkpoint-mine" / "trainer_state.json").write_text("{}")
    (folder / "checkpoint-6").mkdir()  # no trainer_state.json: not (or not yet) the Trainer's
    (folder / "runs").mkdir()  # e.g. tensorboard logs
    removed = remove_checkpoints(tmp_path)
    assert sorted(p.name for p in removed) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-6", "checkpoint-mine", "runs"]
    for name in ("checkpoint-6", "checkpoint-mine", "runs"):
        (folder / name / "trainer_state.json").unlink(missing_ok=True)
        (folder / name).rmdir()
    assert remove_checkpoints(tmp_path) == [] and not folder.exists()  # an empty checkpoints/ goes too
    assert remove_checkpoints(tmp_path / "never") == []


@pytest.mark.parametrize(("value", "expected"), [("tensorboard", "tensorboard"), (["wandb"], ["wandb"]),
                                                 ([], [])])
def test_report_to_passes_through_to_the_trainer(value, expected, tmp_path):
    from types import SimpleNamespace

    import torch

    from peftlab.config import load_config
    from peftlab.train.trainer import training_arguments

    config = load_config("smoke", [f"train.report_to={value!r}" if isinstance(value, str) else
                                   f"train.report_to={value}"])
    assert config.method("qlora").report_to == expected
    recipe = SimpleNamespace(trainer_optim_args=None, clips_gradients=False, trainer_optim="adamw_torch")
    args = training_arguments(config.method("qlora"), tmp_path, "cpu", torch.float32, recipe)
    assert args.report_to == ([expected] if isinstance(expected, str) else expected)
    assert args.disable_tqdm  # our bar instead of the Trainer's


def test_report_to_names_a_known_integration_and_an_installed_one():
    from peftlab.config import load_config
    from peftlab.errors import UserError
    from peftlab.train.launch import check_reporting

    with pytest.raises(UserError, match=r"unknown integration 'tensorbord'.*did you mean 'tensorboard'"):
        load_config("smoke", ["train.report_to=tensorbord"])
    from transformers.integrations import get_available_reporting_integrations

    missing = next(n for n in ("tensorboard", "wandb", "mlflow", "comet_ml")
                   if n not in get_available_reporting_integrations())
    with pytest.raises(UserError, match=f"{missing} is not available"):
        check_reporting(load_config("smoke", [f"train.report_to={missing}"]), "qlora")
    check_reporting(load_config("smoke"), "qlora")  # none by default: nothing to check


def test_progress_on_a_terminal_is_one_bar_with_the_note(monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with StageProgress(4, "train galore", "step") as bar:
        for _ in range(4):
            bar.advance()
        bar.note("loss 1.2345")
    text = terminal.getvalue()
    assert "\r" in text and "train galore" in text and "4/4" in text and "loss 1.2345" in text
    assert "\n  train galore" not in text  # redrawn in place, not printed as log lines
