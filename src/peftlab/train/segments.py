"""A training run's segments across --resume, and the time spent writing checkpoints.

A run that is interrupted and resumed trains in segments, one per process. Each checkpoint carries
the records of the segments that led to it, inside its `trainer_state.json` (the state of the
`RunSegments` callback, which transformers writes with the rest of the trainer state, last in a
save), so a resumed run reports totals for the whole run: the sum of the segments' loop times and
the maximum of their peaks. A segment's record in a checkpoint covers its loop up to that checkpoint;
steps trained after the checkpoint a later segment resumes from are lost and counted once, when
trained again.

Checkpoint writes are timed apart (`checkpoint_save_s`) and left out of `train_time_s`: GaLore and
full fine-tuning write full weights and optimizer states where LoRA writes adapters, which would
otherwise count as training time.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from peftlab.train.meter import Measurement

PEAK_KEYS = ("peak_gpu_alloc_gib", "peak_gpu_reserved_gib", "peak_rss_gib")


class RunSegments(TrainerCallback, ExportableState):
    """Records this process's segment (loop time without saves, save time, peaks) and the earlier
    segments of the run (`prior`, read from the checkpoint it resumed from)."""

    def __init__(self, prior: list[dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.prior = list(prior or [])
        self.meter: Measurement | None = None  # the training loop's measurement, set while it runs
        self.save_seconds = 0.0
        self._save_started: float | None = None
        self._state = None
        self._first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._state = state
        self._first_step = state.global_step  # a resumed run starts at its checkpoint's step

    @contextlib.contextmanager
    def timing_save(self) -> Iterator[None]:
        """Wraps one checkpoint write (`Trainer._save_checkpoint`)."""
        self._save_started = time.perf_counter()
        try:
            yield
        finally:
            self.save_seconds += time.perf_counter() - self._save_started
            self._save_started = None

    def record(self, loop: Measurement) -> dict[str, Any]:
        """This segment's record from the loop's measurement (`loop.so_far()` inside a save)."""
        saves = self.save_seconds
        loop_seconds = loop.seconds
        if self._save_started is not None:  # read during a save: the loop stopped when it began
            running = time.perf_counter() - self._save_started
            saves += running
            loop_seconds -= running
        step = self._state.global_step if self._state is not None else self._first_step
        return {
            "steps": [self._first_step, step],
            "train_time_s": max(loop_seconds - self.save_seconds, 0.0),
            "checkpoint_save_s": saves,
            **{key: getattr(loop, key) for key in PEAK_KEYS},
        }

    def state(self) -> dict[str, Any]:
        """Written into each checkpoint's trainer_state.json: every segment up to this save."""
        current = [self.record(self.meter.so_far())] if self.meter is not None else []
        return {"args": {}, "attributes": {"records": [*self.prior, *current]}}

    def whole_run(self, loop: Measurement) -> dict[str, Any]:
        """The run's totals over every segment, this one ending with `loop`."""
        records = [*self.prior, self.record(loop)]
        return {"records": records, **whole_run_totals(records)}


def whole_run_totals(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum of times and maximum of peaks over segment records; a record without a value (a segment
    whose checkpoint predates the records) adds nothing."""

    def total(key: str) -> float:
        return sum(r[key] for r in records if r.get(key) is not None)

    def peak(key: str) -> float | None:
        values = [r[key] for r in records if r.get(key) is not None]
        return max(values) if values else None

    return {
        "train_time_s": total("train_time_s"),
        "checkpoint_save_s": total("checkpoint_save_s"),
        **{key: peak(key) for key in PEAK_KEYS},
        "segments": len(records),
        "resumed": len(records) > 1,
    }


def prior_segments(checkpoint: str | None) -> tuple[list[dict[str, Any]], bool]:
    """The segment records a checkpoint carries, and whether it had any (older checkpoints do not:
    then its segment is recorded by its steps only)."""
    if checkpoint is None:
        return [], True
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    stored = (state.get("stateful_callbacks") or {}).get(RunSegments.__name__)
    if isinstance(stored, dict) and isinstance(stored.get("attributes", {}).get("records"), list):
        return stored["attributes"]["records"], True
    return [{"steps": [0, state.get("global_step")], "recorded": False}], False
