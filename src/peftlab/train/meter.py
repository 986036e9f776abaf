"""The resource meter: wraps a training loop and measures what the study reports.

Peak GPU memory is `torch.cuda.max_memory_allocated()` / `max_memory_reserved()` over the loop,
with the counters reset before it (the original study read `memory_allocated()` after loading,
which is roughly the weights, never a training peak). On CPU the GPU fields are None, never 0.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

GIB = 1024**3


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_gpu_alloc_gib: float | None = None
    peak_gpu_reserved_gib: float | None = None
    peak_rss_gib: float = 0.0


def peak_rss_gib() -> float:
    """The process's peak resident set size so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (GIB if sys.platform == "darwin" else 1024**2)


@contextmanager
def measure() -> Iterator[Measurement]:
    result = Measurement()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        yield result
    finally:
        if cuda:
            torch.cuda.synchronize()
            result.peak_gpu_alloc_gib = torch.cuda.max_memory_allocated() / GIB
            result.peak_gpu_reserved_gib = torch.cuda.max_memory_reserved() / GIB
        result.seconds = time.perf_counter() - start
        result.peak_rss_gib = peak_rss_gib()
