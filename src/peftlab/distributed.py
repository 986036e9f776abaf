"""Processes: rank and world size as torchrun / accelerate launch set them, joining the process group
before any Trainer exists, and gathering per-rank facts. Training and evaluation both use these."""

from __future__ import annotations

import os
from typing import Any

import torch


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) as torchrun / accelerate launch set them; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def join_process_group() -> None:
    """Under torchrun, join the process group the way the Trainer will (accelerate's PartialState),
    for code that synchronises before any Trainer exists (hybrid stages)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        from datetime import timedelta

        from accelerate import PartialState

        PartialState(timeout=timedelta(seconds=1800))  # the Trainer's ddp_timeout default


def gather_ranks(mine: dict[str, Any], world: int) -> list[dict[str, Any]]:
    """Every rank's `mine`, in rank order, on every rank."""
    if world == 1:
        return [mine]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def total_over_ranks(ranks: list[dict[str, Any]], key: str) -> float | None:
    """The sum of `key` over ranks that measured it (None when none did)."""
    values = [r[key] for r in ranks if r[key] is not None]
    return sum(values) if values else None
