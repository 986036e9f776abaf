"""Full fine-tuning with AdamW: every parameter trains (the natural upper baseline)."""

from __future__ import annotations

from peftlab.methods import BuildContext, Recipe
from peftlab.models import load_model


def build(ctx: BuildContext) -> Recipe:
    model = load_model(ctx.model, device=ctx.device, dtype=ctx.dtype, source=ctx.source)
    optim = "adamw_torch" if ctx.method.optimizer == "auto" else ctx.method.optimizer
    return Recipe(model=model, saves="full", optimizer_name=optim, trainer_optim=optim)
