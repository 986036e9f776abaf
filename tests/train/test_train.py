"""Training on a tiny random Gemma 3 (CPU): every method, the loss, the metrics file, resume, merge."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from peftlab.data.prepare import read_split
from peftlab.train.batches import IGNORE, PadCollator, TokenizedRows
from peftlab.train.runner import train_method
from peftlab.train.trainer import TargetTokenTrainer

VOCAB = 262_144


def _method(config, name, **changes):
    return replace(config.method(name), **changes)


def _tiny_layers() -> int:
    from peftlab.models import read_model_config

    return read_model_config("builtin:tiny-gemma3")["num_hidden_layers"]


def _tiny_param_count() -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftlab.models import read_model_config

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**read_model_config("builtin:tiny-gemma3")))
    return sum(p.numel() for p in model.parameters())


def test_assistant_only_labels(smoke):
    _, run_dir = smoke
    row = read_split(run_dir, "train")[0]
    assistant = TokenizedRows([row], "assistant")[0]
    everything = TokenizedRows([row], "all")[0]
    kept = [i for i, label in enumerate(assistant["labels"]) if label != IGNORE]
    assert kept == [i for s, e in row["assistant_spans"] for i in range(s, e)]
    assert 0 < len(kept) < len(row["input_ids"])
    assert everything["labels"] == row["input_ids"]


def test_target_token_loss_equals_the_standard_loss(smoke, tmp_path):
    """Logits only where labels are set give the same value as the full-vocabulary HF loss."""
    from transformers import TrainingArguments

    from peftlab.models import device_name, load_model

    config, run_dir = smoke
    model = load_model(config.model, device=device_name(), dtype=torch.float32, seed=0)
    rows = TokenizedRows(read_split(run_dir, "train")[:4], "assistant")
    batch = PadCollator(0)([rows[i] for i in range(4)])
    trainer = TargetTokenTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                     report_to=[]))
    ours = trainer.compute_loss(model, batch)
    reference = model(**batch).loss
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
    assert ours.item() == pytest.approx(math.log(VOCAB), abs=0.3)  # random weights: about uniform


@pytest.mark.parametrize("kind", ["qlora", "lora", "galore", "full"])
def test_every_method_trains_and_accounts(smoke, tmp_path, kind):
    config, run_dir = smoke
    base = "galore" if kind == "galore" else "qlora"
    method = _method(config, base, kind=kind, max_steps=3)
    metrics = train_method(config, run_dir, kind, method=method, out=tmp_path / kind)
    assert metrics["optimizer_steps"] == 3 and len(metrics["loss_curve"]) == 3
    assert all(math.isfinite(p["loss"]) for p in metrics["loss_curve"])
    assert abs(metrics["loss_curve"][0]["loss"] - math.log(VOCAB)) < 0.3
    assert metrics["peak_gpu_alloc_gib"] is None and metrics["peak_gpu_reserved_gib"] is None  # CPU: null, not 0
    assert metrics["peak_rss_gib"] > 0.1 and metrics["train_time_s"] > 0 and metrics["tokens_per_s"] > 0
    assert metrics["model_load_s"] > 0 and metrics["data_load_s"] > 0
    assert metrics["tokens_trained"] > 0
    total = _tiny_param_count()
    assert metrics["total_params"] == total
    if kind in ("qlora", "lora"):
        r, hidden, inter, layers = 4, 64, 128, 2
        q, kv, o = 2 * 32, 1 * 32, 2 * 32  # heads * head_dim
        per_layer = r * ((hidden + q) + 2 * (hidden + kv) + (o + hidden) + 2 * (hidden + inter) + (inter + hidden))
        assert metrics["trainable_params"] == layers * per_layer
        assert (tmp_path / kind / "final" / "adapter_model.safetensors").exists()
    else:
        assert metrics["trainable_params"] == total
        assert (tmp_path / kind / "final" / "model.safetensors").exists()
    assert not list((tmp_path / kind / "final").glob("*.bin"))
    assert not (tmp_path / kind / "checkpoints").exists()  # the Trainer saved step 3; removed after final/
    written = (tmp_path / kind / "metrics.json").read_text()
    for key in ("versions", "gpu_name", "final_loss", "loss_curve", "peak_rss_gib"):
        assert f'"{key}"' in written
    assert (tmp_path / kind / "loss.csv").read_text().startswith("step,epoch,loss")


@pytest.mark.parametrize("kind", ["galore", "lora"])
def test_resume_gives_the_uninterrupted_loss_curve(smoke, tmp_path, kind, monkeypatch):
    from peftlab.methods import galore_basis

    restored: list[int] = []
    real_restore = galore_basis.restore_projectors
    monkeypatch.setattr(galore_basis, "restore_projectors", lambda o, p: restored.append(real_restore(o, p)))
    config, run_dir = smoke
    base = "galore" if kind == "galore" else "qlora"
    method = _method(config, base, kind=kind, max_steps=6, save_steps=2)
    whole = train_method(config, run_dir, kind, method=replace(method, keep_checkpoints=True), out=tmp_path / "whole")
    assert sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    with pytest.raises(KeyboardInterrupt):
        train_method(config, run_dir, kind, method=method, out=tmp_path / "cut", stop_after=2)
    assert not (tmp_path / "cut" / "metrics.json").exists()
    assert (tmp_path / "cut" / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists()  # kept to resume
    resumed = train_method(config, run_dir, kind, method=method, out=tmp_path / "cut", resume=True)
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert not (tmp_path / "cut" / "checkpoints").exists()  # final/ is written: checkpoints removed
    ours = [p["loss"] for p in resumed["loss_curve"]]
    expected = [p["loss"] for p in whole["loss_curve"]]
    assert ours == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert resumed["tokens_trained"] == whole["tokens_trained"]  # totals survive the interruption
    assert resumed["train_loss_mean"] == pytest.approx(whole["train_loss_mean"], rel=1e-5)
    # GaLore: the loaded projectors were brought back to the config's class and device (one per target).
    assert (sum(restored) >= 4) if kind == "galore" else restored == []


def test_merge_into_bf16_base_matches_base_plus_adapters(smoke, tmp_path):
    from peft import PeftModel

    from peftlab.hybrid import merge_adapters
    from peftlab.models import load_model

    config, run_dir = smoke
    config = replace(config, model=replace(config.model, dtype="bfloat16"))
    method = _method(config, "qlora", kind="lora", max_steps=3, lr=0.05)  # large steps: adapters matter
    train_method(config, run_dir, "lora", method=method, out=tmp_path / "lora")
    merge_adapters(config, tmp_path / "lora" / "final", tmp_path / "merge", None)
    ids = torch.tensor([read_split(run_dir, "test")[0]["input_ids"][:40]])
    base = load_model(config.model, device="cpu", dtype=torch.bfloat16)
    with_adapters = PeftModel.from_pretrained(base, str(tmp_path / "lora" / "final")).eval()
    merged = load_model(config.model, device="cpu", dtype=torch.bfloat16, source=str(tmp_path / "merge" / "final")).eval()
    assert next(merged.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        expected = with_adapters(ids).logits.float()
        got = merged(ids).logits.float()
        plain = load_model(config.model, device="cpu", dtype=torch.bfloat16)(ids).logits.float()
    assert (expected - plain).abs().max() > 0.01  # the adapters changed the model
    assert (got - expected).abs().max() < 0.05  # bf16 rounding only
    # bf16 near-ties of a random tiny model may flip a few argmaxes (2 of 29 seen)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_hybrid_runs_stages_and_sums_resources(smoke):
    from peftlab.hybrid import train_hybrid

    config, run_dir = smoke
    metrics = train_hybrid(config, run_dir, "hybrid")
    assert [s["method"] for s in metrics["stages"]] == ["qlora", "merge", "galore"]
    assert metrics["optimizer_steps"] == 4 and len(metrics["loss_curve"]) == 4
    assert metrics["train_time_s"] == pytest.approx(sum(s.get("train_time_s", 0) for s in metrics["stages"]))
    assert metrics["merge_time_s"] > 0
    assert metrics["resumed"] is False and metrics["segments"] == 1
    assert metrics["checkpoint_save_s"] == pytest.approx(sum(s.get("checkpoint_save_s", 0) for s in metrics["stages"]))
    out = Path(run_dir) / "train" / "hybrid"
    assert (out / "final" / "model.safetensors").exists()
    # The last stage keeps its own final/ (hard links), so a kill while the hybrid's is made only repeats that step.
    assert (out / "stages" / "2-galore" / "final" / "model.safetensors").exists()
    assert (out / "fingerprint.json").exists()
    assert metrics["trainable_params"] == metrics["total_params"]


def test_chunked_loss_equals_the_whole_loss_and_its_gradient():
    from peftlab.train.loss import target_token_loss_sum

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    whole = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    (expected,) = torch.autograd.grad(whole, hidden)
    chunked = target_token_loss_sum(hidden, targets, head, None, chunk=8)
    (got,) = torch.autograd.grad(chunked, hidden)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("variant", ["adamw", "adamw8bit", "layerwise"])
def test_galore_variants_train(smoke, tmp_path, variant, monkeypatch):
    from peftlab.errors import UserError
    from peftlab.methods import galore_basis

    seeded: list[int] = []
    real_seed, real_basis = galore_basis.seed_projectors, galore_basis.GramProjector.get_orthogonal_matrix
    monkeypatch.setattr(galore_basis, "seed_projectors", lambda optimizer: seeded.append(real_seed(optimizer)))
    bases: list[int] = []
    monkeypatch.setattr(galore_basis.GramProjector, "get_orthogonal_matrix",
                        lambda *a, **k: bases.append(1) or real_basis(*a, **k))
    config, run_dir = smoke
    method = _method(config, "galore", max_steps=2, grad_accum=1)
    method = replace(method, galore=replace(method.galore, variant=variant))
    if variant == "adamw8bit" and not torch.cuda.is_available():
        with pytest.raises(UserError, match="needs a CUDA GPU"):
            train_method(config, run_dir, "galore", method=method, out=tmp_path / variant)
        return
    metrics = train_method(config, run_dir, "galore", method=method, out=tmp_path / variant)
    assert metrics["optimizer"] == {"layerwise": "galore_adamw_layerwise"}.get(variant, f"galore_{variant}")
    assert metrics["optimizer_steps"] == 2 and all(math.isfinite(p["loss"]) for p in metrics["loss_curve"])
    # galore.projection gram (the default): every projected weight got a GramProjector; layer-wise, one
    # optimizer per weight (transformers' optimizer_dict), some of them GaLore's.
    assert sum(seeded) >= 4 and (variant != "layerwise" or len(seeded) > sum(seeded))
    assert len(bases) == sum(seeded)  # each computed its first basis (step 0) with the Gram route
    if variant == "layerwise":  # transformers saves no per-weight optimizer state: resuming is refused
        cut = replace(method, save_steps=1)
        with pytest.raises(KeyboardInterrupt):
            train_method(config, run_dir, "galore", method=cut, out=tmp_path / "cut", stop_after=1)
        with pytest.raises(UserError, match="layerwise cannot resume"):
            train_method(config, run_dir, "galore", method=cut, out=tmp_path / "cut", resume=True)


def _projected(method, **galore_changes):
    targets = ["attn", "mlp", "embed_tokens"]  # the embedding too: its gradient takes the routed path
    return replace(method, galore=replace(method.galore, accumulate="projected", targets=targets, **galore_changes))


def test_projected_galore_trains_as_galore_torch_on_summed_gradients(smoke, tmp_path, monkeypatch):
    """Token-budget micro-batches and Trainer accumulation, projections recomputed twice: the same losses as
    galore-torch summing full gradients (clipping off: ours clips the projected gradients' norm)."""
    from peftlab.train import vocab_loss

    routed: list[int] = []
    real = vocab_loss._backward_by_vocabulary_rows
    monkeypatch.setattr(vocab_loss, "_backward_by_vocabulary_rows", lambda *a: routed.append(1) or real(*a))
    config, run_dir = smoke
    method = _method(config, "galore", max_steps=5, batch_size=4, grad_accum=2, micro_batch_tokens=48,
                     max_grad_norm=0.0)
    method = replace(method, galore=replace(method.galore, update_proj_gap=2, targets=["attn", "mlp", "embed_tokens"]))
    plain = train_method(config, run_dir, "galore", method=method, out=tmp_path / "full")
    ours = train_method(config, run_dir, "galore", method=_projected(method), out=tmp_path / "projected")
    assert ours["optimizer"] == "galore_adamw_projected" and plain["optimizer"] == "galore_adamw"
    assert [p["loss"] for p in ours["loss_curve"]] == pytest.approx([p["loss"] for p in plain["loss_curve"]], rel=1e-4)
    assert len({round(p["loss"], 4) for p in ours["loss_curve"]}) > 1
    assert len(routed) >= 10  # the vocabulary loss handed the embedding's gradient over by rows (5 steps x 2+)
    # The logged gradient norm is the optimizer's (the targets' .grad is empty), near galore-torch's full one.
    logged = [float(row.split(",")[4]) for row in (tmp_path / "projected" / "loss.csv").read_text().splitlines()[1:]]
    full = [float(row.split(",")[4]) for row in (tmp_path / "full" / "loss.csv").read_text().splitlines()[1:]]
    assert len(logged) == len(full) == 5
    assert all(0.5 * f < ours <= f * 1.0001 for ours, f in zip(logged, full, strict=True))  # projected <= full


@pytest.mark.parametrize("variant", ["adamw", "adamw8bit"])  # 8-bit: bitsandbytes' states in the checkpoint
def test_projected_galore_resumes_to_the_uninterrupted_loss_curve(smoke, tmp_path, variant):
    config, run_dir = smoke
    method = _projected(_method(config, "galore", max_steps=5, save_steps=3, grad_accum=2),
                        update_proj_gap=2, variant=variant)
    whole = train_method(config, run_dir, "galore", method=method, out=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train_method(config, run_dir, "galore", method=method, out=tmp_path / "cut", stop_after=3)
    resumed = train_method(config, run_dir, "galore", method=method, out=tmp_path / "cut", resume=True)
    assert resumed["resumed_from"].endswith("checkpoint-3")
    assert resumed["optimizer"] == whole["optimizer"] == f"galore_{variant}_projected"
    assert [p["loss"] for p in resumed["loss_curve"]] == pytest.approx([p["loss"] for p in whole["loss_curve"]],
                                                                       rel=1e-5, abs=1e-6)


def test_a_hybrid_with_a_single_process_galore_stage_is_refused_before_training(smoke):
    from peftlab.errors import UserError
    from peftlab.train.launch import check_launch

    config, _ = smoke
    config = replace(config, methods={**config.methods, "galore": _projected(config.method("galore"))})
    with pytest.raises(UserError, match="method 'hybrid': galore with accumulate projected"):
        check_launch(config, "hybrid", world=2, fsdp=False)
    check_launch(config, "qlora", world=2, fsdp=False)  # nothing to refuse
    check_launch(config, "hybrid", world=1, fsdp=False)  # one process: fine


def test_a_finished_method_leaves_no_embedding_in_bitsandbytes_manager(smoke, tmp_path):
    """transformers' Trainer registers embeddings with bitsandbytes' process-wide optimizer manager; a
    hybrid's next stage must not carry the previous stage's embedding (0.56 GiB for the 1B)."""
    import bitsandbytes as bnb

    config, run_dir = smoke
    train_method(config, run_dir, "qlora", method=_method(config, "qlora", max_steps=1), out=tmp_path / "q")
    # Before the fix the finished run's embedding module stayed listed (and alive) here.
    assert bnb.optim.GlobalOptimManager.get_instance().module_weight_config_triple == []


def test_layerwise_galore_refuses_gradient_accumulation(smoke, tmp_path):
    from peftlab.errors import UserError

    config, _ = smoke
    method = _method(config, "galore", max_steps=2, grad_accum=2)
    method = replace(method, galore=replace(method.galore, variant="layerwise"))
    from peftlab.config import validate

    with pytest.raises(UserError, match="grad_accum: 1"):  # a config-only rule: refused before any work
        validate(replace(config, methods={**config.methods, "galore": method}))


@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_bf16_mixed_precision_trains_adapters_on_a_bf16_base(smoke, tmp_path, monkeypatch, name):
    """What a GPU run does (bf16 weights, fp32 adapters, bf16 autocast), on CPU."""
    import peftlab.train.runner as runner

    make_args = runner.training_arguments

    def bf16_arguments(*args, **kwargs):
        arguments = make_args(*args, **kwargs)
        arguments.bf16, arguments.mixed_precision = True, "bf16"  # what a CUDA bf16 run gets
        return arguments

    monkeypatch.setattr(runner, "training_arguments", bf16_arguments)
    monkeypatch.setattr(runner, "resolve_dtype", lambda model, device: torch.bfloat16)
    config, run_dir = smoke
    if name == "lora":
        config = replace(config, methods={**config.methods, "lora": replace(config.methods["qlora"], kind="lora")})
    metrics = train_method(config, run_dir, name, method=_method(config, name, max_steps=2), out=tmp_path / name)
    assert metrics["dtype"] == "bfloat16" and metrics["optimizer_steps"] == 2
    assert all(math.isfinite(p["loss"]) for p in metrics["loss_curve"])
    assert abs(metrics["loss_curve"][0]["loss"] - math.log(262144)) < 0.3


def test_a_checkpoint_resumes_only_under_the_strategy_that_wrote_it(tmp_path):
    from peftlab.errors import UserError
    from peftlab.train.checkpoints import check_checkpoint_strategy

    plain, sharded = tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"
    plain.mkdir()
    (plain / "optimizer.pt").write_bytes(b"")
    sharded.mkdir()
    (sharded / "pytorch_model_fsdp.bin").write_bytes(b"")
    check_checkpoint_strategy(str(plain), fsdp=False)
    check_checkpoint_strategy(str(sharded), fsdp=True)
    with pytest.raises(UserError, match="written with --fsdp"):
        check_checkpoint_strategy(str(sharded), fsdp=False)
    with pytest.raises(UserError, match="written without --fsdp"):
        check_checkpoint_strategy(str(plain), fsdp=True)


def test_token_budget_slices_cover_every_row_within_the_budget():
    from peftlab.train.trainer import token_budget_slices

    lengths = [5, 30, 12, 12, 3, 40]
    mask = torch.zeros((len(lengths), 40), dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    slices = token_budget_slices(mask, 36)
    rows = [r for indices, _ in slices for r in indices.tolist()]
    assert sorted(rows) == list(range(len(lengths)))
    assert [(indices.tolist(), length) for indices, length in slices] == [([5], 40), ([1], 30), ([2, 3, 0], 12),
                                                                           ([4], 3)]
    for indices, length in slices:
        assert length == max(lengths[r] for r in indices.tolist())
    whole = token_budget_slices(mask, 240)
    assert len(whole) == 1 and whole[0][1] == 40 and token_budget_slices(mask, None)[0][0].tolist() == list(range(6))


@pytest.mark.parametrize("kind", ["full", "qlora"])
def test_token_budget_micro_batches_give_the_same_training(smoke, tmp_path, monkeypatch, kind):
    """Slicing each batch into token-budget micro-batches changes memory, not the optimisation."""
    from peftlab.train import trainer

    counts: list[int] = []
    real = trainer.token_budget_slices
    monkeypatch.setattr(trainer, "token_budget_slices", lambda mask, budget: counts.append(len(real(mask, budget)))
                        or real(mask, budget))
    config, run_dir = smoke
    base = "galore" if kind == "galore" else "qlora"
    changes = {"lora": replace(config.method(base).lora, dropout=0.0)} if kind == "qlora" else {}
    # Padded batches (padding-free ones slice by rows' real tokens: tests/train/test_padding_free.py).
    method = _method(config, base, kind=kind, max_steps=3, batch_size=4, grad_accum=2, padding_free=False, **changes)
    whole = train_method(config, run_dir, kind, method=method, out=tmp_path / "whole")
    sliced = train_method(config, run_dir, kind, method=replace(method, micro_batch_tokens=48),
                          out=tmp_path / "sliced")
    assert [p["loss"] for p in sliced["loss_curve"]] == pytest.approx([p["loss"] for p in whole["loss_curve"]],
                                                                       rel=1e-4)
    assert sliced["tokens_trained"] == whole["tokens_trained"]
    # The whole run never looks for slices (no budget); the other did, on each of its 6 micro-batches.
    assert len(counts) == 6 and max(counts) > 1


def test_slices_without_a_trainer_token_count_give_the_whole_batch_gradient(smoke, tmp_path):
    """When the Trainer passes no token count, every slice still divides by the whole batch's targets."""
    from transformers import TrainingArguments

    from peftlab.models import load_model

    config, run_dir = smoke
    model = load_model(config.model, device="cpu", dtype=torch.float32, seed=0)
    rows = TokenizedRows(read_split(run_dir, "train")[:4], "assistant")
    batch = PadCollator(0)([rows[i] for i in range(4)])
    trainer = TargetTokenTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                     report_to=[]))
    trainer.current_gradient_accumulation_steps = 1

    def step(budget):
        model.zero_grad()
        trainer.micro_batch_tokens = budget
        loss = trainer.training_step(model, dict(batch), None)
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    whole_loss, whole_grads = step(None)
    sliced_loss, sliced_grads = step(int(batch["attention_mask"].sum(1).max()))
    assert sliced_loss == pytest.approx(whole_loss, rel=1e-5)
    for ours, expected in zip(sliced_grads, whole_grads, strict=True):
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("lowmem", [False, True])
def test_compiled_decoder_layers_give_the_same_training(smoke, tmp_path, lowmem):
    """`torch_compile` compiles each decoder layer in place: same loss curve, same saved adapter names;
    also under activation checkpointing with token-budget slices (the lowmem combination)."""
    from safetensors import safe_open

    config, run_dir = smoke
    lora = replace(config.method("qlora").lora, dropout=0.0)
    extra = {"gradient_checkpointing": True, "micro_batch_tokens": 48} if lowmem else {}
    method = _method(config, "qlora", kind="lora", max_steps=2, batch_size=4, grad_accum=1, lora=lora, **extra)
    from torch._dynamo.utils import counters

    eager = train_method(config, run_dir, "lora", method=method, out=tmp_path / "eager")
    counters.clear()
    compiled = train_method(config, run_dir, "lora", method=replace(method, torch_compile=True),
                            out=tmp_path / "compiled")
    assert [p["loss"] for p in compiled["loss_curve"]] == pytest.approx([p["loss"] for p in eager["loss_curve"]],
                                                                         rel=1e-4)
    if lowmem and counters["stats"]["unique_graphs"] == 0:
        # Seen with torch 2.13 + transformers 5.25 (and on this project's code of 2026-11-29 alike): dynamo
        # declines the layers inside non-reentrant checkpointing ("HOP: Unsafe side effect") and they run
        # eagerly; the numbers stay right (asserted above) but nothing is compiled, so this is a known failure.
        pytest.xfail("dynamo does not compile decoder layers under activation checkpointing with these versions")
    # The layers really ran compiled: every frame dynamo met compiled, none fell back to eager.
    assert counters["stats"]["unique_graphs"] >= 1
    assert counters["frames"]["ok"] == counters["frames"]["total"] > 0
    assert compiled["notes"]["compile"]["frames_ok"] == compiled["notes"]["compile"]["frames_total"]
    assert compiled["notes"]["compiled_layers"] == _tiny_layers()
    assert [p["loss"] for p in compiled["loss_curve"]] == pytest.approx([p["loss"] for p in eager["loss_curve"]],
                                                                         rel=1e-4)
    assert compiled["method_config"]["torch_compile"] is True

    def adapter_keys(out):
        with safe_open(str(out / "final" / "adapter_model.safetensors"), "pt") as handle:
            return sorted(handle.keys())

    assert adapter_keys(tmp_path / "compiled") == adapter_keys(tmp_path / "eager")
    assert not any("_orig_mod" in key for key in adapter_keys(tmp_path / "compiled"))


def test_compile_survives_an_earlier_compiled_model_in_the_same_process(smoke, tmp_path):
    """A study trains several methods in one process: each compiled model starts from fresh dynamo
    caches, so an earlier one cannot use up the recompile limit and leave this one eager."""
    import torch._dynamo

    config, run_dir = smoke
    lora = replace(config.method("qlora").lora, dropout=0.0)
    method = _method(config, "qlora", kind="lora", max_steps=1, batch_size=4, grad_accum=1, lora=lora,
                     torch_compile=True)
    limit = torch._dynamo.config.recompile_limit
    try:
        torch._dynamo.config.recompile_limit = 1  # raised again by compile_decoder_layers
        for index in range(2):
            metrics = train_method(config, run_dir, "lora", method=method, out=tmp_path / f"run{index}")
            stats = metrics["notes"]["compile"]
            assert stats["frames_ok"] == stats["frames_total"] > 0
    finally:
        torch._dynamo.config.recompile_limit = limit


def test_compile_is_refused_under_fsdp(smoke):
    from peftlab.config import validate_fsdp
    from peftlab.errors import UserError

    config, _ = smoke
    config = replace(config, methods={"lora": _method(config, "qlora", kind="lora", torch_compile=True)})
    with pytest.raises(UserError, match="torch_compile is not supported with --fsdp"):
        validate_fsdp(config, "lora")


@pytest.mark.parametrize("wrapped", [False, True])
def test_target_token_forward_gives_the_trainer_loss_and_gradients(smoke, tmp_path, wrapped):
    """The forward FSDP runs (`target_tokens=`, through PEFT when wrapped) computes, in recomputed
    chunks, the same loss and gradients as the single-process path; without the keyword the model
    is unchanged."""
    from transformers import TrainingArguments

    from peftlab.methods.lora import lora_config
    from peftlab.models import load_model
    from peftlab.train.loss import TargetTokens, enable_target_token_forward

    config, run_dir = smoke
    model = load_model(config.model, device="cpu", dtype=torch.float32, seed=0)
    if wrapped:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(replace(config.method("qlora").lora, dropout=0.0)))
        # Non-zero adapters, so that their gradients depend on the loss.
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.02)
    rows = TokenizedRows(read_split(run_dir, "train")[:4], "assistant")
    batch = PadCollator(0)([rows[i] for i in range(4)])
    trainer = TargetTokenTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                     report_to=[]))
    trainer.loss_chunk_tokens = 16
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainable]

    count = torch.tensor(1234.0)  # as the Trainer passes it: all ranks' targets over the accumulated batch
    expected, expected_grads = loss_and_grads(lambda: trainer.compute_loss(model, batch, num_items_in_batch=count))
    causal_lm = model.get_base_model() if wrapped else model
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    enable_target_token_forward(causal_lm)
    enable_target_token_forward(causal_lm)  # once only
    heads: list[tuple[int, ...]] = []
    handle = causal_lm.get_output_embeddings().register_forward_pre_hook(lambda _m, args: heads.append(args[0].shape))
    request = TargetTokens(batch["labels"], count, None, 16)
    got, got_grads = loss_and_grads(lambda: model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                                  target_tokens=request).loss)
    handle.remove()
    targets = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert targets > 3 * 16
    assert got.item() == pytest.approx(expected.item(), rel=1e-6) and request.value.item() == got.item()
    assert got.dtype == torch.float32
    for ours, theirs in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-8)
    # Only target-token chunks reach the vocabulary projection, each in forward and again in backward.
    assert all(len(shape) == 2 and shape[0] <= 16 for shape in heads)
    assert sum(shape[0] for shape in heads) == 2 * targets
    with torch.no_grad():
        unchanged = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(unchanged, plain)


def test_drop_tied_head_removes_the_second_copy_from_one_file_or_shards(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from peftlab.train.checkpoints import drop_tied_head

    embed, other = torch.randn(8, 4), torch.randn(4, 4)
    single = tmp_path / "single"
    single.mkdir()
    save_file({"model.embed_tokens.weight": embed, "lm_head.weight": embed.clone(), "x": other},
              str(single / "model.safetensors"))
    assert drop_tied_head(single)
    assert sorted(load_file(str(single / "model.safetensors"))) == ["model.embed_tokens.weight", "x"]
    assert not drop_tied_head(single)  # nothing left to remove

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"model.embed_tokens.weight": embed}, str(sharded / "model-00001-of-00002.safetensors"))
    save_file({"lm_head.weight": embed.clone(), "x": other}, str(sharded / "model-00002-of-00002.safetensors"))
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                  "lm_head.weight": "model-00002-of-00002.safetensors", "x": "model-00002-of-00002.safetensors"}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert drop_tied_head(sharded)
    assert list(load_file(str(sharded / "model-00002-of-00002.safetensors"))) == ["x"]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"] and len(index["weight_map"]) == 2


def test_fused_vocabulary_loss_gives_the_checkpointed_chunks_gradients(smoke, tmp_path, monkeypatch):
    """Full fine-tuning trains the tied embedding: the loss that adds its gradient in place
    (`train/vocab_loss.py`) gives the same loss and gradients as the recomputed chunks."""
    from transformers import TrainingArguments

    from peftlab.models import load_model
    from peftlab.train import vocab_loss

    config, run_dir = smoke
    model = load_model(config.model, device="cpu", dtype=torch.float32, seed=0)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    rows = TokenizedRows(read_split(run_dir, "train")[:4], "assistant")
    batch = PadCollator(0)([rows[i] for i in range(4)])
    trainer = TargetTokenTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                     report_to=[]))
    trainer.current_gradient_accumulation_steps = 1
    trainer.loss_chunk_tokens = 7
    used = []
    real = vocab_loss.summed_cross_entropy
    monkeypatch.setattr(vocab_loss, "summed_cross_entropy", lambda *args: used.append(1) or real(*args))

    def step(fused: bool):
        monkeypatch.setattr(vocab_loss, "applies", lambda head, embeddings: fused)
        model.zero_grad()
        for _ in range(2):  # two micro-batches: the gradient accumulates
            loss = trainer.training_step(model, dict(batch), None)
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain_loss, plain_grads = step(False)
    assert not used
    fused_loss, fused_grads = step(True)
    assert used and fused_loss == pytest.approx(plain_loss, rel=1e-6)
    assert len(fused_grads) == len(plain_grads)
    for ours, expected in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)  # fp32 summation order only


@pytest.mark.parametrize(("kind", "fused"), [("galore", True), ("lora", False)])
def test_training_takes_the_fused_loss_only_when_the_tied_embedding_trains(smoke, tmp_path, monkeypatch, kind, fused):
    from peftlab.train import vocab_loss

    used = []
    real = vocab_loss.summed_cross_entropy
    monkeypatch.setattr(vocab_loss, "summed_cross_entropy", lambda *args: used.append(1) or real(*args))
    config, run_dir = smoke
    base = "galore" if kind == "galore" else "qlora"
    train_method(config, run_dir, kind, method=_method(config, base, kind=kind, max_steps=1), out=tmp_path / kind)
    assert bool(used) is fused


def test_floating_point_ops_counts_the_parameters_once_with_transformers_formula():
    class Model:
        main_input_name = "input_ids"
        calls = 0

        def num_parameters(self, exclude_embeddings: bool = False) -> int:
            Model.calls += 1
            return 1_000 if exclude_embeddings else 5_000

    class Host:  # the attributes floating_point_ops reads
        model = Model()

    inputs = {"input_ids": torch.zeros(1, 37, dtype=torch.long)}
    host = Host()
    ours = [TargetTokenTrainer.floating_point_ops(host, inputs) for _ in range(3)]
    assert ours == [6 * 37 * 1_000] * 3  # transformers': 6 x input tokens x parameters without embeddings
    assert Model.calls == 1  # counted once, not once per step
    assert TargetTokenTrainer.floating_point_ops(host, {"other": torch.zeros(2)}) == 0


@pytest.mark.parametrize("logging_steps", [1, 2])
def test_deferred_logs_give_the_same_history(smoke, tmp_path, monkeypatch, logging_steps):
    """A logged step's values read at the next step (`PendingLog`, on one GPU) log what reading them
    at once does: the same steps, epochs, losses, gradient norms and training-loss mean, and the same
    history in a checkpoint written between two logs."""
    from peftlab.train import trainer as trainer_module

    config, run_dir = smoke
    method = _method(config, "qlora", kind="lora", max_steps=5, logging_steps=logging_steps, save_steps=3,
                     keep_checkpoints=True)
    deferred = {"on": False}
    written: list[int] = []
    trainers: list[TargetTokenTrainer] = []
    write, log = trainer_module.PendingLog.write, TargetTokenTrainer.log
    monkeypatch.setattr(TargetTokenTrainer, "_defers_logs", lambda self, tr_loss: deferred["on"])
    monkeypatch.setattr(trainer_module.PendingLog, "write",
                        lambda self, trainer: written.append(self.step) or write(self, trainer))
    monkeypatch.setattr(TargetTokenTrainer, "log",
                        lambda self, *args, **kwargs: trainers.append(self) or log(self, *args, **kwargs))
    histories, metrics = [], []
    for on in (False, True):
        deferred["on"] = on
        metrics.append(train_method(config, run_dir, "lora", method=method, out=tmp_path / str(on)))
        speed = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_tokens_per_second")
        histories.append([{k: v for k, v in entry.items() if k not in speed}
                          for entry in trainers[-1].state.log_history])
    logged = [step for step in range(1, 6) if step % logging_steps == 0]
    assert written == logged  # every logged step went through PendingLog, in order
    assert [e["step"] for e in histories[1] if "loss" in e] == logged
    for ours, theirs in zip(histories[1], histories[0], strict=True):
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            assert ours[key] == pytest.approx(value, rel=1e-6), key
    assert metrics[1]["train_loss_mean"] == pytest.approx(metrics[0]["train_loss_mean"], rel=1e-6)
    import json

    saved = [json.loads((tmp_path / str(on) / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
             for on in (False, True)]
    assert [e["step"] for e in saved[1]["log_history"]] == [step for step in logged if step <= 3]
    for ours, theirs in zip(saved[1]["log_history"], saved[0]["log_history"], strict=True):
        assert ours.keys() == theirs.keys()
        for key in theirs.keys() - set(speed):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6), key
