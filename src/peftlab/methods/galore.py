"""GaLore: all weights train; the gradients of the targeted 2-D projections (default: attention and
MLP) are projected to rank r before the Adam update (galore-torch's GaLoreAdamW), every other
parameter gets plain AdamW. Variants: `adamw`, `adamw8bit`, and `layerwise` (the update runs
inside backward, one parameter at a time, so no full gradient set is ever held)."""

from __future__ import annotations

import os

from torch import nn

from peftlab.errors import UserError
from peftlab.methods import BuildContext, Recipe
from peftlab.models import load_model


def target_parameter_names(model: nn.Module, targets: list[str]) -> list[str]:
    """Weights of nn.Linear modules whose qualified name contains one of `targets`."""
    names = [
        f"{module_name}.weight"
        for module_name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(t in module_name for t in targets)
    ]
    if not names:
        raise UserError(f"galore.targets {targets}: no linear layer of the model matches")
    return names


def param_groups(model: nn.Module, ctx: BuildContext) -> list[dict]:
    settings = ctx.method.galore
    targets = set(target_parameter_names(model, settings.targets))
    projected = [p for n, p in model.named_parameters() if n in targets and p.requires_grad]
    decayed = [p for n, p in model.named_parameters() if n not in targets and p.requires_grad and p.dim() >= 2]
    plain = [p for n, p in model.named_parameters() if n not in targets and p.requires_grad and p.dim() < 2]
    groups = [
        {"params": projected, "rank": settings.rank, "update_proj_gap": settings.update_proj_gap,
         "scale": settings.scale, "proj_type": settings.proj_type, "weight_decay": ctx.method.weight_decay},
        {"params": decayed, "weight_decay": ctx.method.weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def build(ctx: BuildContext) -> Recipe:
    try:
        import galore_torch
    except ImportError:
        raise UserError("galore needs galore-torch: pip install 'peftlab[methods]'") from None
    model = load_model(ctx.model, device=ctx.device, dtype=ctx.dtype, source=ctx.source)
    settings = ctx.method.galore
    notes = {"galore_targets": len(target_parameter_names(model, settings.targets))}
    if settings.variant == "layerwise":
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise UserError("galore.variant layerwise is single-GPU (its updates run inside backward); use adamw with --gpus")
        if ctx.method.grad_accum != 1:
            raise UserError("galore.variant layerwise updates inside backward: set grad_accum: 1 for this method")
        # transformers builds the per-parameter optimizers and their hooks for this optim name.
        notes["optim_args"] = (f"rank={settings.rank}, update_proj_gap={settings.update_proj_gap},"
                               f" scale={settings.scale}, proj_type={settings.proj_type}")
        notes["optim_target_modules"] = list(settings.targets)
        return Recipe(model=model, optim="galore_adamw_layerwise", saves="full", notes=notes)
    if settings.variant == "adamw8bit" and ctx.device != "cuda":
        raise UserError("galore.variant adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit GaLore kernels); use adamw")
    optimizer_class = galore_torch.GaLoreAdamW8bit if settings.variant == "adamw8bit" else galore_torch.GaLoreAdamW
    optimizer = optimizer_class(param_groups(model, ctx), lr=ctx.method.lr)
    return Recipe(model=model, optimizer=optimizer, optim=f"galore_{settings.variant}", saves="full", notes=notes)
