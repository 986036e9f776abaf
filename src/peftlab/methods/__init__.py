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
    model: Any
    # A ready optimizer, or None to let the Trainer build `optim` by name.
    optimizer: Any = None
    optim: str = "adamw_torch"
    saves: str = "full"  # "adapter" (PEFT adapters) or "full" (all weights)
    notes: dict[str, Any] = field(default_factory=dict)
    # The optimizer applies `max_grad_norm` itself (its gradients are not all in `.grad`).
    clips_gradients: bool = False


def build(kind: str) -> Callable[[BuildContext], Recipe]:
    from peftlab.methods import full, galore, lora, qlora

    recipes = {"qlora": qlora.build, "lora": lora.build, "galore": galore.build, "full": full.build}
    return recipes[kind]
