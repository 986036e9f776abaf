"""Data parallel on CPU: `peftlab train --gpus 2` runs two gloo processes under torchrun; with the
same effective batch and data order it gives the single-process loss curve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.config import load_config
from peftlab.data.prepare import prepare_data

SRC = Path(__file__).resolve().parents[2] / "src"


def _train(run_dir: Path, out_name: str, gpus: int, batch: int, *flags: str) -> dict:
    sets = ["--set", "methods.lora.kind=lora", "--set", "methods.lora.max_steps=3", "--set", "methods.lora.grad_accum=1",
            "--set", f"methods.lora.batch_size={batch}", "--set", "methods.lora.sampling=sequential",
            "--set", "methods.lora.lr=0.01", "--set", "methods.lora.lora.dropout=0.0"]
    out = run_dir / out_name
    if not (out / "data").exists():
        out.mkdir(parents=True, exist_ok=True)
        (out / "data").symlink_to(run_dir / "data")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "peftlab", "train", "smoke", "--method", "lora", "--out", str(out),
                           "--gpus", str(gpus), *sets, *flags], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "train" / "lora" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, gemma_tokenizer):
    run_dir = tmp_path_factory.mktemp("ddp")
    prepare_data(load_config("smoke"), run_dir, gemma_tokenizer)
    return run_dir


def test_two_processes_match_one_with_the_same_effective_batch(prepared):
    single = _train(prepared, "one", gpus=1, batch=8)
    double = _train(prepared, "two", gpus=2, batch=4)
    assert single["world_size"] == 1 and double["world_size"] == 2
    assert [r["rank"] for r in double["per_rank"]] == [0, 1]
    assert double["tokens_trained"] == sum(r["tokens_trained"] for r in double["per_rank"])
    assert double["tokens_trained"] == single["tokens_trained"]
    ours = [p["loss"] for p in double["loss_curve"]]
    expected = [p["loss"] for p in single["loss_curve"]]
    assert len(ours) == 3 and ours == pytest.approx(expected, rel=1e-4)
    assert (prepared / "two" / "train" / "lora" / "final" / "adapter_model.safetensors").exists()
    # Token-budget slices per process (different slice counts per rank) keep the same optimisation.
    sliced = _train(prepared, "two-sliced", 2, 4, "--set", "methods.lora.micro_batch_tokens=64")
    assert [p["loss"] for p in sliced["loss_curve"]] == pytest.approx(expected, rel=1e-4)
    assert sliced["tokens_trained"] == single["tokens_trained"]


def test_fsdp_is_refused_where_it_cannot_run(prepared):
    """accelerate engages FSDP only for GPU process groups: on CPU --fsdp must fail, not run DDP."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    for gpus, message in (("2", "needs CUDA GPUs"), ("1", "--gpus 2 or more")):
        done = subprocess.run([sys.executable, "-m", "peftlab", "train", "smoke", "--method", "lora", "--out",
                               str(prepared / "fsdp"), "--gpus", gpus, "--fsdp", "--set", "methods.lora.kind=lora"],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode != 0 and message in done.stderr
        assert not (prepared / "fsdp" / "train" / "lora" / "metrics.json").exists()


def test_fsdp_settings(smoke_config=None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftlab.config import load_config
    from peftlab.methods import Recipe
    from peftlab.models import read_model_config
    from peftlab.train.runner import training_arguments

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**read_model_config("builtin:tiny-gemma3")))
    method = load_config("smoke").method("qlora")
    args = training_arguments(method, Path("/tmp/peftlab-fsdp-args"), "cpu", torch.float32, Recipe(model=model),
                              fsdp=True)
    assert args.fsdp_config["transformer_layer_cls_to_wrap"] == ["Gemma3DecoderLayer"]
    # Checkpointing stays the Trainer's (FSDP's own would rename modules and re-draw dropout masks).
    assert args.fsdp_config["activation_checkpointing"] is False
    assert args.gradient_checkpointing == method.gradient_checkpointing


def test_galore_refuses_fsdp(prepared):
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "peftlab", "train", "smoke", "--method", "galore", "--out",
                           str(prepared), "--gpus", "2", "--fsdp"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "drop --fsdp" in done.stderr


def test_sharded_evaluation_gathers_predictions_in_order(prepared):
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    outs = {}
    for gpus in (1, 2):
        out = prepared / f"eval{gpus}"
        out.mkdir(exist_ok=True)
        if not (out / "data").exists():
            (out / "data").symlink_to(prepared / "data")
        done = subprocess.run([sys.executable, "-m", "peftlab", "evaluate", "smoke", "--model", "base", "--out",
                               str(out), "--gpus", str(gpus)], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        outs[gpus] = (out / "eval" / "base" / "predictions.jsonl").read_text()
        metrics = json.loads((out / "eval" / "base" / "metrics.json").read_text())
        assert metrics["generation"]["processes"] == gpus and metrics["n"] == 12
    assert outs[1] == outs[2]


def test_hybrid_stages_run_under_two_processes(prepared):
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    out = prepared / "hybrid2"
    out.mkdir(exist_ok=True)
    if not (out / "data").exists():
        (out / "data").symlink_to(prepared / "data")
    done = subprocess.run([sys.executable, "-m", "peftlab", "train", "smoke", "--method", "hybrid", "--out", str(out),
                           "--gpus", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "train" / "hybrid" / "metrics.json").read_text())
    trained = [s for s in metrics["stages"] if s["method"] != "merge"]
    assert [(s["method"], s["world_size"]) for s in trained] == [("qlora", 2), ("galore", 2)]
    assert (out / "train" / "hybrid" / "final" / "model.safetensors").exists()


def test_fsdp_refuses_token_budget_slices():
    from dataclasses import replace

    from peftlab.errors import UserError
    from peftlab.train.runner import check_fsdp

    method = replace(load_config("smoke").method("qlora"), kind="lora", micro_batch_tokens=64)
    with pytest.raises(UserError, match="micro_batch_tokens"):
        check_fsdp("lora", method, world=2)
