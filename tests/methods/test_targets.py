"""LoRA and GaLore targets resolve by module name on each architecture; a target that matches nothing
is one clear error naming it and the model's own layer names."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peftlab.config import LoraSettings
from peftlab.errors import UserError
from peftlab.methods.galore import target_parameter_names
from peftlab.methods.lora import check_targets, lora_config

TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
            vocab_size=128, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny(model_type: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**TINY, **extra}))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text"])
def test_the_default_lora_targets_name_every_projection_of_these_families(model_type):
    model = tiny(model_type, head_dim=8)
    check_targets(model, LoraSettings().target_modules)
    adapted = get_peft_model(model, lora_config(LoraSettings(r=2, alpha=4)))
    assert sum("lora_A" in name for name, _ in adapted.named_parameters()) == 2 * 7


def test_a_lora_target_that_matches_nothing_names_the_models_layers():
    phi3 = tiny("phi3")
    with pytest.raises(UserError) as error:
        check_targets(phi3, LoraSettings().target_modules)
    message = str(error.value)
    assert "['q_proj', 'k_proj', 'v_proj', 'gate_proj', 'up_proj']" in message and "phi3" in message
    assert "qkv_proj" in message and "gate_up_proj" in message and "all-linear" in message
    with pytest.raises(UserError, match=r"\['qkv_proj'\]"):
        check_targets(tiny("llama"), ["q_proj", "qkv_proj"])


@pytest.mark.parametrize("model_type", ["phi3", "llama"])
def test_all_linear_adapts_each_architectures_own_layers(model_type):
    model = tiny(model_type)
    settings = LoraSettings(r=2, alpha=4, target_modules=["all-linear"])
    check_targets(model, settings.target_modules)
    adapted = get_peft_model(model, lora_config(settings))
    adapted_layers = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in adapted.named_parameters()
                      if "lora_A" in name}
    assert "lm_head" not in adapted_layers
    assert adapted_layers == ({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} if model_type == "phi3" else
                              {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


def test_galore_targets_must_each_match_a_layer():
    llama = tiny("llama")
    assert len(target_parameter_names(llama, ["attn", "mlp"])) == 2 * 7
    with pytest.raises(UserError) as error:
        target_parameter_names(llama, ["attn", "feed_forward"])
    assert "['feed_forward']" in str(error.value) and "self_attn" in str(error.value) and "mlp" in str(error.value)
