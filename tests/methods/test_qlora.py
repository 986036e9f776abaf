"""The QLoRA recipe's preparation: frozen base, no fp32 upcast of the non-quantised weights."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from peftlab.methods.qlora import freeze_base
from peftlab.models import read_model_config


def test_freeze_base_keeps_the_embedding_in_the_model_dtype():
    config = AutoConfig.for_model(**read_model_config("builtin:tiny-gemma3"))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = freeze_base(model, gradient_checkpointing=True)
    assert not any(p.requires_grad for p in model.parameters())
    # peft's prepare_model_for_kbit_training would make these float32 (twice the embedding memory).
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # Checkpointed adapters need a gradient path from the (frozen) embedding output.
    ids = torch.tensor([[2, 5, 7]])
    assert model.get_input_embeddings()(ids).requires_grad


def test_uncast_adapter_inputs_give_the_same_logits_under_bf16_autocast():
    from peft import LoraConfig, get_peft_model

    from peftlab.train.trainer import adapter_inputs_uncast

    torch.manual_seed(0)
    config = AutoConfig.for_model(**read_model_config("builtin:tiny-gemma3"))
    base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    model.eval()
    assert next(p for n, p in model.named_parameters() if "lora_A" in n).dtype == torch.float32
    ids = torch.tensor([[2, 17, 99, 5, 42]])
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        cast = model(input_ids=ids).logits
        with adapter_inputs_uncast(model, autocast_bf16=True):
            layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
            assert layers and not any(m.cast_input_dtype_enabled for m in layers)
            uncast = model(input_ids=ids).logits
    assert all(m.cast_input_dtype_enabled for m in layers)  # restored afterwards
    assert torch.equal(cast, uncast)
    with adapter_inputs_uncast(model, autocast_bf16=False):
        assert all(m.cast_input_dtype_enabled for m in layers)
