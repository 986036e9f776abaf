"""The training output folder's checkpoints: where a run resumes from, under which strategy, what a
weights-only load may unpickle, and the FSDP-gathered full model's duplicate tied head."""

from __future__ import annotations

import shutil
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
    found = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(found[-1]) if found else None


def prepare_output(out: Path, resume: bool, fsdp: bool = False) -> str | None:
    """The checkpoint to resume from, or None after clearing a previous attempt."""
    if resume:
        found = last_checkpoint(out)
        if found is None:
            raise UserError(f"--resume: no checkpoint under {out / 'checkpoints'}; run without --resume to start")
        check_checkpoint_strategy(found, fsdp)
        (out / "metrics.json").unlink(missing_ok=True)
        return found
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return None
