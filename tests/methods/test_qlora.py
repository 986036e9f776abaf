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
