"""Fixed-size bins (`peftlab.train.graphs`, CPU, fp32): rows packed whole into bins of one shape,
padding rows outside the loss, and the binned step trains the same loss curve as the rows as they come.
(The CUDA-graph capture itself runs on a GPU only: the GPU bench compares its curve with eager.)"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from peftlab.train.batches import IGNORE
from peftlab.train.graphs import (
    PAD_ROW_TOKENS,
    BinLayout,
    GraphedForwardBackward,
    bin_size,
    bin_sizes,
    bin_tensors,
    pack_bins,
    row_slots,
)
from peftlab.train.packing import PackedCollator
from peftlab.train.runner import train_method


def test_rows_are_packed_whole_longest_first_into_bins():
    lengths = [300, 900, 100, 700, 50, 1000]
    bins = pack_bins(lengths, 1024, max_rows=16)
    assert sorted(i for b in bins for i in b) == list(range(6))  # every row once
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    assert bins == [[5], [1, 2], [0, 3], [4]]  # 1000 | 900+100 | 700+300 | 50 (fits nowhere else)
    assert len(pack_bins([10] * 20, 1024, max_rows=4)) == 5  # the row cap splits bins too
    with pytest.raises(ValueError):
        pack_bins([2000], 1024, max_rows=4)


def test_a_bin_takes_the_smallest_quarter_of_the_capacity_that_holds_it():
    assert [bin_size(n, 4096) for n in (1, 1024, 1025, 2500, 3072, 3073, 4096)] == [1024, 1024, 2048, 3072, 3072,
                                                                                    4096, 4096]
    assert bin_size(100, 2048) == 512 and bin_size(2048, 2048) == 2048


def test_a_bin_has_one_shape_with_padding_rows_outside_the_loss():
    rows = [{"input_ids": [5 + i] * n, "labels": [5 + i] * n} for i, n in enumerate((7, 150, 20))]
    batch = PackedCollator()(rows)
    capacity, slots = 256, row_slots(256, 3)
    layout = BinLayout(batch["row_lengths"], [0, 2], capacity, slots)
    values = bin_tensors(batch, layout, pad_id=0)
    assert values["input_ids"].shape == values["labels"].shape == values["position_ids"].shape == (1, capacity)
    assert values["cu_seq_lens"].shape == (slots + 1,)
    assert values["input_ids"][0, :7].eq(5).all() and values["input_ids"][0, 7:27].eq(7).all()
    assert values["input_ids"][0, 27:].eq(0).all() and values["labels"][0, 27:].eq(IGNORE).all()
    bounds = values["cu_seq_lens"].tolist()
    assert bounds[:3] == [0, 7, 27] and bounds[-1] == capacity and bounds == sorted(bounds)
    assert max(b - a for a, b in itertools.pairwise(bounds[2:])) <= PAD_ROW_TOKENS
    assert values["position_ids"][0, 27].item() == 0  # padding rows start their own positions
    # The targets are the rows' own: the same count as the batch's.
    assert (values["labels"][0, 1:] != IGNORE).sum() == (batch["labels"][0, [*range(7), *range(157, 177)]][1:]
                                                          != IGNORE).sum()


def test_bin_sizes_are_every_size_a_bin_can_take():
    assert bin_sizes(4096) == [1024, 2048, 3072, 4096]
    assert bin_sizes(2048) == [512, 1024, 1536, 2048]
    assert bin_sizes(4000) == [960, 1920, 2880, 3840, 4000]
    for capacity in (256, 2048, 4000, 4096):
        assert sorted({bin_size(n, capacity) for n in range(1, capacity + 1)}) == bin_sizes(capacity)


def test_capturing_ahead_does_nothing_without_cuda():
    weight = torch.nn.Parameter(torch.ones(4))
    step = GraphedForwardBackward(lambda b: (b["input_ids"].float() * weight).sum(), [weight], capture=False)
    step({"input_ids": torch.ones(4, dtype=torch.long)}, 1)
    assert step.capture_ahead([4, 8], lambda size: row_slots(size, 2), pad_id=0) == 0
    assert step.describe()["captured_ahead"] == 0 and not step.graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs run on CUDA only")
def test_graphs_captured_ahead_give_the_eager_gradients():
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(50, 16, device="cuda")
    head = torch.nn.Linear(16, 50, device="cuda")
    params = [*embedding.parameters(), *head.parameters()]

    def loss_fn(buffers):
        logits = head(embedding(buffers["input_ids"][0]) * buffers["position_ids"][0, :, None].float().add(1).log())
        return torch.nn.functional.cross_entropy(logits, buffers["labels"][0], ignore_index=IGNORE,
                                                 reduction="sum") / buffers["count"]

    rows = [{"input_ids": [3 + i % 40] * n, "labels": [4 + i % 40] * n} for i, n in enumerate((30, 100, 120, 60))]
    batch = {key: value.cuda() if torch.is_tensor(value) else value for key, value in PackedCollator()(rows).items()}
    capacity, max_rows = 256, 4
    bins = [[0], [1, 2], [3]]  # sizes 64, 256 (ahead), 64

    def values(rows):
        layout = BinLayout(batch["row_lengths"], rows, bin_size(sum(batch["row_lengths"][r] for r in rows), capacity),
                           row_slots(bin_size(sum(batch["row_lengths"][r] for r in rows), capacity), max_rows))
        return bin_tensors(batch, layout, pad_id=0)

    eager = GraphedForwardBackward(loss_fn, params, capture=False)
    for rows_of_bin in bins:
        eager(values(rows_of_bin), 7)
    expected = [param.grad.clone() for param in params]
    for param in params:
        param.grad = None
    unused = torch.nn.Parameter(torch.ones(3, device="cuda"))  # trained, but without a gradient so far
    graphed = GraphedForwardBackward(loss_fn, [*params, unused])
    graphed(values(bins[0]), 7)  # the eager warm-up bin
    with torch.no_grad():  # as inside an optimizer step
        assert graphed.capture_ahead(bin_sizes(capacity), lambda size: row_slots(size, max_rows), pad_id=0) == 4
    assert unused.grad is None  # the optimizer step that runs meanwhile must not see a zero gradient
    assert graphed.replays == 0  # captured, not run: the gradients are still the warm-up bin's
    for rows_of_bin in bins[1:]:
        graphed(values(rows_of_bin), 7)
    assert graphed.replays == 2 and graphed.describe()["failure"] is None
    for param, grad in zip(params, expected, strict=True):
        torch.testing.assert_close(param.grad, grad)


def test_eager_bins_accumulate_into_the_same_gradients():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4))
    step = GraphedForwardBackward(lambda b: (b["input_ids"].float() * weight).sum() / b["count"], [weight],
                                  capture=False)
    ones = {"input_ids": torch.ones(4, dtype=torch.long)}
    loss = step(ones, 2) + step({"input_ids": torch.full((4,), 3, dtype=torch.long)}, torch.tensor(2))
    assert loss.item() == pytest.approx(weight.sum().item() * 2)
    assert torch.equal(weight.grad, torch.full((4,), 2.0))  # (1 + 3) / 2
    assert step.describe() == {"captured": False, "sizes": [], "eager_bins": 2, "replays": 0, "failure": None,
                               "warmup_s": 0.0, "capture_s": 0.0, "captured_ahead": 0,
                               "capture_ahead_s": 0.0}  # CPU: no warm-up before a capture
    assert len(step.buffers) == 1  # one size: one set of static buffers


@pytest.mark.parametrize("kind", ["qlora", "galore"])
def test_binned_training_gives_the_loss_curve_of_the_rows_as_they_come(smoke, tmp_path, kind):
    config, run_dir = smoke
    method = config.method(kind)
    lora = replace(method.lora, dropout=0.0)
    # Three steps: the third's loss shows the second's update, made from gradients the first's were zeroed for.
    method = replace(method, max_steps=3, lora=lora, padding_free=True)
    plain = train_method(config, run_dir, kind, method=method, out=tmp_path / "plain")
    # Bins of one full-length row: the smoke batch's rows spread over several bins.
    binned = train_method(config, run_dir, kind, method=replace(method, graph_tokens=config.data.max_seq_length),
                          out=tmp_path / "binned")
    curve = [p["loss"] for p in binned["loss_curve"]]
    assert curve == pytest.approx([p["loss"] for p in plain["loss_curve"]], rel=1e-5)
    assert binned["tokens_trained"] == plain["tokens_trained"]
    graphs = binned["execution"]["graphs"]
    assert graphs["eager_bins"] >= 2 * method.grad_accum and not graphs["captured"]  # CPU: eager bins
    assert (graphs["fused_lora_layers"] > 0) == (kind == "qlora")  # adapters added by one addmm
    assert binned["execution"]["liger_cross_entropy"] is False  # CPU: the torch loss
    assert binned["execution"]["graph_tokens"] == config.data.max_seq_length
    assert not binned["execution"]["cuda_graphs"]


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("trains", [False, True])
def test_loss_with_gradients_in_forward_equals_the_recomputed_one(softcap, trains):
    from peftlab.train.loss import target_token_loss_sum
    from peftlab.train.vocab_loss import forward_gradient_loss

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=generator)
    targets = torch.randint(0, 40, (50,), generator=generator)
    targets[::3] = IGNORE
    count = (targets != IGNORE).sum()
    results = []
    for fused in (False, True):
        lm_head = torch.nn.Linear(16, 40, bias=False)
        with torch.no_grad():
            lm_head.weight.copy_(torch.randn(40, 16, generator=torch.Generator().manual_seed(1)))
        lm_head.weight.requires_grad_(trains)
        h = hidden.clone().requires_grad_()
        if fused:
            loss = forward_gradient_loss(h, targets, lm_head, count, softcap, chunk=16)
        else:
            loss = target_token_loss_sum(h, targets, lm_head, softcap, chunk=16) / count
        loss.backward()
        results.append((loss.detach(), h.grad, lm_head.weight.grad))
    (loss, grad, weight_grad), (fused_loss, fused_grad, fused_weight_grad) = results
    torch.testing.assert_close(fused_loss, loss)
    torch.testing.assert_close(fused_grad, grad)
    if trains:
        torch.testing.assert_close(fused_weight_grad, weight_grad)
    else:
        assert fused_weight_grad is None and weight_grad is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="liger-kernel's Triton cross-entropy runs on CUDA only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("trains", [False, True])
def test_the_triton_cross_entropy_gives_the_torch_loss_and_gradients(dtype, softcap, trains, monkeypatch):
    from peftlab.train import vocab_loss

    if vocab_loss._liger_kernel() is None:
        pytest.skip("liger-kernel is not installed (pip install 'peftlab[gpu]')")
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 64, generator=generator).cuda().to(dtype)
    targets = torch.randint(0, 1000, (300,), generator=generator).cuda()
    targets[::3] = IGNORE
    count = (targets != IGNORE).sum()
    weight = (torch.randn(1000, 64, generator=torch.Generator().manual_seed(1)) / 4).cuda().to(dtype)
    calls = []
    kernel = vocab_loss._liger_kernel()
    results = []
    for fused in (False, True):
        monkeypatch.setattr(vocab_loss, "_liger_kernel", (lambda: calls.append(1) or kernel) if fused else lambda: None)
        lm_head = torch.nn.Linear(64, 1000, bias=False, device="cuda", dtype=dtype)
        with torch.no_grad():
            lm_head.weight.copy_(weight)
        lm_head.weight.requires_grad_(trains)
        h = hidden.clone().requires_grad_()
        loss = vocab_loss.forward_gradient_loss(h, targets, lm_head, count, softcap, chunk=128)
        loss.backward()
        # Copies (`.float()` of an fp32 tensor is the tensor itself): the check below adds to this `.grad`.
        results.append((loss.detach(), h.grad.float().clone(),
                        None if lm_head.weight.grad is None else lm_head.weight.grad.float().clone()))
    assert calls, "the Triton kernel was not used"
    calls.clear()
    h = hidden.clone().requires_grad_()
    vocab_loss.forward_gradient_loss(h, targets, lm_head, count, softcap, chunk=128, triton=False).backward()
    assert not calls  # liger turned off in the YAML: the torch loss
    (loss, grad, weight_grad), (fused_loss, fused_grad, fused_weight_grad) = results
    tolerance = {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-4}
    torch.testing.assert_close(fused_loss, loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused_grad, grad, **tolerance)
    if trains:
        torch.testing.assert_close(fused_weight_grad, weight_grad, **tolerance)
