"""Safety of the run directory (issue 21): nothing of the user's is deleted, one writer at a time,
stale inputs are refused, bad numbers and paths are one line, leftovers of killed runs go away, and
a first run trains as a later one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.cli import main
from peftlab.runguard import LOCK, MARK, claim_run_dir

SRC = Path(__file__).resolve().parents[1] / "src"


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _error_line(code: int, err: str) -> str:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("peftlab: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, gemma_tokenizer) -> Path:
    """`prepare smoke` once; tests work on copies."""
    out = tmp_path_factory.mktemp("prepared") / "run"
    assert main(["prepare", "smoke", "--out", str(out)]) == 0
    return out


@pytest.fixture()
def run(prepared, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(prepared, copy)
    (copy / LOCK).unlink(missing_ok=True)
    return copy


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ------------------------------------------------------------------------------------------- 1. mark


def test_a_folder_peftlab_did_not_make_is_refused_and_kept(capsys, tmp_path):
    out = tmp_path / "mine"
    for name in ("data/notes.txt", "train/qlora/weights.txt", "eval/base/x.txt", "plots/figure.png", "readme.md"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("the user's")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for argv in (["prepare", "smoke", "--out", out], ["study", "smoke", "--out", out], ["report", out]):
        line = _error_line(*_run(capsys, *argv))
        assert "not a peftlab run directory" in line and str(out) in line
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert not (out / MARK).exists()


def test_new_empty_and_older_run_folders_are_ours(tmp_path):
    with claim_run_dir(tmp_path / "new"):
        pass
    (tmp_path / "empty").mkdir()
    with claim_run_dir(tmp_path / "empty"):
        pass
    older = tmp_path / "older"
    older.mkdir()
    (older / "config.resolved.yaml").write_text("name: x\n")
    (older / "data").mkdir()
    with claim_run_dir(older):
        pass
    for name in ("new", "empty", "older"):
        assert (tmp_path / name / MARK).is_file()
        assert not (tmp_path / name / LOCK).exists()  # released
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "env.json").write_text('{"NODE_ENV": "dev"}')  # an env.json, not ours
    with pytest.raises(Exception, match="not a peftlab run directory"), claim_run_dir(stranger):
        pass


# ------------------------------------------------------------------------------------------- 2. name


@pytest.mark.parametrize("name", ["../../escape", "{tmp}/escape", "a/b", "..", ".hidden"])
def test_a_study_name_must_be_a_plain_folder_name(capsys, tmp_path, monkeypatch, name):
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    line = _error_line(*_run(capsys, "prepare", "smoke", "--set", f"name={name.format(tmp=tmp_path)}"))
    assert "name:" in line and "plain folder name" in line
    assert not (tmp_path / "escape").exists() and not (workdir / "runs").exists()


# ------------------------------------------------------------------------------------------- 3. lock


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    code = ("import sys, time; from pathlib import Path; from peftlab.runguard import claim_run_dir;"
            " claim = claim_run_dir(Path(sys.argv[1])); claim.__enter__(); print('held', flush=True);"
            " time.sleep(120)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_one_writer_per_run_directory_and_a_dead_holder_is_taken_over(capsys, tmp_path):
    out = tmp_path / "run"
    holder = _hold_lock(out)
    try:
        for argv in (["report", out], ["prepare", "smoke", "--out", out], ["study", "smoke", "--out", out]):
            line = _error_line(*_run(capsys, *argv))
            assert "another peftlab is writing" in line and f"pid {holder.pid}" in line
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK).exists()  # a killed holder leaves its file behind
    line = _error_line(*_run(capsys, "report", out))  # taken over; the report itself has nothing to show
    assert "another peftlab" not in line and "results.json" in line


def test_without_flock_a_dead_pid_on_this_host_is_taken_over(tmp_path, monkeypatch):
    import socket

    from peftlab import runguard

    monkeypatch.setattr(runguard, "_flock", lambda fd: None)
    out = tmp_path / "run"
    out.mkdir()
    (out / MARK).write_text("")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "command": "x"}))
        with pytest.raises(Exception, match=f"pid {sleeper.pid}"), claim_run_dir(out):
            pass
    finally:
        sleeper.kill()
        sleeper.wait()
    (out / LOCK).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "command": "x"}))
    with claim_run_dir(out):
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()


def test_ranks_after_the_first_neither_check_nor_lock(tmp_path, monkeypatch):
    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)
    (out / "data" / "notes.txt").write_text("x")
    monkeypatch.setenv("RANK", "1")
    with claim_run_dir(out):
        assert not (out / LOCK).exists() and not (out / MARK).exists()


def test_a_missing_hybrid_final_is_a_clear_error_not_a_repo_id_message(capsys, run):
    train = run / "train" / "hybrid"
    train.mkdir(parents=True)
    (train / "metrics.json").write_text(json.dumps({"saves": "full", "kind": "hybrid"}))
    (train / "final").mkdir()  # left empty by a crash
    line = _error_line(*_run(capsys, "evaluate", "smoke", "--model", "hybrid", "--out", run, "--limit", "1"))
    assert "train/hybrid/final: missing or incomplete" in line and "Repo id" not in line
    shutil.rmtree(train / "final")
    line = _error_line(*_run(capsys, "evaluate", "smoke", "--model", "hybrid", "--out", run, "--limit", "1"))
    assert "missing or incomplete" in line


def test_a_trained_model_is_finished_only_with_its_config_and_weights(tmp_path):
    from peftlab.rundir import final_complete

    final = tmp_path / "final"
    assert not final_complete(final)
    final.mkdir()
    (final / "config.json").write_text("{}")
    assert not final_complete(final)  # what `study` re-runs instead of skipping
    (final / "model.safetensors").write_bytes(b"")
    assert final_complete(final)
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    (adapters / "adapter_model.safetensors").write_bytes(b"")
    assert not final_complete(adapters)
    (adapters / "adapter_config.json").write_text("{}")
    assert final_complete(adapters)


def test_replacing_a_stage_folder_sets_the_old_one_aside_first(tmp_path, monkeypatch):
    from peftlab.rundir import atomic_dir

    final = tmp_path / "final"
    final.mkdir()
    (final / "old.txt").write_text("old")
    real_replace = os.replace
    calls = []

    def killed_after_setting_aside(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        real_replace(src, dst)
        if len(calls) == 1:
            raise KeyboardInterrupt  # a kill between the two renames

    monkeypatch.setattr(os, "replace", killed_after_setting_aside)
    with pytest.raises(KeyboardInterrupt), atomic_dir(final) as temp:
        (temp / "new.txt").write_text("new")
    assert calls == [("final", f".final.old-{os.getpid()}")]
    assert (tmp_path / f".final.old-{os.getpid()}" / "old.txt").exists()  # whole, for runguard to remove
    monkeypatch.setattr(os, "replace", real_replace)
    with atomic_dir(final) as temp:
        (temp / "new.txt").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new.txt"]


# ------------------------------------------------------------------------------------------- 5. stale inputs


def test_train_refuses_data_prepared_under_other_settings(capsys, run):
    resolved = (run / "config.resolved.yaml").read_text()
    line = _error_line(*_run(capsys, "train", "smoke", "--method", "galore", "--out", run,
                             "--set", "data.seed=7", "--set", "methods.galore.max_steps=1"))
    assert f"train galore: {run / 'data'} was made under a different config (data differs)" in line
    assert "another --out" in line and "delete" in line
    assert (run / "config.resolved.yaml").read_text() == resolved
    assert not (run / "train").exists()


def test_study_refuses_prepared_data_it_did_not_describe(capsys, run):
    line = _error_line(*_run(capsys, "study", "smoke", "--out", run, "--set", "prepare.overlength=drop"))
    assert f"study: {run / 'data'} was made under a different config (prepare differs)" in line
    line = _error_line(*_run(capsys, "study", "smoke", "--out", run, "--set", "model.tokenizer=builtin:gemma-3-270m",
                             "--set", "data.max_seq_length=128"))
    assert "(data differs)" in line


def test_each_stage_depends_on_its_own_sections():
    from peftlab.config import load_config
    from peftlab.fingerprints import evaluate_sections, prepare_sections, train_sections

    def changed(*overrides):
        return load_config("smoke", list(overrides))

    base = load_config("smoke")
    assert prepare_sections(changed("methods.qlora.lr=0.5", "evaluate.max_new_tokens=3")) == prepare_sections(base)
    assert train_sections(changed("methods.galore.lr=0.5"), "qlora") == train_sections(base, "qlora")
    assert train_sections(changed("methods.qlora.lr=0.5"), "qlora") != train_sections(base, "qlora")
    assert train_sections(changed("methods.qlora.lr=0.5"), "hybrid") != train_sections(base, "hybrid")  # a stage
    assert train_sections(changed("model.attn_implementation=eager"), "qlora") != train_sections(base, "qlora")
    assert evaluate_sections(changed("methods.qlora.lr=0.5"), "base", None) == evaluate_sections(base, "base", None)
    assert evaluate_sections(changed("methods.qlora.lr=0.5"), "ensemble", None) != evaluate_sections(base, "ensemble", None)
    assert evaluate_sections(changed("evaluate.models=[base]"), "base", None) == evaluate_sections(base, "base", None)
    assert evaluate_sections(changed("evaluate.max_new_tokens=3"), "base", None) != evaluate_sections(base, "base", None)
    assert evaluate_sections(base, "base", 5) != evaluate_sections(base, "base", None)  # fewer rows


# ------------------------------------------------------------------------------------------- 6. numbers


@pytest.mark.parametrize(("override", "key"), [
    ("methods.qlora.lr=.nan", "methods.qlora.lr"),
    ("methods.galore.lr=nan", "methods.galore.lr"),
    ("train.epochs=.inf", "methods.qlora.epochs"),
    ("methods.galore.galore.scale=-.inf", "methods.galore.galore.scale"),
    ("evaluate.ensemble.alphas=[0.0, .nan]", "evaluate.ensemble.alphas.1"),
])
def test_nan_and_infinite_numbers_are_refused(capsys, tmp_path, override, key):
    line = _error_line(*_run(capsys, "prepare", "smoke", "--set", override, "--out", tmp_path / "run"))
    assert f"{key}: expected a finite number" in line
    assert not (tmp_path / "run").exists()


def test_nan_in_a_yaml_file_is_refused(capsys, tmp_path):
    from peftlab.config import BUILTIN_CONFIG_DIR

    config = tmp_path / "study.yaml"
    config.write_text((BUILTIN_CONFIG_DIR / "smoke.yaml").read_text().replace("lr: 1.0e-3", "lr: .NaN"))
    line = _error_line(*_run(capsys, "study", config, "--out", tmp_path / "run"))
    assert "methods.galore.lr: expected a finite number" in line


# ------------------------------------------------------------------------------------------- 7. one line


def test_an_out_that_names_a_file(capsys, tmp_path):
    out = tmp_path / "file.txt"
    out.write_text("mine")
    line = _error_line(*_run(capsys, "prepare", "smoke", "--out", out))
    assert f"{out}: is a file" in line
    assert out.read_text() == "mine"


def test_a_read_only_out(capsys, tmp_path):
    out = Path("/sys/peftlab-run")  # sysfs: no folder can be made there, not even by root
    if not Path("/sys/kernel").is_dir():
        pytest.skip("needs Linux sysfs at /sys")
    line = _error_line(*_run(capsys, "prepare", "smoke", "--out", out))
    assert f"{out}: cannot write there" in line


def test_a_file_that_cannot_be_written_is_one_line(capsys, run, monkeypatch):
    """Root writes through permissions, so a read-only file is simulated where provenance is written."""
    from peftlab import rundir

    def read_only(path, text):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(rundir, "write_text", read_only)
    line = _error_line(*_run(capsys, "train", "smoke", "--method", "galore", "--out", run))
    assert line == f"peftlab: error: {run / 'config.resolved.yaml'}: Permission denied"


def test_an_env_json_that_is_not_json(capsys, run):
    (run / "env.json").write_text("{not json")
    line = _error_line(*_run(capsys, "train", "smoke", "--method", "galore", "--out", run))
    assert f"{run / 'env.json'}: not valid JSON" in line and "delete it" in line


def test_a_local_model_with_custom_code_needs_trust_remote_code(capsys, run, tmp_path):
    model = tmp_path / "custom-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "peftlab-custom", "architectures": ["CustomForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}))
    for name in ("configuration_custom.py", "modeling_custom.py"):
        (model / name).write_text("raise SystemExit('custom code ran')\n")
    line = _error_line(*_run(capsys, "evaluate", "smoke", "--model", "base", "--out", run, "--limit", "1",
                             "--set", f"model.name_or_path={model}", "--set", "model.config=null",
                             "--set", "model.tokenizer=builtin:gemma-3-270m"))
    assert f"model {model}" in line and "trust_remote_code is false" in line


# ------------------------------------------------------------------------------------------- 9. first run


def test_a_cold_model_cache_trains_as_a_warm_one(capsys, prepared, tmp_path, monkeypatch):
    from peftlab.models.builtin import peftlab_cache_dir

    cache = tmp_path / "cache"
    cache.mkdir()
    real = peftlab_cache_dir() / "gemma-3-270m"
    if real.is_dir():
        (cache / "gemma-3-270m").symlink_to(real)  # the tokenizer; the random model is built cold
    monkeypatch.setenv("PEFTLAB_CACHE", str(cache))
    curves = []
    for attempt in ("cold", "warm"):
        out = tmp_path / attempt
        shutil.copytree(prepared, out)
        assert main(["train", "smoke", "--method", "qlora", "--out", str(out), "--set", "methods.qlora.kind=lora",
                     "--set", "methods.qlora.max_steps=2", "--set", "methods.qlora.batch_size=2",
                     "--set", "methods.qlora.grad_accum=1", "--set", "methods.qlora.lr=0.05"]) == 0
        metrics = json.loads((out / "train" / "qlora" / "metrics.json").read_text())
        curves.append([point["loss"] for point in metrics["loss_curve"]])
        assert (cache / "random").is_dir()
    assert len(curves[0]) == 2 and curves[0] == curves[1]


def test_building_a_random_model_leaves_the_global_rng_alone(tmp_path, monkeypatch):
    import torch

    from peftlab.models.loading import random_model_dir

    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    random_model_dir("builtin:tiny-gemma3", 0)
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------------------------------- 10. leftovers


def test_leftovers_of_killed_runs_are_removed_when_a_writing_command_starts(capsys, tmp_path):
    out = tmp_path / "run"
    dead = _dead_pid()
    leftover_dirs = [f".plots.tmp-{dead}", f"eval/.base.tmp-{dead}", f"train/qlora/.final.old-{dead}"]
    leftover_files = [f"data/.stats.json.tmp-{dead}", f".report.md.tmp-{dead}"]
    kept = [f".plots.tmp-{os.getpid()}",  # a live process's
            ".plots.tmp-abc", "notes.tmp-12", "data/train.jsonl"]  # not peftlab's temporary names
    for name in [*leftover_dirs, *kept]:
        (out / name).mkdir(parents=True)
        (out / name / "quality.png").write_text("x")
    for name in leftover_files:
        (out / name).write_text("x")
    (out / MARK).write_text("")
    _error_line(*_run(capsys, "report", out))  # no results.json: the report fails after the cleaning
    assert [name for name in [*leftover_dirs, *leftover_files] if (out / name).exists()] == []
    assert [name for name in kept if not (out / name).exists()] == []
