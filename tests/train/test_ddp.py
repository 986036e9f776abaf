"""Data parallel on CPU: `peftlab train --gpus 2` runs two gloo processes under torchrun; with the
same effective batch and data order it gives the single-process loss curve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftlab.config import load_config
from peftlab.data.prepare import prepare_data

SRC = Path(__file__).resolve().parents[2] / "src"


def _train(run_dir: Path, out_name: str, gpus: int, batch: int, *flags: str, launch: tuple[str, ...] = ()) -> dict:
    """Train the `lora` method (3 steps, in data order) with `batch` rows per process; `launch` replaces
    the `peftlab` entry point (a test helper under torchrun)."""
    sets = ["--set", "methods.lora.kind=lora", "--set", "methods.lora.max_steps=3", "--set", "methods.lora.grad_accum=1",
            "--set", f"methods.lora.batch_size={batch}", "--set", "methods.lora.sampling=sequential",
            "--set", "methods.lora.lr=0.01", "--set", "methods.lora.lora.dropout=0.0"]
    out = run_dir / out_name
    if not (out / "data").exists():
        out.mkdir(parents=True, exist_ok=True)
        (out / "data").symlink_to(run_dir / "data")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    entry = list(launch) or ["-m", "peftlab"]
    done = subprocess.run([sys.executable, *entry, "train", "smoke", "--method", "lora", "--out", str(out),
                           "--gpus", str(gpus), *sets, *flags], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "train" / "lora" / "metrics.json").read_text())


def _fsdp_on_cpu(run_dir: Path, out_name: str, batch: int, *flags: str, helper: tuple[str, ...] = ()) -> dict:
    """`--fsdp` on two gloo processes, accelerate's FSDP2 path forced on CPU by tests/train/fsdp_on_cpu.py."""
    launch = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              str(Path(__file__).with_name("fsdp_on_cpu.py")), *helper)
    return _train(run_dir, out_name, 1, batch, "--fsdp", *flags, launch=launch)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, gemma_tokenizer):
    run_dir = tmp_path_factory.mktemp("ddp")
    prepare_data(load_config("smoke"), run_dir, gemma_tokenizer)
    return run_dir


@pytest.fixture(scope="module")
def one_process(prepared):
    # Padded batches in one process: the two-process runs below are padding-free (the default), so the
    # comparison also shows padding-free training under DDP (and with token-budget slices) unchanged.
    return _train(prepared, "one", 1, 8, "--set", "methods.lora.padding_free=false")


def test_two_processes_match_one_with_the_same_effective_batch(prepared, one_process):
    single = one_process
    double = _train(prepared, "two", gpus=2, batch=4)
    assert single["world_size"] == 1 and double["world_size"] == 2
    assert [r["rank"] for r in double["per_rank"]] == [0, 1]
    assert double["execution"]["padding_free"] and not single["execution"]["padding_free"]
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


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_fsdp_computes_the_target_token_loss_inside_the_sharded_forward(prepared, one_process, kind):
    """FSDP2 (forced on two gloo processes): the loss is computed inside the wrapped forward, in
    16-token chunks recomputed in backward, with checkpointed layers: the one-process loss curve at
    the same effective batch, and the vocabulary projection never sees more than one chunk."""
    calls = prepared / f"head-{kind}.jsonl"
    single = one_process if kind == "lora" else _train(prepared, "one-full", 1, 8, "--set", "methods.lora.kind=full",
                                                       "--set", "methods.lora.lr=0.001")
    changes = () if kind == "lora" else ("--set", "methods.lora.kind=full", "--set", "methods.lora.lr=0.001")
    fsdp = _fsdp_on_cpu(prepared, f"fsdp-{kind}", 4, *changes, "--set", "methods.lora.loss_chunk_tokens=16",
                        "--set", "methods.lora.gradient_checkpointing=true", helper=("--record-head", str(calls)))
    assert fsdp["strategy"] == "fsdp" and fsdp["world_size"] == 2 and fsdp["kind"] == kind
    assert fsdp["tokens_trained"] == single["tokens_trained"]
    ours = [p["loss"] for p in fsdp["loss_curve"]]
    assert len(ours) == 3 and ours == pytest.approx([p["loss"] for p in single["loss_curve"]], rel=1e-6)
    heads = [json.loads(line) for line in calls.read_text().splitlines()]
    assert {h["rank"] for h in heads} == {"0", "1"}
    assert all(h["fsdp"] for h in heads)  # the projection is a module of an FSDP unit
    # Only (target tokens x hidden) chunks, never (rows x sequence x hidden): no full logits.
    assert all(len(h["shape"]) == 2 and h["shape"][0] <= 16 for h in heads)
    assert sum(h["shape"][0] for h in heads) > 4 * 16
    saved = "adapter_model.safetensors" if kind == "lora" else "model.safetensors"
    final = prepared / f"fsdp-{kind}" / "train" / "lora" / "final"
    assert (final / saved).exists()
    if kind == "full":
        # The gathered weights are saved once: the tied head is not a second copy of the embedding,
        # and the saved model equals the one-process model's format (and loads with its head tied).
        from safetensors import safe_open
        from transformers import AutoModelForCausalLM

        with safe_open(str(final / saved), "pt") as handle, \
                safe_open(str(prepared / "one-full" / "train" / "lora" / "final" / saved), "pt") as expected:
            assert sorted(handle.keys()) == sorted(expected.keys())
            assert "lm_head.weight" not in list(handle.keys())
        model = AutoModelForCausalLM.from_pretrained(final)
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_fsdp_under_bf16_mixed_precision_keeps_the_loss_in_fp32(prepared, one_process):
    """With bf16 mixed precision FSDP casts the model's outputs, the loss too, to bf16; the reported
    loss keeps its fp32 value (a bf16 value near 12.4 is a multiple of 1/16)."""
    fsdp = _fsdp_on_cpu(prepared, "fsdp-bf16", 4, "--set", "methods.lora.loss_chunk_tokens=16", helper=("--bf16",))
    assert fsdp["strategy"] == "fsdp" and fsdp["dtype"] == "bfloat16"
    ours = [p["loss"] for p in fsdp["loss_curve"]]
    assert all(float(torch.tensor(loss).bfloat16()) != loss for loss in ours)
    assert ours == pytest.approx([p["loss"] for p in one_process["loss_curve"]], rel=1e-3)  # bf16 weights


def test_fsdp_settings(smoke_config=None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftlab.config import load_config
    from peftlab.methods import Recipe
    from peftlab.models import read_model_config
    from peftlab.train.trainer import training_arguments

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**read_model_config("builtin:tiny-gemma3")))
    method = load_config("smoke").method("qlora")
    args = training_arguments(method, Path("/tmp/peftlab-fsdp-args"), "cpu", torch.float32, Recipe(model=model, saves="full", optimizer_name="adamw_torch"),
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

    from peftlab.config import validate_fsdp
    from peftlab.errors import UserError

    config = load_config("smoke")
    method = replace(config.method("qlora"), kind="lora", micro_batch_tokens=64)
    with pytest.raises(UserError, match="micro_batch_tokens"):
        validate_fsdp(replace(config, methods={"lora": method}), "lora")
