"""The launch check: rules that depend on how a run is launched (processes, CUDA), run once before
any work. Rules that depend only on the config live in `peftlab.config` (`validate`, `validate_fsdp`)."""

from __future__ import annotations

import torch

from peftlab.config import StudyConfig, single_process_only, validate_fsdp
from peftlab.errors import UserError


def check_launch(config: StudyConfig, name: str, *, world: int, fsdp: bool) -> None:
    """Refuse, before anything loads, a method that cannot run with `world` processes (and `fsdp`)."""
    config.method(name)  # unknown method: one clear error
    if fsdp:
        validate_fsdp(config, name)
        if world < 2:
            raise UserError("--fsdp shards over several processes: use it with --gpus 2 or more")
        if not torch.cuda.is_available():
            raise UserError("--fsdp needs CUDA GPUs (accelerate engages FSDP only on GPU process groups); use DDP here")
    if world > 1 and (reason := single_process_only(config, name)):
        raise UserError(reason)
    check_reporting(config, name)


def check_reporting(config: StudyConfig, name: str) -> None:
    """Each `report_to` tracker must be installed (transformers would fail inside the Trainer)."""
    from transformers.integrations import get_available_reporting_integrations

    wanted = config.method(name).report_to
    wanted = [wanted] if isinstance(wanted, str) else wanted
    available = get_available_reporting_integrations()
    for tracker in wanted:
        if tracker not in ("all", "none") and tracker not in available:
            raise UserError(f"methods.{name}.report_to: {tracker} is not available here (its package is not installed)")
