"""Test helper, not a test: `peftlab train ... --fsdp` with accelerate's FSDP2 path forced on CPU.

accelerate engages FSDP only on GPU process groups (on CPU it silently runs DDP), and `check_launch`
refuses CPU for that reason. Launched by the tests as

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train/fsdp_on_cpu.py \
        [--bf16] [--record-head FILE] train CONFIG --method NAME --fsdp ...

it patches, in this process only, (1) accelerate's state so that a FullyShardedDataParallelPlugin on a
gloo (MULTI_CPU) process group gives DistributedType.FSDP, exactly what a GPU process group gives,
and (2) `check_launch`'s CUDA requirement (every other refusal stays). `--record-head FILE` appends,
per rank, the input shape of every call of the model's vocabulary projection (JSON lines; `fsdp`:
whether the projection is part of an FSDP unit). `--bf16` trains as a CUDA bf16 run does (bf16
weights and mixed precision, so FSDP casts outputs to bf16).
"""

from __future__ import annotations

import json
import os
import sys
from unittest import mock


def force_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # What accelerate does for a GPU process group (accelerate/state.py, AcceleratorState.__init__).
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = init

    import peftlab.train.launch as launch
    import peftlab.train.runner as runner

    check = launch.check_launch

    def check_launch(*args, **kwargs):
        with mock.patch("torch.cuda.is_available", return_value=True):
            check(*args, **kwargs)

    launch.check_launch = runner.check_launch = check_launch


def record_head_calls(path: str) -> None:
    """Append the input shape of every vocabulary-projection call (forward and recomputation) to `path`."""
    import peftlab.train.runner as runner

    make_args = runner.training_arguments

    def training_arguments(method, out, device, dtype, recipe, fsdp=False):
        head = runner.base_model(recipe.model).get_output_embeddings()
        rank = os.environ.get("RANK", "0")

        def hook(module, args):
            from torch.distributed.fsdp import FSDPModule

            record = {"rank": rank, "shape": list(args[0].shape), "fsdp": isinstance(module, FSDPModule)}
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

        head.register_forward_pre_hook(hook)
        return make_args(method, out, device, dtype, recipe, fsdp)

    runner.training_arguments = training_arguments


def bf16_mixed_precision() -> None:
    """What a CUDA bf16 run gets (bf16 weights, bf16 mixed precision: FSDP casts outputs to bf16), on CPU."""
    import torch

    import peftlab.train.runner as runner

    make_args = runner.training_arguments

    def training_arguments(*args, **kwargs):
        arguments = make_args(*args, **kwargs)
        arguments.bf16, arguments.mixed_precision = True, "bf16"
        return arguments

    runner.training_arguments = training_arguments
    runner.resolve_dtype = lambda model, device: torch.bfloat16


def main(argv: list[str]) -> int:
    if argv[:1] == ["--bf16"]:
        bf16_mixed_precision()
        argv = argv[1:]
    if argv[:1] == ["--record-head"]:
        record_head_calls(argv[1])
        argv = argv[2:]
    force_fsdp_on_cpu()
    from peftlab.cli import main as cli

    return cli(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
