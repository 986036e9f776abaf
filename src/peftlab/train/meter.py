"""The resource meter: wraps a training loop and measures what the study reports.

Peak GPU memory is `torch.cuda.max_memory_allocated()` / `max_memory_reserved()` over the loop,
with the counters reset before it (the original study read `memory_allocated()` after loading,
which is roughly the weights, never a training peak). On CPU the GPU fields are None, never 0.
The process RSS peak is sampled over the same span.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

GIB = 1024**3


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_gpu_alloc_gib: float | None = None
    peak_gpu_reserved_gib: float | None = None
    peak_rss_gib: float = 0.0


class RssSampler:
    """Samples the process's resident set size in a background thread; `peak` is the largest seen.

    The kernel's own peak (ru_maxrss) covers the whole process lifetime, so in a study that trains
    several methods in one process it would carry one method's peak into the next.
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


@contextmanager
def measure() -> Iterator[Measurement]:
    result = Measurement()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    sampler = RssSampler()
    try:
        with sampler:
            yield result
    finally:
        if cuda:
            torch.cuda.synchronize()
            result.peak_gpu_alloc_gib = torch.cuda.max_memory_allocated() / GIB
            result.peak_gpu_reserved_gib = torch.cuda.max_memory_reserved() / GIB
        result.seconds = time.perf_counter() - start
        result.peak_rss_gib = sampler.peak / GIB


class StepTimes(TrainerCallback):
    """Wall time of each optimizer step (a `transformers` callback; synchronises the GPU per step)."""

    def __init__(self) -> None:
        super().__init__()
        self.durations: list[float] = []
        self._last: float | None = None

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        now = self._now()
        if self._last is not None:
            self.durations.append(now - self._last)
        self._last = now

    def summary(self) -> dict[str, float | None]:
        if not self.durations:
            return {"first_step_s": None, "step_s_median": None}
        ordered = sorted(self.durations[1:] or self.durations)
        return {"first_step_s": self.durations[0], "step_s_median": ordered[len(ordered) // 2]}
