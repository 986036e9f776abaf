"""The training output folder's checkpoints: where a run resumes from (the last complete checkpoint),
under which strategy, what a weights-only load may unpickle, and the FSDP-gathered full model's
duplicate tied head.

A checkpoint is complete when transformers finished writing it: `Trainer._save_checkpoint` writes the
weights, optimizer, scheduler and RNG states first and `trainer_state.json` last (transformers 5.x), so
a kill during a save leaves a folder without a readable `trainer_state.json`. Its files are checked
too (a safetensors file against the sizes its header declares, a torch file for its zip directory), so
a truncated file is named in one line instead of failing the load with a traceback.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import torch

from peftlab.errors import UserError
from peftlab.rundir import read_json, write_json


def drop_tied_head(directory: Path) -> bool:
    """Remove `lm_head.weight` from a saved full model whose head is tied to the input embedding.

    `save_pretrained` drops a tied head only when both names share one tensor; FSDP's gathered state
    dict holds two copies (the 262k x 1152 embedding twice for Gemma 3), and loading re-ties them
    anyway. Handles one file or an indexed set of shards; returns whether anything was removed."""
    from safetensors.torch import load_file, save_file

    index_path = directory / "model.safetensors.index.json"
    index = read_json(index_path) if index_path.exists() else None
    names = [index["weight_map"]["lm_head.weight"]] if index and "lm_head.weight" in index["weight_map"] else (
        ["model.safetensors"] if index is None and (directory / "model.safetensors").exists() else [])
    removed = False
    for name in names:
        tensors = load_file(str(directory / name))
        if tensors.pop("lm_head.weight", None) is None:
            continue
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        removed = True
    if removed and index is not None:
        index["weight_map"].pop("lm_head.weight")
        write_json(index_path, index)
    return removed


def allow_galore_checkpoints() -> None:
    """GaLore's optimizer state holds projector objects; allow exactly those classes in weights-only loads."""
    try:
        from galore_torch.galore_projector import GaLoreProjector

        from peftlab.methods.galore_basis import GramProjector
    except ImportError:
        return
    torch.serialization.add_safe_globals([GaLoreProjector, GramProjector])


def check_checkpoint_strategy(checkpoint: str, fsdp: bool) -> None:
    """A checkpoint resumes only under the strategy that wrote it (FSDP shards its states differently)."""
    written_by_fsdp = any(Path(checkpoint).glob("*fsdp*"))
    if written_by_fsdp != fsdp:
        how = "with" if written_by_fsdp else "without"
        raise UserError(f"--resume: {checkpoint} was written {how} --fsdp; resume it the same way")


TRAINER_STATE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME, written last in a save


def checkpoint_step(path: Path) -> int | None:
    """The step of a `checkpoint-N` folder, None for any other name."""
    number = path.name.removeprefix("checkpoint-")
    return int(number) if path.name.startswith("checkpoint-") and number.isdigit() else None


def checkpoints_newest_first(out: Path) -> list[Path]:
    found = [p for p in (out / "checkpoints").glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0, reverse=True)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (naming the file), or None when it is complete."""
    state_path = checkpoint / TRAINER_STATE
    if not state_path.exists():
        return f"no {TRAINER_STATE}: the save did not finish"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return f"{TRAINER_STATE} is not complete JSON"
    if not isinstance(state, dict) or state.get("global_step") != checkpoint_step(checkpoint):
        return f"{TRAINER_STATE} is not the state of step {checkpoint_step(checkpoint)}"
    for path in sorted(checkpoint.rglob("*")):
        if not path.is_file():
            continue
        problem = _file_problem(path)
        if problem is not None:
            return f"{path.relative_to(checkpoint)} {problem}"
    return None


def _file_problem(path: Path) -> str | None:
    """A structural check of one checkpoint file, without loading it: truncation shows."""
    size = path.stat().st_size
    if path.suffix == ".safetensors":
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return f"is truncated ({size} bytes)"
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > size - 8:
                return f"is truncated or corrupt (its header claims {header_size} bytes, the file has {size})"
            try:
                header = json.loads(handle.read(header_size))
                end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                          default=0)
            except (ValueError, TypeError, KeyError, IndexError):
                return "is corrupt (unreadable safetensors header)"
        expected = 8 + header_size + end
        if size != expected:
            return f"is truncated or corrupt ({size} bytes, its header declares {expected})"
    elif path.suffix in (".pt", ".pth", ".bin"):
        try:
            with zipfile.ZipFile(path):
                pass
        except (zipfile.BadZipFile, OSError):
            return f"is truncated or corrupt (not a complete torch file, {size} bytes)"
    elif path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError):
            return "is not complete JSON"
    return None


def remove_checkpoints(out: Path) -> list[Path]:
    """Remove the Trainer's `checkpoint-N` folders under `out/checkpoints` (once final/ is written they
    only take space: 8 GB for the demo). Only folders the Trainer wrote (named checkpoint-<step>, holding
    its trainer_state.json) are removed; `checkpoints/` itself goes only if nothing else is left in it."""
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    removed = []
    for item in sorted(folder.iterdir()):
        step = item.name.removeprefix("checkpoint-")
        if (item.is_dir() and not item.is_symlink() and item.name != step and step.isdigit()
                and (item / "trainer_state.json").is_file()):
            shutil.rmtree(item)
            removed.append(item)
    if not any(folder.iterdir()):
        folder.rmdir()
    return removed


def last_checkpoint(out: Path) -> str | None:
    """The newest complete checkpoint under `out/checkpoints`, or None."""
    for checkpoint in checkpoints_newest_first(out):
        if checkpoint_problem(checkpoint) is None:
            return str(checkpoint)
    return None


def prepare_output(out: Path, resume: bool, fsdp: bool = False) -> str | None:
    """The checkpoint to resume from, or None after clearing a previous attempt.

    With `resume`, incomplete checkpoints newer than the last complete one (a kill during a save) are
    removed, each with one line on stderr, and the run resumes from the complete one; when none is
    complete, the run starts again from step 0 (also said on stderr)."""
    if resume:
        candidates = checkpoints_newest_first(out)
        if not candidates:
            raise UserError(f"--resume: no checkpoint under {out / 'checkpoints'}; run without --resume to start")
        found: Path | None = None
        skipped: list[tuple[Path, str]] = []
        for checkpoint in candidates:
            problem = checkpoint_problem(checkpoint)
            if problem is None:
                found = checkpoint
                break
            skipped.append((checkpoint, problem))
        target = found.name if found is not None else "step 0 (no complete checkpoint is left)"
        for checkpoint, problem in skipped:
            print(f"peftlab: {checkpoint} is incomplete ({problem}); removed it, resuming from {target}",
                  file=sys.stderr, flush=True)
            shutil.rmtree(checkpoint)
        if found is not None:
            check_checkpoint_strategy(str(found), fsdp)
            (out / "metrics.json").unlink(missing_ok=True)
            return str(found)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return None
