"""One small recipe per fine-tuning method; each turns a config into a model ready to train.

`build(kind)` returns the recipe's `build(context) -> Recipe` function. A recipe decides how the
model is loaded (dtype, quantisation), which parameters train, and which optimizer steps them;
the training loop (`peftlab.train`) is the same for all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from peftlab.config import MethodConfig, ModelConfig


@dataclass
class BuildContext:
    model: ModelConfig
    method: MethodConfig
    device: str
    dtype: Any
    # A directory to start from instead of `model:` (the previous stage of a hybrid).
    source: str | None = None
    # Weights sharded over processes (FSDP): quantised weights are stored in the model dtype.
    fsdp: bool = False


@dataclass
class Recipe:
    """What a recipe hands the training loop: the model, how its optimizer is made, what it saves."""

    model: Any
    saves: str  # "adapter" (PEFT adapters) or "full" (all weights)
    # The optimizer as recorded in metrics.json, e.g. "paged_adamw_8bit", "galore_adamw8bit_projected".
    optimizer_name: str
    # A ready optimizer, or None to let the Trainer build `trainer_optim` by name.
    optimizer: Any = None
    trainer_optim: str = "adamw_torch"
    # transformers' `optim_args` / `optim_target_modules` for optimizers it builds (layer-wise GaLore).
    trainer_optim_args: str | None = None
    trainer_optim_targets: list[str] | None = None
    # `galore.projection` of a GaLore optimizer: its projectors are seeded / restored by the Trainer.
    galore_projection: str | None = None
    # The optimizer applies `max_grad_norm` itself (its gradients are not all in `.grad`).
    clips_gradients: bool = False
    # False when a checkpoint cannot restore the optimizer (transformers saves no per-weight states).
    resumable: bool = True
    # Facts for the report only (counts, dtypes); never read by the training loop.
    notes: dict[str, Any] = field(default_factory=dict)


def build(kind: str) -> Callable[[BuildContext], Recipe]:
    from peftlab.methods import full, galore, lora, qlora

    recipes = {"qlora": qlora.build, "lora": lora.build, "galore": galore.build, "full": full.build}
    return recipes[kind]
