"""The resource meter: wraps a training loop and measures what the study reports.

Peak GPU memory is `torch.cuda.max_memory_allocated()` / `max_memory_reserved()` over the loop,
with the counters reset before it (the original study read `memory_allocated()` after loading,
which is roughly the weights, never a training peak). On CPU the GPU fields are None, never 0.
The process RSS peak is sampled over the same span.
"""

from __future__ import annotations

import itertools
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
    # Set while the measured block runs, for readings taken inside it (`so_far`).
    started: float | None = None
    sampler: RssSampler | None = None

    def so_far(self) -> Measurement:
        """The time and peaks from the block's start until now, read inside the block."""
        if self.started is None or self.sampler is None:
            return self
        cuda = torch.cuda.is_available()
        return Measurement(
            seconds=time.perf_counter() - self.started,
            peak_gpu_alloc_gib=torch.cuda.max_memory_allocated() / GIB if cuda else None,
            peak_gpu_reserved_gib=torch.cuda.max_memory_reserved() / GIB if cuda else None,
            peak_rss_gib=max(self.sampler.peak, self.sampler.current()) / GIB,
        )


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

    def current(self) -> int:
        return self._process.memory_info().rss

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self.current())

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
    result.started, result.sampler = start, sampler
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
        result.started = result.sampler = None


# Steps whose own durations `StepTimes.summary` lists: where a short run's warm-up ends.
FIRST_STEPS = 8


class StepTimes(TrainerCallback):
    """Wall time of each optimizer step (a `transformers` callback).

    On a GPU each step's end is a CUDA event on the current stream, read once in `summary`: the host is
    never made to wait for the GPU here (a sync per step would idle the GPU while the host prepares the
    next step). An event's time is when the GPU reached that point of the stream, so a step's duration
    includes the GPU's idle time in it, as a wall clock would."""

    def __init__(self) -> None:
        super().__init__()
        self.durations: list[float] = []
        self._last: float | None = None
        self._events: list[torch.cuda.Event] = []

    def _mark(self) -> None:
        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._events.append(event)
            return
        now = time.perf_counter()
        if self._last is not None:
            self.durations.append(now - self._last)
        self._last = now

    def on_train_begin(self, args, state, control, **kwargs):
        self._read_events(wait=True)  # an earlier run's (the time between runs is no step)
        self._events = []
        self._last = None
        self._mark()

    def on_step_end(self, args, state, control, **kwargs):
        self._mark()
        self._read_events(wait=False)

    def _read_events(self, wait: bool) -> None:
        """Turn the events the GPU has passed (all of them, after waiting, with `wait`) into durations."""
        if wait and self._events:
            self._events[-1].synchronize()
        passed = 0
        while passed + 1 < len(self._events) and (wait or self._events[passed + 1].query()):
            passed += 1
        marks = self._events[:passed + 1]
        self.durations.extend(start.elapsed_time(end) / 1000 for start, end in itertools.pairwise(marks))
        self._events = self._events[passed:]

    def summary(self) -> dict[str, float | None]:
        self._read_events(wait=True)
        if not self.durations:
            return {"first_step_s": None, "step_s_median": None}
        ordered = sorted(self.durations[1:] or self.durations)
        return {"first_step_s": self.durations[0], "step_s_median": ordered[len(ordered) // 2],
                "first_steps_s": [round(duration, 4) for duration in self.durations[:FIRST_STEPS]]}


def peak_allocation_sites(trace: list[dict], baseline_bytes: int = 0, top: int = 15) -> dict:
    """Where the allocated-memory peak of a recorded span comes from.

    `trace` is one device's allocator history (`torch.cuda.memory._snapshot()["device_traces"][i]`
    after `torch.cuda.memory._record_memory_history(stacks="python")`); `baseline_bytes` is what was
    allocated when recording began (weights, optimizer setup), counted as the trace counts: requested
    bytes (`memory_stats()["requested_bytes.all.current"]`), a little below `max_memory_allocated`,
    which counts rounded blocks. Replays alloc/free events (a free counts when requested, as the
    allocator's own statistics do), finds the event at which allocated bytes peaked, and groups the
    allocations alive then by the innermost Python frame outside torch (the code that asked for the
    memory). A block allocated before the recording and freed during it lowers the running total by
    its size. (The memory_viz web page shows the same data; this makes it a table a benchmark can
    commit.)
    """
    frees = {entry["action"] for entry in trace} & {"free_requested", "free_completed"}
    free_action = "free_requested" if "free_requested" in frees else "free_completed"
    current = peak = 0
    peak_at = -1
    live: dict[int, int] = {}
    for index, entry in enumerate(trace):
        if entry["action"] == "alloc":
            live[entry["addr"]] = entry["size"]
            current += entry["size"]
            if current > peak:
                peak, peak_at = current, index
        elif entry["action"] == free_action:
            current -= live.pop(entry["addr"], entry.get("size", 0))
    alive: dict[int, dict] = {}
    for entry in trace[:peak_at + 1]:
        if entry["action"] == "alloc":
            alive[entry["addr"]] = entry
        elif entry["action"] == free_action:
            alive.pop(entry["addr"], None)
    sites: dict[str, dict] = {}
    for entry in alive.values():
        frames = _outside_torch(entry.get("frames") or [])
        key = frames[0] if frames else "(no Python frame: autograd backward or C++)"
        site = sites.setdefault(key, {"site": key, "bytes": 0, "blocks": 0, "callers": frames[1:3]})
        site["bytes"] += entry["size"]
        site["blocks"] += 1
    ranked = sorted(sites.values(), key=lambda site: site["bytes"], reverse=True)
    return {"peak_bytes": baseline_bytes + peak, "baseline_bytes": baseline_bytes, "recorded_peak_bytes": peak,
            "events": len(trace), "peak_event": peak_at, "sites": ranked[:top]}


def _outside_torch(frames: list[dict]) -> list[str]:
    """`file:line name` of the frames (innermost first) that are not torch's own code."""
    shown = []
    for frame in frames:
        path = str(frame.get("filename", ""))
        # torch's own code, Inductor's generated files and FX's `<eval_with_key>` name no user code.
        if not path or "/torch/" in path or "torchinductor" in path or path.startswith(("??", "<")):
            continue
        for marker in ("site-packages/", "dist-packages/", "src/"):
            if marker in path:
                path = path.split(marker, 1)[1]
                break
        shown.append(f"{path}:{frame.get('line')} {frame.get('name', '')}".rstrip())
    return shown


class PhasePeaks(TrainerCallback):
    """Peak allocated memory per phase of a training step, for finding where a step's peak is.

    A phase is the span between two marks: a decoder layer's forward starting and ending, the same
    layer's recompute starting inside backward under activation checkpointing (torch stops a
    recompute early, so a layer's recompute and backward span from its recompute start to the next
    one's), the final norm (after it: the loss and its backward), the optimizer step. `read_and_reset()` returns the peak since its last
    call and resets the counter (`torch.cuda` on a GPU; tests pass a fake), so a peak read after
    training is no longer the training peak: the highest span is. Lighter than the allocator's history
    (`peak_allocation_sites`), which names the code but can fail to record.
    """

    def __init__(self, read_and_reset) -> None:
        self.read_and_reset = read_and_reset
        self.last = "train start"
        self.peaks: dict[str, int] = {}
        self.handles: list = []

    def mark(self, label: str) -> None:
        span = f"{self.last} -> {label}"
        self.peaks[span] = max(self.peaks.get(span, 0), int(self.read_and_reset()))
        self.last = label

    def attach(self, model) -> None:
        from peftlab.models import base_model

        decoder = base_model(model).get_decoder()
        for index, layer in enumerate(decoder.layers):
            # Hooks on the layer's first and last blocks, not the layer: transformers (5.2x) checkpoints a
            # layer's `forward`, so the layer's own hooks do not run again when backward recomputes it.
            first, last = getattr(layer, "input_layernorm", layer), getattr(layer, "mlp", layer)
            self.handles.append(first.register_forward_pre_hook(self._layer_hook(index, "start")))
            self.handles.append(last.register_forward_hook(self._layer_hook(index, "end")))
        self.handles.append(decoder.norm.register_forward_hook(lambda *args: self.mark("final norm")))

    def _layer_hook(self, index: int, edge: str):
        def hook(*args) -> None:
            # Inside an autograd backward pass a layer's forward is a checkpointing recompute.
            in_backward = torch._C._current_graph_task_id() != -1
            self.mark(f"layer {index} {'recompute' if in_backward else 'forward'} {edge}")
        return hook

    def result(self, top: int = 15) -> dict:
        """The spans with the highest peaks, and per kind of span (layer numbers folded) the highest."""
        kinds: dict[str, int] = {}
        for span, peak in self.peaks.items():
            kind = " ".join("N" if word.isdigit() else word for word in span.split())
            kinds[kind] = max(kinds.get(kind, 0), peak)
        ranked = sorted(self.peaks.items(), key=lambda item: -item[1])[:top]
        return {"spans": [{"span": span, "peak_mib": peak / 2**20} for span, peak in ranked],
                "kinds": [{"kind": kind, "peak_mib": peak / 2**20}
                          for kind, peak in sorted(kinds.items(), key=lambda item: -item[1])]}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.attach(model)
        self.mark("train start")

    def on_step_begin(self, args, state, control, **kwargs):
        self.mark("step start")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.mark("optimizer start")

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.mark("optimizer end")

    def on_train_end(self, args, state, control, **kwargs):
        self.mark("train end")
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def release_memory() -> None:
    """Free the finished stage's tensors so the next stage's peak starts from what it allocates itself."""
    import gc
    import sys

    if "bitsandbytes" in sys.modules:
        # transformers' Trainer registers embedding modules with bitsandbytes' process-wide optimizer
        # manager, which would otherwise keep the finished stage's embedding (0.56 GiB for Gemma 3 1B) alive.
        manager = sys.modules["bitsandbytes"].optim.GlobalOptimManager.get_instance()
        manager.module_weight_config_triple = []
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
