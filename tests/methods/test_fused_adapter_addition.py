"""LoRA layers that add their adapter's output with one addmm give PEFT's outputs and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peftlab.methods.lora import fuse_adapter_additions


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up_proj = torch.nn.Linear(12, 20)
        self.down_proj = torch.nn.Linear(20, 12, bias=False)

    def forward(self, x):
        return self.down_proj(torch.tanh(self.up_proj(x)))


def _models(dropout: float = 0.0):
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["up_proj", "down_proj"])
    model = get_peft_model(_Block(), config)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)  # PEFT starts B at zero: the adapter's path would add nothing
    return model, copy.deepcopy(model)


def _output_and_grads(model, x):
    model.zero_grad()
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_same_outputs_and_gradients_as_peft(dropout):
    peft_model, fused = _models(dropout)
    assert fuse_adapter_additions(fused) == 2
    assert fuse_adapter_additions(fused) == 0  # once per layer
    x = torch.randn(3, 5, 12)
    torch.manual_seed(1)
    expected, expected_grads = _output_and_grads(peft_model, x)
    torch.manual_seed(1)  # the same dropout masks
    got, grads = _output_and_grads(fused, x)
    torch.testing.assert_close(got, expected)
    assert grads.keys() == expected_grads.keys() and len(grads) == 4
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], msg=name)


def test_disabled_or_merged_adapters_take_peft_forward():
    peft_model, fused = _models()
    fuse_adapter_additions(fused)
    x = torch.randn(2, 12)
    with fused.disable_adapter(), peft_model.disable_adapter():
        torch.testing.assert_close(fused(x), peft_model(x))
        torch.testing.assert_close(fused(x), fused.get_base_model()(x))
    fused.merge_adapter()
    torch.testing.assert_close(fused(x), peft_model(x))


def test_bf16_autocast_adds_in_one_rounding():
    peft_model, fused = _models()
    fuse_adapter_additions(fused)
    x = torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = fused(x), peft_model(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def _fp32_forward(linear):
    def forward(x):
        with torch.autocast("cpu", enabled=False):  # a base layer that computes in fp32 under autocast
            return torch.nn.functional.linear(x.float(), linear.weight, linear.bias)
    return forward


def test_an_fp32_base_output_under_autocast_is_not_rounded():
    peft_model, fused = _models()
    fuse_adapter_additions(fused)
    for model in (peft_model, fused):
        base = model.base_model.model.up_proj.base_layer
        base.forward = _fp32_forward(base)
    x = torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused.base_model.model.up_proj(x)
        expected = peft_model.base_model.model.up_proj(x)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected)
