"""QLoRA: the base quantised to 4-bit NF4 (bitsandbytes, double quantisation), LoRA adapters on top,
paged 8-bit AdamW; only the adapters train (report section 5, Appendix A)."""

from __future__ import annotations

import types

import torch
from peft import get_peft_model
from transformers import BitsAndBytesConfig

from peftlab.methods import BuildContext, Recipe
from peftlab.methods.lora import check_targets, lora_config
from peftlab.models import load_model


def quantization_config(ctx: BuildContext) -> tuple[BitsAndBytesConfig, torch.dtype]:
    quant = ctx.method.quant
    compute = getattr(torch, quant.compute_dtype)
    if ctx.device == "cpu" and compute != torch.float32:
        compute = ctx.dtype  # half-precision matmuls are not a CPU path; the config's value applies on GPU
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute,
        # FSDP flattens parameters of one dtype: pack the 4-bit weights into the model's dtype.
        **({"bnb_4bit_quant_storage": ctx.dtype} if ctx.fsdp else {}),
    )
    return config, compute


def freeze_base(model, gradient_checkpointing: bool):
    """peft's `prepare_model_for_kbit_training` minus its upcast of every non-quantised weight to fp32:
    that upcast makes the 262k x 1152 tied embedding 1.2 GB instead of 0.6 GB and computes the
    vocabulary logits from fp32 weights. The LoRA weights are still fp32 (peft's adapter autocast),
    RMSNorm computes in fp32 internally, and the Trainer turns checkpointing on."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def keep_dequantized_weights(model) -> int:
    """`dequantized_base`: give every bitsandbytes 4-bit linear layer a copy of its weight dequantized
    once to its compute dtype, and a forward that multiplies by that copy.

    bitsandbytes' training matmul computes `linear(x.to(compute), dequantize_4bit(W).to(compute))`
    (for more than a few rows; the fused small-batch kernel serves inference), so the numbers are the
    same (tested bitwise against bitsandbytes' forward and backward), minus one dequantize kernel per
    layer and pass. The copy is a plain attribute: not a parameter, not saved, not trained. Returns
    the number of layers given a copy."""
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and not hasattr(module, "dequantized_weight"):
            state = module.weight.quant_state
            dtype = module.compute_dtype or state.dtype
            module.dequantized_weight = bnb.functional.dequantize_4bit(module.weight.data, state).to(dtype)
            module.forward = types.MethodType(_dequantized_forward, module)
            count += 1
    return count


def _dequantized_forward(self, x: torch.Tensor) -> torch.Tensor:
    weight = self.dequantized_weight
    bias = None if self.bias is None else self.bias.to(weight.dtype)
    return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def build(ctx: BuildContext) -> Recipe:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        from peftlab.errors import UserError

        raise UserError("qlora needs bitsandbytes: pip install 'peftlab[methods]'") from None
    config, compute = quantization_config(ctx)
    model = load_model(ctx.model, device=ctx.device, dtype=ctx.dtype, source=ctx.source,
                       quantization_config=config)
    check_targets(model, ctx.method.lora.target_modules)
    model = freeze_base(model, ctx.method.gradient_checkpointing)
    model = get_peft_model(model, lora_config(ctx.method.lora))
    # bitsandbytes' optimizers cannot step FSDP's sharded (DTensor) parameters; it pages GPU memory only
    # (on CPU its paged AdamW warns and runs as the plain 8-bit one).
    auto = "adamw_torch" if ctx.fsdp else ("paged_adamw_8bit" if ctx.device == "cuda" else "adamw_8bit")
    optim = auto if ctx.method.optimizer == "auto" else ctx.method.optimizer
    notes = {"compute_dtype": str(compute).removeprefix("torch.")}
    if ctx.method.dequantized_base:
        notes["dequantized_layers"] = keep_dequantized_weights(model)
    return Recipe(model=model, saves="adapter", optimizer_name=optim, trainer_optim=optim, notes=notes)
