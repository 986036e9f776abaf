"""Resume after a kill: incomplete or corrupt checkpoints are skipped with one line each, and the
metrics cover the whole run (every segment's time and peaks, checkpoint writes timed apart)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from peftlab.train.checkpoints import checkpoint_problem, last_checkpoint, prepare_output
from peftlab.train.runner import train_method


def _fake_checkpoint(root: Path, step: int) -> Path:
    folder = root / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(64, 64)}, str(folder / "adapter_model.safetensors"))
    torch.save({"state": {}}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def test_checkpoint_problem_names_the_incomplete_or_corrupt_file(tmp_path):
    folder = _fake_checkpoint(tmp_path, 5)
    assert checkpoint_problem(folder) is None
    _truncate(folder / "adapter_model.safetensors", 200)
    assert checkpoint_problem(folder).startswith("adapter_model.safetensors is truncated")
    _truncate(folder / "adapter_model.safetensors", 4)
    assert checkpoint_problem(folder) == "adapter_model.safetensors is truncated (4 bytes)"
    folder = _fake_checkpoint(tmp_path, 6)
    _truncate(folder / "optimizer.pt", 100)
    assert checkpoint_problem(folder).startswith("optimizer.pt is truncated or corrupt")
    folder = _fake_checkpoint(tmp_path, 7)
    (folder / "trainer_state.json").write_text('{"global_st')
    assert checkpoint_problem(folder) == "trainer_state.json is not complete JSON"
    (folder / "trainer_state.json").unlink()
    assert "no trainer_state.json" in checkpoint_problem(folder)
    assert last_checkpoint(tmp_path) is None  # 5, 6 and 7 are all broken


def test_resume_with_no_complete_checkpoint_starts_again(tmp_path, capsys):
    out = tmp_path / "train" / "lora"
    folder = _fake_checkpoint(out, 1)
    (folder / "trainer_state.json").unlink()  # killed during the first save
    (out / "loss.csv").write_text("step\n")
    assert prepare_output(out, resume=True) is None
    assert out.is_dir() and not any(out.iterdir())  # a fresh start: nothing of the attempt is kept
    err = capsys.readouterr().err
    assert f"{folder} is incomplete (no trainer_state.json" in err and "resuming from step 0" in err


def test_resume_after_a_kill_mid_save_uses_the_last_complete_checkpoint(smoke, tmp_path, capsys, monkeypatch):
    from peftlab.train.trainer import TargetTokenTrainer

    config, run_dir = smoke
    method = replace(config.method("qlora"), kind="lora", max_steps=3, save_steps=1)
    out = tmp_path / "lora"
    # Each checkpoint write takes at least SAVE_S: it must show in checkpoint_save_s, not train_time_s.
    save_s = 0.3
    real_rng_save = TargetTokenTrainer._save_rng_state
    monkeypatch.setattr(TargetTokenTrainer, "_save_rng_state",
                        lambda self, folder: (time.sleep(save_s), real_rng_save(self, folder))[1])
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):  # segment 1: steps 1-2, checkpoints 1 and 2 kept
        train_method(config, run_dir, "lora", method=method, out=out, stop_after=2)
    first_wall = time.perf_counter() - started
    checkpoints = out / "checkpoints"
    # A kill during the save of step 3 (no trainer_state.json yet), and a corrupt file in checkpoint-2.
    shutil.copytree(checkpoints / "checkpoint-2", checkpoints / "checkpoint-3")
    (checkpoints / "checkpoint-3" / "trainer_state.json").unlink()
    _truncate(checkpoints / "checkpoint-3" / "optimizer.pt", 1000)
    _truncate(checkpoints / "checkpoint-2" / "adapter_model.safetensors", 300)
    capsys.readouterr()

    started = time.perf_counter()
    metrics = train_method(config, run_dir, "lora", method=method, out=out, resume=True)
    second_wall = time.perf_counter() - started
    err = capsys.readouterr().err
    assert f"{checkpoints / 'checkpoint-3'} is incomplete (no trainer_state.json" in err
    assert f"{checkpoints / 'checkpoint-2'} is incomplete (adapter_model.safetensors is truncated" in err
    assert "resuming from checkpoint-1" in err and "Traceback" not in err
    assert metrics["resumed_from"].endswith("checkpoint-1") and metrics["optimizer_steps"] == 3
    assert [p["step"] for p in metrics["loss_curve"]] == [1, 2, 3]

    # The whole run's accounting: two segments, times summed, peaks the maximum, saves apart.
    assert metrics["resumed"] is True and metrics["segments"] == 2
    records = metrics["segment_records"]
    assert [r["steps"] for r in records] == [[0, 1], [1, 3]]
    assert metrics["train_time_s"] == pytest.approx(sum(r["train_time_s"] for r in records))
    assert metrics["checkpoint_save_s"] == pytest.approx(sum(r["checkpoint_save_s"] for r in records))
    assert metrics["peak_rss_gib"] == max(r["peak_rss_gib"] for r in records)
    # Segment 1's record was written during checkpoint-1's save, segment 2 wrote checkpoints 2 and 3.
    assert records[0]["checkpoint_save_s"] >= save_s and records[1]["checkpoint_save_s"] >= 2 * save_s
    assert records[0]["train_time_s"] + records[0]["checkpoint_save_s"] < first_wall
    assert records[1]["train_time_s"] + records[1]["checkpoint_save_s"] < second_wall
    assert metrics["tokens_per_s"] == pytest.approx(metrics["tokens_trained"] / metrics["train_time_s"])
    assert json.loads((out / "metrics.json").read_text())["segments"] == 2


def test_results_and_report_flag_a_resumed_run(tmp_path):
    from peftlab.report import build_report
    from peftlab.results import TRAINING_KEYS

    assert {"resumed", "segments", "checkpoint_save_s"} <= set(TRAINING_KEYS)
    spec = importlib.util.spec_from_file_location("report_fixture", Path(__file__).parents[1] / "report" / "test_report.py")
    fixture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixture)
    run = fixture.make_run(tmp_path)
    results = json.loads((run / "results.json").read_text())
    results["training"]["qlora"].update(resumed=True, segments=2)
    (run / "results.json").write_text(json.dumps(results))
    metrics = json.loads((run / "train" / "qlora" / "metrics.json").read_text())
    (run / "train" / "qlora" / "metrics.json").write_text(json.dumps({**metrics, "resumed": True, "segments": 2}))
    build_report(run)
    markdown = (run / "report.md").read_text(encoding="utf-8")
    resumed_rows = [line for line in markdown.splitlines() if "(resumed)" in line]
    assert len(resumed_rows) == 1 and "QLoRA" in resumed_rows[0]
