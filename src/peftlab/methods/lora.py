"""LoRA on a bf16 (GPU) / fp32 (CPU) base: frozen base weights, trainable low-rank adapters.

`lora.target_modules` names modules as peft matches them (a module whose name is, or ends with `.`
+, the target: `q_proj` is every layer's `...self_attn.q_proj`), or is `[all-linear]` (peft picks
every linear layer but the output head, whatever the architecture calls them). Each named target
must match a layer of the model: Llama, Qwen2, Mistral and Gemma share `q_proj` ... `down_proj`,
other families name them differently (Phi-3: `qkv_proj`, `gate_up_proj`; GPT-2: `c_attn`, `c_fc`).
"""

from __future__ import annotations

from peft import LoraConfig, get_peft_model
from torch import nn

from peftlab.config import LoraSettings
from peftlab.errors import UserError
from peftlab.methods import BuildContext, Recipe
from peftlab.models import load_model

ALL_LINEAR = "all-linear"


def lora_config(settings: LoraSettings) -> LoraConfig:
    targets = list(settings.target_modules)
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """Every named target matches a module (peft itself only refuses when none does)."""
    if list(targets) == [ALL_LINEAR]:
        return
    names = [name for name, _ in model.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unmatched:
        from transformers.pytorch_utils import Conv1D

        layers = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D)})
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise UserError(f"lora.target_modules {unmatched}: no module of this {model_type} model has that name (its"
                        f" linear layers: {', '.join(layers)}); name those, or use target_modules: [{ALL_LINEAR}]")


def build(ctx: BuildContext) -> Recipe:
    model = load_model(ctx.model, device=ctx.device, dtype=ctx.dtype, source=ctx.source)
    check_targets(model, ctx.method.lora.target_modules)
    if ctx.method.gradient_checkpointing:
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(ctx.method.lora))
    optim = "adamw_torch" if ctx.method.optimizer == "auto" else ctx.method.optimizer
    return Recipe(model=model, saves="adapter", optimizer_name=optim, trainer_optim=optim)
