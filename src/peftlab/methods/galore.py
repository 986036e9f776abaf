"""GaLore: all weights train; the gradients of the targeted 2-D projections (default: attention and
MLP) are projected to rank r before the Adam update (galore-torch's GaLoreAdamW; the rank-r basis
from `galore_basis` unless `galore.projection: svd`), every other
parameter gets plain AdamW. Variants: `adamw`, `adamw8bit`, and `layerwise` (the update runs
inside backward, one parameter at a time, so no full gradient set is ever held); `accumulate:
projected` sums micro-batches' gradients at rank r instead of at full size (`galore_projected`)."""

from __future__ import annotations

from torch import nn

from peftlab.errors import UserError
from peftlab.methods import BuildContext, Recipe
from peftlab.models import load_model


def target_parameter_names(model: nn.Module, targets: list[str]) -> list[str]:
    """Weights of nn.Linear / nn.Embedding modules whose qualified name contains one of `targets`,
    each named as `named_parameters` names it (a tied output projection is its embedding). Every
    target must match a layer: module names differ between architectures (`self_attn` / `mlp` in
    Llama, Qwen2, Gemma; `attn` / `mlp` in GPT-2), and a target that matches nothing is a typo."""
    names = {id(p): n for n, p in model.named_parameters()}
    layers = [(module_name, module) for module_name, module in model.named_modules()
              if isinstance(module, nn.Linear | nn.Embedding) and id(module.weight) in names]
    unmatched = [t for t in targets if not any(t in module_name for module_name, _ in layers)]
    if unmatched:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        blocks = sorted({part for name, _ in layers for part in name.split(".")[:-1] if not part.isdigit()})
        raise UserError(f"galore.targets {unmatched}: no linear or embedding layer of this {model_type} model has"
                        f" that in its name (its layers sit under: {', '.join(blocks)})")
    chosen = dict.fromkeys(names[id(module.weight)] for module_name, module in layers
                           if any(t in module_name for t in targets))
    return list(chosen)


def split_parameters(model: nn.Module, ctx: BuildContext) -> tuple[list, list, list]:
    """Trained parameters: projected (GaLore targets), other matrices (weight decay), the rest (none)."""
    targets = set(target_parameter_names(model, ctx.method.galore.targets))
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return ([p for n, p in trained if n in targets],
            [p for n, p in trained if n not in targets and p.dim() >= 2],
            [p for n, p in trained if n not in targets and p.dim() < 2])


def param_groups(model: nn.Module, ctx: BuildContext) -> list[dict]:
    settings = ctx.method.galore
    projected, decayed, plain = split_parameters(model, ctx)
    groups = [
        {"params": projected, "rank": settings.rank, "update_proj_gap": settings.update_proj_gap,
         "scale": settings.scale, "proj_type": settings.proj_type, "weight_decay": ctx.method.weight_decay},
        {"params": decayed, "weight_decay": ctx.method.weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def projected_accumulation(model: nn.Module, ctx: BuildContext) -> Recipe:
    """`galore.accumulate: projected` (see `galore_projected`); clips gradients itself."""
    from peftlab.methods.galore_projected import ProjectedGaLore, route_embedding_gradient

    settings = ctx.method.galore  # several processes: refused by train.launch before any work
    projected, decayed, plain = split_parameters(model, ctx)
    others = [group for group in ({"params": decayed, "weight_decay": ctx.method.weight_decay},
                                  {"params": plain, "weight_decay": 0.0}) if group["params"]]
    optimizer = ProjectedGaLore(projected, others, lr=ctx.method.lr, rank=settings.rank,
                                update_proj_gap=settings.update_proj_gap, scale=settings.scale,
                                weight_decay=ctx.method.weight_decay, max_grad_norm=ctx.method.max_grad_norm,
                                eight_bit=settings.variant == "adamw8bit", projection=settings.projection)
    embedding = model.get_input_embeddings()
    if any(p is embedding.weight for p in projected):
        try:
            route_embedding_gradient(embedding, optimizer)
        except TypeError as error:
            raise UserError(f"galore.accumulate projected with the embedding as a target: {error}") from None
    notes = {"galore_targets": len(projected), "galore_accumulate": "projected", "galore_projection": settings.projection}
    return Recipe(model=model, saves="full", optimizer_name=f"galore_{settings.variant}_projected",
                  optimizer=optimizer, galore_projection=settings.projection, clips_gradients=True, notes=notes)


def build(ctx: BuildContext) -> Recipe:
    try:
        import galore_torch
    except ImportError:
        raise UserError("galore needs galore-torch: pip install 'peftlab[methods]'") from None
    model = load_model(ctx.model, device=ctx.device, dtype=ctx.dtype, source=ctx.source)
    settings = ctx.method.galore
    notes = {"galore_targets": len(target_parameter_names(model, settings.targets))}
    notes["galore_projection"] = settings.projection
    if settings.variant == "layerwise":
        # transformers builds the per-parameter optimizers and their hooks for this optim name; it saves
        # none of their states, so a checkpoint cannot resume them.
        return Recipe(model=model, saves="full", optimizer_name="galore_adamw_layerwise",
                      trainer_optim="galore_adamw_layerwise",
                      trainer_optim_args=(f"rank={settings.rank}, update_proj_gap={settings.update_proj_gap},"
                                          f" scale={settings.scale}, proj_type={settings.proj_type}"),
                      trainer_optim_targets=list(settings.targets), galore_projection=settings.projection,
                      resumable=False, notes=notes)
    if settings.accumulate == "projected":  # bitsandbytes' own 8-bit Adam: it has CPU kernels too
        return projected_accumulation(model, ctx)
    if settings.variant == "adamw8bit" and ctx.device != "cuda":
        raise UserError("galore.variant adamw8bit needs a CUDA GPU (galore-torch's 8-bit GaLore calls"
                        " torch.cuda.synchronize); use adamw, or accumulate: projected")
    from peftlab.methods.galore_foreach import ForeachGaLoreAdamW

    optimizer_class = galore_torch.GaLoreAdamW8bit if settings.variant == "adamw8bit" else ForeachGaLoreAdamW
    # GaLoreAdamW subclasses transformers' deprecated AdamW and warns unless told not to (its own API).
    extra = {} if settings.variant == "adamw8bit" else {"no_deprecation_warning": True}
    if optimizer_class is ForeachGaLoreAdamW and settings.projection == "gram":
        # Bases in 4 threads: 1.38 s instead of 1.76 s for Gemma-3-1B's first refresh on an H100
        # (benchmarks/results/h100-2026-12-06-projection.json); the same bases.
        extra["refresh"] = "threads"
    optimizer = optimizer_class(param_groups(model, ctx), lr=ctx.method.lr, **extra)
    if settings.projection == "gram":
        from peftlab.methods.galore_basis import seed_projectors

        seed_projectors(optimizer)
    return Recipe(model=model, saves="full", optimizer_name=f"galore_{settings.variant}", optimizer=optimizer,
                  galore_projection=settings.projection, notes=notes)
