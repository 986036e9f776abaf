"""CUDA-graph replay of a training forward and backward over fixed-size packed bins.

A padding-free step on a GPU spends most of its time launching kernels, not running them (the H200
profile: GPU busy 33-42% of a step, ~10,000 launches). Here a batch's rows are packed into bins
(`pack_bins`: first fit, longest row first, at most `capacity` tokens), and each bin is cut to the
smallest of a few sizes that holds it (`bin_size`: quarters of the capacity), the rest filled with
short padding rows outside the loss and unused row slots left as empty rows: few shapes, little padding.
`GraphedForwardBackward` runs the first bins eagerly on a side stream (warm-up; their gradients
count), captures each size once as a CUDA graph of forward + backward (all graphs share one memory
pool), and from then on copies each bin into its graph's input buffers and replays it: one launch
instead of thousands.

The numbers are the eager execution's: the same kernels in the same order, gradients accumulated
in place into the same `.grad` tensors (kept alive here and put back when the Trainer sets them to
None). Dropout draws from the same generator, at other offsets than an eager run would.

Written here because no library captures a transformers/PEFT training step whose rows vary: the
mechanism is PyTorch's own whole-network capture (`torch.cuda.graph`). Without CUDA (tests, CI) the
same bins run eagerly on the same static buffers (`capture=False`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from peftlab.errors import one_line
from peftlab.train.batches import IGNORE

# Padding inside a bin is cut into rows of at most this many tokens: its attention then costs
# next to nothing, and it never reads or feeds a real row.
PAD_ROW_TOKENS = 64


def pack_bins(lengths: list[int], capacity: int, max_rows: int) -> list[list[int]]:
    """Row indices per bin: first fit of the rows, longest first, into bins of `capacity` tokens and
    at most `max_rows` rows; each bin's indices in batch order (deterministic)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"a row of {length} tokens does not fit a bin of {capacity}")
        for slot, free in enumerate(room):
            if length <= free and len(bins[slot]) < max_rows:
                bins[slot].append(index)
                room[slot] -= length
                break
        else:
            bins.append([index])
            room.append(capacity - length)
    return [sorted(rows) for rows in bins]


def bin_size(tokens: int, capacity: int) -> int:
    """The smallest of the bin sizes (quarters of `capacity`, multiples of PAD_ROW_TOKENS) that holds
    `tokens`: on the bench workload, 7% padding instead of 26% with bins of one size."""
    quarter = max(PAD_ROW_TOKENS, capacity // 4 // PAD_ROW_TOKENS * PAD_ROW_TOKENS)
    size = -(-tokens // quarter) * quarter
    return capacity if size >= capacity else size


def bin_sizes(capacity: int) -> list[int]:
    """Every size `bin_size` can give for `capacity`, smallest first."""
    quarter = bin_size(1, capacity)
    return [*range(quarter, capacity, quarter), capacity]


def row_slots(capacity: int, max_rows: int) -> int:
    """Rows a bin's `cu_seq_lens` has room for: the real rows and the padding rows."""
    return max_rows + -(-capacity // PAD_ROW_TOKENS)


class BinLayout:
    """Where a bin's tokens come from: for each of its `capacity` positions the source position in the
    packed batch (-1: padding), its position id, and the rows' cumulative starts (`slots` + 1 entries)."""

    def __init__(self, lengths: list[int], rows: list[int], capacity: int, slots: int, pin: bool = False) -> None:
        starts = [0]
        for length in lengths:
            starts.append(starts[-1] + length)
        source: list[int] = []
        positions: list[int] = []
        bounds = [0]
        for row in rows:
            source.extend(range(starts[row], starts[row + 1]))
            positions.extend(range(lengths[row]))
            bounds.append(bounds[-1] + lengths[row])
        pad = capacity - len(source)
        while pad > 0:
            size = min(pad, PAD_ROW_TOKENS)
            source.extend([-1] * size)
            positions.extend(range(size))
            bounds.append(bounds[-1] + size)
            pad -= size
        if len(bounds) > slots + 1:
            raise ValueError(f"a bin of {len(bounds) - 1} rows exceeds its {slots} row slots")
        bounds.extend([capacity] * (slots + 1 - len(bounds)))  # empty rows: unused slots
        # Pinned (`pin`): copied to the GPU without a sync (a pageable copy waits for the stream).
        self.source = torch.tensor(source, dtype=torch.long, pin_memory=pin)
        self.position_ids = torch.tensor(positions, dtype=torch.long, pin_memory=pin)
        self.cu_seq_lens = torch.tensor(bounds, dtype=torch.int32, pin_memory=pin)


def bin_tensors(inputs: dict[str, Any], layout: BinLayout, pad_id: int) -> dict[str, torch.Tensor]:
    """The bin's `input_ids`, `labels`, `position_ids` ([1, capacity]) and `cu_seq_lens`, gathered from a
    packed batch on its device (no host sync: the layout is host-side)."""
    device = inputs["input_ids"].device
    source = layout.source.to(device, non_blocking=True)
    real = source >= 0
    index = source.clamp(min=0)
    ids = torch.where(real, inputs["input_ids"][0, index], pad_id)
    labels = torch.where(real, inputs["labels"][0, index], IGNORE)
    return {"input_ids": ids[None], "labels": labels[None],
            "position_ids": layout.position_ids[None].to(device, non_blocking=True),
            "cu_seq_lens": layout.cu_seq_lens.to(device, non_blocking=True)}


class GraphedForwardBackward:
    """`loss_fn(buffers)` -> scalar loss, run forward and backward per bin: eagerly for the first
    `warmup` bins, then captured once and replayed (see the module docstring).

    `buffers` are static device tensors (`input_ids`, `labels`, `position_ids`, `cu_seq_lens`, `count`)
    that each bin's values are copied into. `params`: the trained parameters, whose `.grad` the graph
    accumulates into. `capture=False` runs every bin eagerly on the same buffers (CPU, tests).
    A capture that fails is recorded in `failure` and every later bin runs eagerly.
    """

    def __init__(self, loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], params: list[torch.Tensor], *,
                 capture: bool = True, warmup: int = 1) -> None:
        self.loss_fn = loss_fn
        self.params = params
        self.capture = capture
        self.warmup = warmup
        self.buffers: dict[int, dict[str, torch.Tensor]] = {}  # per bin size
        self.graphs: dict[int, tuple[Any, torch.Tensor]] = {}  # per bin size: the graph, its loss output
        self.pool: Any = None
        self.capture_stream: Any = None
        self.grads: list[torch.Tensor] | None = None
        self.failure: str | None = None
        self.eager_bins = 0
        self.replays = 0
        self.captured_ahead = 0
        # Host wall time of the eager warm-up bins, the captures, and the captures ahead of their bins.
        self.seconds = {"warmup": 0.0, "capture": 0.0, "capture_ahead": 0.0}

    def __call__(self, values: dict[str, torch.Tensor], count: torch.Tensor | int) -> torch.Tensor:
        size = values["input_ids"].shape[-1]
        buffers = self._fill(size, values, count)
        if size in self.graphs:
            graph, static_loss = self.graphs[size]
            self._restore_grads()
            graph.replay()
            self.replays += 1
            return static_loss.detach().clone()
        if not self.capture or self.failure is not None or self.eager_bins < self.warmup:
            return self._eager(buffers)
        return self._capture(size, buffers)

    def describe(self) -> dict[str, Any]:
        return {"captured": bool(self.graphs), "sizes": sorted(self.graphs), "eager_bins": self.eager_bins,
                "replays": self.replays, "failure": self.failure,
                "warmup_s": round(self.seconds["warmup"], 3), "capture_s": round(self.seconds["capture"], 3),
                "captured_ahead": self.captured_ahead, "capture_ahead_s": round(self.seconds["capture_ahead"], 3)}

    def capture_ahead(self, sizes: list[int], slots: Callable[[int], int], pad_id: int) -> int:
        """Capture the graphs of `sizes` not captured yet, without running them (their bins come later and
        fill the buffers first): for a moment when the host would otherwise wait on the GPU (GaLore's
        projection refresh). `slots(size)`: the bin's row slots. Only after the warm-up, on CUDA. Returns
        how many were captured."""
        if not self.capture or self.failure is not None or self.eager_bins < self.warmup or not self.buffers:
            return 0
        started = time.perf_counter()
        device = next(iter(self.buffers.values()))["input_ids"].device
        captured = 0
        # A capture gives every parameter a `.grad` to accumulate into; in the middle of an optimizer step
        # one without a gradient must stay without (`_restore_grads` zeroes it before the next bin).
        no_grad_yet = [param for param in self.params if param.grad is None]
        with torch.enable_grad():  # an optimizer step runs under no_grad
            for size in sizes:
                if size in self.graphs:
                    continue
                layout = BinLayout([], [], size, slots(size))
                values = {"input_ids": torch.full((1, size), pad_id, dtype=torch.long, device=device),
                          "labels": torch.full((1, size), IGNORE, dtype=torch.long, device=device),
                          "position_ids": layout.position_ids[None].to(device),
                          "cu_seq_lens": layout.cu_seq_lens.to(device)}
                self._capture(size, self._fill(size, values, 1), run=False)
                if self.failure is not None:
                    break
                captured += 1
        for param in no_grad_yet:
            param.grad = None
        self.captured_ahead += captured
        self.seconds["capture_ahead"] += time.perf_counter() - started
        return captured

    def _fill(self, size: int, values: dict[str, torch.Tensor], count: torch.Tensor | int) -> dict[str, torch.Tensor]:
        if size not in self.buffers:
            device = values["input_ids"].device
            self.buffers[size] = {key: torch.empty_like(value) for key, value in values.items()}
            self.buffers[size]["count"] = torch.zeros((), dtype=torch.float32, device=device)
        buffers = self.buffers[size]
        for key, value in values.items():
            buffers[key].copy_(value, non_blocking=True)
        if torch.is_tensor(count):
            buffers["count"].copy_(count, non_blocking=True)
        else:
            buffers["count"].fill_(float(count))
        return buffers

    def _eager(self, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        self.eager_bins += 1
        if not (self.capture and self.failure is None and buffers["input_ids"].is_cuda):
            loss = self.loss_fn(buffers)
            loss.backward()
            return loss.detach()
        # Warm-up before a capture runs on a side stream (PyTorch's whole-network capture recipe).
        started = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            loss = self.loss_fn(buffers)
            loss.backward()
        torch.cuda.current_stream().wait_stream(stream)
        self.seconds["warmup"] += time.perf_counter() - started  # host time, as the captures
        return loss.detach()

    def _capture(self, size: int, buffers: dict[str, torch.Tensor], run: bool = True) -> torch.Tensor | None:
        # Every gradient must exist before capture (the earlier graphs' own tensors, if any), so that
        # backward accumulates into it in place.
        if self.grads is not None:
            self._restore_grads()
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
            # High priority: drawn from another pool than the default-priority streams of GaLore's refresh
            # threads, which run while `capture_ahead` captures (work on a capturing stream is captured).
            self.capture_stream = torch.cuda.Stream(priority=-1)
        started = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        try:
            static_loss = self._record(graph, buffers)
        except Exception as exc:  # any capture failure means: run eagerly, and say why
            self.failure = one_line(exc)
            torch.cuda.synchronize()
            return self._eager(buffers) if run else None
        self.graphs[size] = (graph, static_loss)
        self.grads = [param.grad for param in self.params]
        if not run:
            return None
        graph.replay()
        self.replays += 1
        self.seconds["capture"] += time.perf_counter() - started  # host time: the replay runs on
        return static_loss.detach().clone()

    def _record(self, graph: Any, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        """Capture `loss_fn` forward + backward into `graph` on the capture stream.

        `torch.cuda.graph` would first synchronise the device and empty the allocator's device and
        pinned-host caches, for every capture: the host then waits for the GPU, and the next steps
        pay for fresh cudaMalloc / cudaHostAlloc calls (pinned bin layouts). The capture itself is
        the same: `capture_begin` / `capture_end` on a side stream, into the shared pool; captured
        work does not run, so the stream only has to wait for the buffers' copies."""
        stream = self.capture_stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # thread_local: other threads (GaLore's refresh) may allocate and synchronise meanwhile.
            graph.capture_begin(self.pool, capture_error_mode="thread_local")
            try:
                static_loss = self.loss_fn(buffers)
                static_loss.backward()
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        return static_loss

    def _restore_grads(self) -> None:
        """Put the captured `.grad` tensors back (the Trainer's `zero_grad` sets them to None: zero them)."""
        cleared = []
        for param, grad in zip(self.params, self.grads, strict=True):
            if param.grad is grad:
                continue
            if param.grad is None:
                cleared.append(grad)
            else:
                grad.copy_(param.grad)
            param.grad = grad
        if cleared:
            torch._foreach_zero_(cleared)
