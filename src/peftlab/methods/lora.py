"""LoRA on a bf16 (GPU) / fp32 (CPU) base: frozen base weights, trainable low-rank adapters.

`lora.target_modules` names modules as peft matches them (a module whose name is, or ends with `.`
+, the target: `q_proj` is every layer's `...self_attn.q_proj`), or is `[all-linear]` (peft picks
every linear layer but the output head, whatever the architecture calls them). Each named target
must match a layer of the model: Llama, Qwen2, Mistral and Gemma share `q_proj` ... `down_proj`,
other families name them differently (Phi-3: `qkv_proj`, `gate_up_proj`; GPT-2: `c_attn`, `c_fc`).
"""

from __future__ import annotations

import torch
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


def fuse_adapter_additions(model: nn.Module) -> int:
    """Give every PEFT LoRA linear layer (plain or bitsandbytes 4-bit) a forward that adds its adapter's
    output with one `addmm` (base + scaling * B(A(dropout(x)))) instead of a matmul, a scaling multiply
    and an addition: two full-size element-wise passes fewer in forward and one in backward per layer
    (besides the 4-bit layer's defensive copy of the base output), with one rounding instead of three.
    Anything but a single plain adapter (DoRA, several adapters, merged, an adapter bias, dtypes that
    differ outside autocast) runs PEFT's own forward. Returns the number of layers given it."""
    import types

    from peft.tuners.lora import layer as lora_layers

    kinds: tuple[type, ...] = (lora_layers.Linear,)
    try:
        from peft.tuners.lora.bnb import Linear4bit

        kinds += (Linear4bit,)
    except ImportError:  # bitsandbytes not installed
        pass
    count = 0
    for module in model.modules():
        if isinstance(module, kinds) and "forward" not in vars(module):
            module.forward = types.MethodType(_forward_with_fused_addition, module)
            count += 1
    return count


def _forward_with_fused_addition(self, x, *args, **kwargs):
    names = self.active_adapters
    name = names[0] if len(names) == 1 else None
    plain = (name is not None and not args and not kwargs and not self.disable_adapters and not self.merged
             and name in self.lora_A and name not in getattr(self, "lora_variant", {})
             and self.lora_B[name].bias is None)
    autocast = torch.is_autocast_enabled(x.device.type)
    if plain and not autocast:
        plain = x.dtype == self.lora_A[name].weight.dtype == self.lora_B[name].weight.dtype
    if not plain:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    hidden = self.lora_A[name](self.lora_dropout[name](x))
    if autocast and result.dtype != torch.get_autocast_dtype(x.device.type):
        # addmm would round this base output to autocast's dtype: add as PEFT does instead.
        return result + self.lora_B[name](hidden) * self.scaling[name]
    added = torch.addmm(result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]),
                        self.lora_B[name].weight.t(), alpha=self.scaling[name])
    return added.view(result.shape).to(result.dtype)
