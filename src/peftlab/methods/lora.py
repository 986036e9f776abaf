"""LoRA on a bf16 (GPU) / fp32 (CPU) base: frozen base weights, trainable low-rank adapters."""

from __future__ import annotations

from peft import LoraConfig, get_peft_model

from peftlab.config import LoraSettings
from peftlab.methods import BuildContext, Recipe
from peftlab.models import load_model


def lora_config(settings: LoraSettings) -> LoraConfig:
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def build(ctx: BuildContext) -> Recipe:
    model = load_model(ctx.model, device=ctx.device, dtype=ctx.dtype, source=ctx.source)
    if ctx.method.gradient_checkpointing:
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(ctx.method.lora))
    optim = "adamw_torch" if ctx.method.optimizer == "auto" else ctx.method.optimizer
    return Recipe(model=model, saves="adapter", optimizer_name=optim, trainer_optim=optim)
