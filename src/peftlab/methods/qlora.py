"""QLoRA: the base quantised to 4-bit NF4 (bitsandbytes, double quantisation), LoRA adapters on top,
paged 8-bit AdamW; only the adapters train (report section 5, Appendix A)."""

from __future__ import annotations

import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig

from peftlab.methods import BuildContext, Recipe
from peftlab.methods.lora import lora_config
from peftlab.models import load_model


def quantization_config(ctx: BuildContext) -> tuple[BitsAndBytesConfig, torch.dtype]:
    quant = ctx.method.quant
    compute = getattr(torch, quant.compute_dtype)
    if ctx.device == "cpu" and compute == torch.float16:
        compute = torch.float32  # fp16 matmuls are not a CPU path; the config's value applies on GPU
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute,
    )
    return config, compute


def build(ctx: BuildContext) -> Recipe:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        from peftlab.errors import UserError

        raise UserError("qlora needs bitsandbytes: pip install 'peftlab[methods]'") from None
    config, compute = quantization_config(ctx)
    model = load_model(ctx.model, device=ctx.device, dtype=ctx.dtype, source=ctx.source,
                       quantization_config=config)
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=ctx.method.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    model = get_peft_model(model, lora_config(ctx.method.lora))
    optim = "paged_adamw_8bit" if ctx.method.optimizer == "auto" else ctx.method.optimizer
    return Recipe(model=model, optim=optim, saves="adapter", notes={"compute_dtype": str(compute).removeprefix("torch.")})
