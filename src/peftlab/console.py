"""What peftlab prints while it works: one progress bar per stage, and the libraries kept quiet.

- `StageProgress`: a tqdm bar on a terminal; in a log file (stderr not a terminal) plain lines instead
  of carriage-return redraws: every `note` (the training loss every `logging_steps`), else about every
  tenth of the work.
- `quiet_libraries()`: around a command, transformers' own per-load and per-save bars ("Loading
  weights", "Writing model shards") are off (download bars stay), and the deprecation warnings that
  libraries raise from their own code, which no call of ours can avoid, are filtered by their exact text.
- `results_table` and `disk_usage`: the summary at the end of a study.

Everything goes to stderr; stdout is kept for what a command is asked to print (scores, answers).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# (category, message regex, where it comes from): raised inside a library for its own calls.
LIBRARY_DEPRECATIONS = (
    # peft's PeftModel.__init__ reads `model.is_gradient_checkpointing` (transformers 5 renamed it).
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", "peft.peft_model"),
    # torch.utils.mkldnn decorates with torch.jit.script_method; imported by inductor when bitsandbytes
    # registers its torch.compile'd CPU kernels.
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated", "torch.utils.mkldnn"),
)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class StageProgress:
    """Progress of one stage: `advance` by units done, `note` a short status (e.g. the loss)."""

    def __init__(self, total: int | None, desc: str, unit: str, *, initial: int = 0, enabled: bool = True,
                 leave: bool = False) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.done = initial
        self.enabled = enabled
        self._bar = None
        self._last_line_at = initial
        self._noted = False  # once notes are printed (the loss), they are the log's progress lines
        if enabled and is_terminal():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, file=sys.stderr,
                             dynamic_ncols=True)

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        elif self.enabled and not self._noted and self.total and self.done < self.total:
            step = max(1, self.total // 10)
            if self.done - self._last_line_at >= step:
                self._line()

    def advance_to(self, done: int) -> None:
        if done > self.done:
            self.advance(done - self.done)

    def note(self, text: str) -> None:
        """Shown beside the bar on a terminal; one line in a log."""
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=True)
        elif self.enabled:
            self._noted = True
            self._line(text)

    def _line(self, text: str = "") -> None:
        self._last_line_at = self.done
        total = f"/{self.total}" if self.total else ""
        say(f"  {self.desc}: {self.done}{total} {self.unit}s{'  ' + text if text else ''}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """transformers' load/save progress bars off and the libraries' own deprecation warnings filtered,
    for the duration of the block (restored after, so a library user's settings survive)."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hub_bars_were_off = hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # also turns huggingface_hub's off: downloads keep theirs
    if not hub_bars_were_off:
        hub_utils.enable_progress_bars()
    try:
        with warnings.catch_warnings():
            for category, message, _origin in LIBRARY_DEPRECATIONS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
            if hub_bars_were_off:
                hub_utils.disable_progress_bars()


def disk_usage(path: Path) -> int:
    """Bytes of the regular files under `path` (links not followed)."""
    total = 0
    for item in path.rglob("*"):
        if item.is_file() and not item.is_symlink():
            total += item.stat().st_size
    return total


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def results_table(results: dict[str, Any]) -> str:
    """A plain-text table of every evaluated model: scores (with SD across seeds where there are
    several), training time and peak memory (GPU when measured, else the process RSS)."""
    models: dict[str, Any] = results.get("models") or {}
    training: dict[str, Any] = results.get("training") or {}
    scores = [("bleu4", "BLEU-4"), ("rougeL", "ROUGE-L")]
    if any(block.get("exact_match_norm") is not None for block in models.values()):
        scores.append(("exact_match_norm", "EM (norm)"))
    header = ["model", *(label for _, label in scores), "train time", "peak memory"]
    rows = [header]
    for name, block in models.items():
        cells = [name]
        for key, _ in scores:
            value = block.get(key)
            sd = block.get(f"{key}_sd")
            cells.append("-" if value is None else f"{value:.4f}" + (f" ± {sd:.4f}" if sd is not None else ""))
        train = training.get(name) or {}
        seconds = train.get("train_time_s")
        if seconds is not None:
            seconds += train.get("merge_time_s") or 0.0
        cells.append("-" if seconds is None else f"{seconds:.1f} s")
        if train.get("peak_gpu_alloc_gib") is not None:
            cells.append(f"{train['peak_gpu_alloc_gib']:.2f} GiB GPU")
        elif train.get("peak_rss_gib") is not None:
            cells.append(f"{train['peak_rss_gib']:.2f} GiB RSS")
        else:
            cells.append("-")
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
