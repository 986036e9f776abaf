"""Padding-free batches (CPU, fp32): rows concatenated, attention kept inside rows and their window, the
loss and its curve unchanged; the execution choice; QLoRA's dequantized copies match bitsandbytes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from peftlab.config import MethodConfig, ModelConfig, load_config
from peftlab.data.prepare import read_split
from peftlab.train.batches import IGNORE, PadCollator, TokenizedRows
from peftlab.train.packing import (
    PackedCollator,
    attention_inputs,
    packed_slices,
    pad_to_multiple,
    select_rows,
)
from peftlab.train.runner import train_method


def _rows(run_dir, count: int, loss_on: str = "assistant"):
    rows = TokenizedRows(read_split(run_dir, "train")[:count], loss_on)
    return [rows[i] for i in range(count)]


def test_packed_batch_restarts_positions_and_masks_each_rows_first_label(smoke):
    _, run_dir = smoke
    rows = _rows(run_dir, 4, "all")
    packed = PackedCollator()(rows)
    padded = PadCollator(0)(rows)
    lengths = [len(r["input_ids"]) for r in rows]
    assert packed["input_ids"].shape == (1, sum(lengths)) and packed["row_lengths"] == lengths
    assert packed["cu_seq_lens"].tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    starts = packed["cu_seq_lens"][:-1].tolist()
    assert packed["position_ids"][0, starts].tolist() == [0] * 4
    assert packed["labels"][0, starts].tolist() == [IGNORE] * 4  # no target crosses a row boundary
    # The same targets as the padded batch's shifted labels, so the loss's token count is unchanged.
    assert (packed["labels"][:, 1:] != IGNORE).sum() == (padded["labels"][:, 1:] != IGNORE).sum()
    assert sorted(packed["labels"][0][packed["labels"][0] != IGNORE].tolist()) == sorted(
        padded["labels"][:, 1:][padded["labels"][:, 1:] != IGNORE].tolist())


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_forward_equals_each_row_alone(smoke, implementation):
    """Hidden states of the concatenated rows equal each row's own forward: causal, inside the row,
    and on sliding layers inside the window (the smoke rows are longer than the tiny model's 32)."""
    from peftlab.models import load_model

    config, run_dir = smoke
    model = load_model(replace(config.model, attn_implementation=implementation), device="cpu",
                       dtype=torch.float32, seed=0).eval()
    decoder = model.get_decoder()
    rows = sorted(_rows(run_dir, 24), key=lambda r: -len(r["input_ids"]))[:3]
    assert min(len(r["input_ids"]) for r in rows) > model.config.sliding_window
    packed = pad_to_multiple(PackedCollator()(rows), 64, 0)  # plus a dummy row of bucket padding
    with torch.no_grad():
        flat = decoder(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                       **attention_inputs(model.config, packed)).last_hidden_state[0]
        start = 0
        for row in rows:
            alone = decoder(input_ids=torch.tensor([row["input_ids"]])).last_hidden_state[0]
            torch.testing.assert_close(flat[start:start + len(alone)], alone, rtol=1e-5, atol=1e-5)
            start += len(alone)


def test_flex_block_mask_holds_the_same_mask_as_sdpa():
    """FlexAttention's BlockMask is built from the same predicate as SDPA's dense mask (running flex
    itself on a CPU compiles C++ for minutes: the GPU bench times and checks it)."""
    from peftlab.train.packing import _mask

    row = torch.tensor([1] * 70 + [2] * 150 + [3] * 36)
    dense = _mask("sdpa", row, 32, torch.float32)[0, 0]
    block = _mask("flex_attention", row, 32, torch.float32)
    from_blocks = block.to_dense()  # [1, 1, q blocks, kv blocks]: which blocks hold any allowed pair
    size = block.BLOCK_SIZE[0]
    for qb in range(from_blocks.shape[-2]):
        for kb in range(from_blocks.shape[-1]):
            tile = dense[qb * size:(qb + 1) * size, kb * size:(kb + 1) * size]
            assert bool(from_blocks[0, 0, qb, kb]) == bool(tile.any())
    assert dense.sum() == sum(min(i + 1, 32) for n in (70, 150, 36) for i in range(n))


def test_slices_and_bucket_padding_keep_rows_whole():
    assert packed_slices([5, 30, 12, 12, 3, 40], 36) == [(0, 2), (2, 5), (5, 6)]  # consecutive rows, <= 36 tokens
    assert packed_slices([5, 30], None) == [(0, 2)] and packed_slices([5, 30], 35) == [(0, 2)]
    batch = PackedCollator()([{"input_ids": [7] * n, "labels": [7] * n} for n in (3, 5, 2)])
    part = select_rows(batch, 1, 3)
    assert part["input_ids"].shape == (1, 7) and part["row_lengths"] == [5, 2]
    assert part["cu_seq_lens"].tolist() == [0, 5, 7] and part["max_length"] == 5
    assert part["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1]
    padded = pad_to_multiple(batch, 8, 0)
    assert padded["input_ids"].shape == (1, 16) and padded["row_lengths"] == [3, 5, 2]
    assert padded["labels"][0, 10:].eq(IGNORE).all() and padded["cu_seq_lens"].tolist() == [0, 3, 8, 10, 16]
    assert pad_to_multiple(batch, 5, 0) is batch  # 10 tokens: already a multiple


def _curve(config, run_dir, out, kind, **changes):
    base = "galore" if kind == "galore" else "qlora"
    method = config.method(base)
    lora = replace(method.lora, dropout=0.0)  # dropout draws differ between batch shapes
    method = replace(method, kind=kind, max_steps=2, lora=lora, **changes)
    metrics = train_method(config, run_dir, kind, method=method, out=out)
    return [p["loss"] for p in metrics["loss_curve"]], metrics


@pytest.mark.parametrize("kind", ["lora", "qlora", "galore", "full"])
def test_padding_free_training_gives_the_padded_loss_curve(smoke, tmp_path, kind):
    config, run_dir = smoke
    padded, padded_metrics = _curve(config, run_dir, tmp_path / "padded", kind, padding_free=False)
    packed, packed_metrics = _curve(config, run_dir, tmp_path / "packed", kind, padding_free=True)
    assert len(packed) == 2 and packed == pytest.approx(padded, rel=1e-5)
    assert packed_metrics["tokens_trained"] == padded_metrics["tokens_trained"]
    assert packed_metrics["execution"]["padding_free"] and not padded_metrics["execution"]["padding_free"]
    assert packed_metrics["execution"]["mode"] == "as_written"  # CPU: the config's split and levers


@pytest.mark.parametrize("kind", ["qlora", "galore"])
def test_padding_free_with_token_budget_slices_and_bucket_padding(smoke, tmp_path, kind):
    config, run_dir = smoke
    whole, _ = _curve(config, run_dir, tmp_path / "whole", kind, padding_free=False)
    sliced, metrics = _curve(config, run_dir, tmp_path / "sliced", kind, padding_free=True, micro_batch_tokens=200,
                             pad_tokens_to_multiple_of=128)
    assert sliced == pytest.approx(whole, rel=1e-5)
    assert metrics["execution"]["micro_batch_tokens"] == 200


def test_dequantized_base_matches_bitsandbytes_bitwise():
    """QLoRA's bf16 copies: the same outputs and input gradients as bitsandbytes' 4-bit forward."""
    import bitsandbytes as bnb

    from peftlab.methods.qlora import keep_dequantized_weights

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        dense = torch.nn.Linear(128, 96, bias=True)
        layer = bnb.nn.Linear4bit(128, 96, bias=True, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
        layer.load_state_dict(dense.state_dict())
        layer = layer.to("cpu")  # quantises
        layer.weight = bnb.nn.Params4bit(dense.weight.data.to(dtype), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)._quantize("cpu")
        layer.bias = torch.nn.Parameter(dense.bias.data.to(dtype), requires_grad=False)
        x = torch.randn(40, 128, dtype=dtype, requires_grad=True)
        expected = layer(x)
        expected.float().square().sum().backward()
        expected_grad = x.grad.clone()
        x.grad = None
        holder = torch.nn.Sequential(layer)
        assert keep_dequantized_weights(holder) == 1 and layer.dequantized_weight.dtype == dtype
        ours = layer(x)
        ours.float().square().sum().backward()
        assert torch.equal(ours, expected) and torch.equal(x.grad, expected_grad)
        assert "dequantized_weight" not in layer.state_dict()


def test_qlora_trains_the_same_with_dequantized_copies(smoke, tmp_path):
    config, run_dir = smoke
    plain, _ = _curve(config, run_dir, tmp_path / "plain", "qlora")
    copies, metrics = _curve(config, run_dir, tmp_path / "copies", "qlora", dequantized_base=True)
    assert copies == plain  # bitwise: the same matmuls
    assert metrics["notes"]["dequantized_layers"] == 2 * 7  # every adapted projection of both layers


# --------------------------------------------------------------------------------------- execution

ONE_B = {"num_hidden_layers": 26, "hidden_size": 1152, "intermediate_size": 6912, "num_attention_heads": 4,
         "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144, "sliding_window": 512}


def _seed_method(kind: str, **changes) -> MethodConfig:
    config = load_config("seed")
    method = config.method(kind)
    return replace(method, **changes) if changes else method


def test_cpu_execution_runs_the_config_as_written():
    from peftlab.train.execution import choose_execution, explicit_keys

    method = _seed_method("qlora")
    execution = choose_execution(method, explicit_keys(method), device="cpu", gpu_memory_gib=None)
    assert execution.method.batch_size == 4 and execution.method.grad_accum == 4
    assert execution.attention == "sdpa" and execution.method.padding_free
    assert execution.described["mode"] == "as_written" and execution.described["chosen"] == []


def test_gpu_execution_runs_the_effective_batch_at_once_and_keeps_explicit_keys():
    from peftlab.train.execution import choose_execution, explicit_keys

    for kind in ("qlora", "galore"):
        method = _seed_method(kind)
        fast = choose_execution(method, explicit_keys(method), device="cuda", gpu_memory_gib=79.0, shape=ONE_B,
                                probe=False)
        m = fast.method
        assert (m.batch_size, m.grad_accum) == (16, 1)  # the same 16 rows per optimizer step
        assert m.lr == method.lr and m.epochs == method.epochs and m.warmup_steps == method.warmup_steps
        assert not m.gradient_checkpointing and m.loss_chunk_tokens == 1024 and m.padding_free
        assert m.micro_batch_tokens is None or m.micro_batch_tokens >= 2048
        assert fast.described["mode"] == "fast" and "batch_size" in fast.described["chosen"]
        assert fast.described["estimated_peak_gib"] <= 79.0 * 0.85
        assert fast.method.dequantized_base == (kind == "qlora")
        # One process, no checkpointing: the rows run as bins of 4,096 tokens replayed from CUDA graphs.
        assert m.graph_tokens == 4096 and m.cuda_graphs and fast.described["cuda_graphs"]
        assert not fast.liger  # ONE_B names no model_type: liger is for Gemma 3 text models
    # Two processes, or the low-memory execution's checkpointing: no bins.
    method = _seed_method("qlora")
    assert choose_execution(method, explicit_keys(method), device="cuda", gpu_memory_gib=79.0, shape=ONE_B,
                            world=2, probe=False).method.graph_tokens is None
    low = replace(method, memory_budget_gib=1.5)
    assert choose_execution(low, explicit_keys(low), device="cuda", gpu_memory_gib=79.0, shape=ONE_B,
                            probe=False).method.graph_tokens is None
    gemma = {**ONE_B, "model_type": "gemma3_text"}
    from peftlab.train.execution import liger_applies

    assert choose_execution(method, explicit_keys(method), device="cuda", gpu_memory_gib=79.0, shape=gemma,
                            probe=False).liger == liger_applies(gemma)
    # A key the YAML gives is kept.
    method = _seed_method("qlora", explicit=[*_seed_method("qlora").explicit, "gradient_checkpointing",
                                             "loss_chunk_tokens"], loss_chunk_tokens=64)
    kept = choose_execution(method, explicit_keys(method), device="cuda", gpu_memory_gib=79.0, shape=ONE_B,
                            probe=False)
    assert kept.method.gradient_checkpointing and kept.method.loss_chunk_tokens == 64
    assert {"gradient_checkpointing", "loss_chunk_tokens"} <= set(kept.described["kept_as_written"])


def test_memory_budget_picks_the_low_memory_levers():
    from peftlab.train.execution import choose_execution, estimate_peak_gib, explicit_keys

    qlora = _seed_method("qlora", memory_budget_gib=1.5)
    low = choose_execution(qlora, explicit_keys(qlora), device="cuda", gpu_memory_gib=79.0, shape=ONE_B, probe=False)
    m = low.method
    assert low.described["mode"] == "memory_budget"
    assert m.gradient_checkpointing and m.loss_chunk_tokens == 32 and not m.dequantized_base
    assert m.micro_batch_tokens == 2048  # one full-length row per forward: the lowmem profile's
    galore = _seed_method("galore", memory_budget_gib=2.95)
    low = choose_execution(galore, explicit_keys(galore), device="cuda", gpu_memory_gib=79.0, shape=ONE_B,
                           probe=False)
    assert low.method.galore.accumulate == "projected" and low.method.gradient_checkpointing
    # A larger budget keeps more speed: fewer, larger forwards.
    roomy = choose_execution(replace(qlora, memory_budget_gib=24.0), explicit_keys(qlora), device="cuda",
                             gpu_memory_gib=79.0, shape=ONE_B, probe=False)
    assert not roomy.method.gradient_checkpointing
    assert estimate_peak_gib(roomy.method, ONE_B, tokens=roomy.method.micro_batch_tokens or 16 * 2048) <= 24.0


def test_explicit_keys_come_from_the_yaml(tmp_path):
    from peftlab.train.execution import explicit_keys

    config = load_config("smoke", ["train.loss_chunk_tokens=64", "methods.galore.galore.accumulate=projected"])
    assert {"batch_size", "grad_accum", "gradient_checkpointing", "loss_chunk_tokens"} <= explicit_keys(
        config.method("galore"))
    assert "galore.accumulate" in config.method("galore").explicit
    assert "padding_free" not in explicit_keys(config.method("galore"))
    assert explicit_keys(MethodConfig(kind="lora", padding_free=False)) == {"padding_free"}
    assert "explicit" not in load_config("smoke").model.__dict__ or ModelConfig().explicit == []
