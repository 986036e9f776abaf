"""Which config settings each stage's outputs were made under, and the check that a later stage uses them
only under the same settings.

A stage folder (data/, train/<method>/, eval/<model>/) holds `fingerprint.json`: for every config
section the stage depends on, a hash of that section's resolved YAML. prepare depends on data,
prepare and the tokenizer; a method's training on those, the model and its method settings (a
hybrid's: its own and each stage method's); an evaluation on the trained model's sections (base: the
prepared data and the model; the ensemble: both members) and evaluate (without `models`, which only
chooses what a study evaluates). A folder without the file was made by an older peftlab and is not
checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from peftlab.config import StudyConfig
from peftlab.errors import UserError
from peftlab.rundir import write_json

FILE = "fingerprint.json"


def _hash(value: Any) -> str:
    text = yaml.safe_dump(value, sort_keys=True, allow_unicode=True)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def prepare_sections(config: StudyConfig) -> dict[str, str]:
    return {
        "data": _hash(dataclasses.asdict(config.data)),
        "prepare": _hash(dataclasses.asdict(config.prepare)),
        "model.tokenizer": _hash(config.model.tokenizer or config.model.name_or_path),
    }


def train_sections(config: StudyConfig, method: str) -> dict[str, str]:
    settings = config.method(method)
    methods = [method, *(s.method for s in settings.stages if s.method != "merge")]
    return {
        **prepare_sections(config),
        "model": _hash(dataclasses.asdict(config.model)),
        **{f"methods.{name}": _hash(dataclasses.asdict(config.method(name))) for name in methods},
    }


def evaluate_sections(config: StudyConfig, model: str, limit: int | None) -> dict[str, str]:
    """`limit`: the rows the evaluation used (--limit, or evaluate.limit)."""
    evaluate = dataclasses.asdict(config.evaluate)
    evaluate.pop("models")
    ensemble = evaluate.pop("ensemble")
    evaluate["limit"] = limit
    members = config.evaluate.ensemble.members if model == "ensemble" else [model]
    sections = {**prepare_sections(config), "model": _hash(dataclasses.asdict(config.model))}
    for member in members:
        if member != "base":
            sections.update(train_sections(config, member))
    sections["evaluate"] = _hash(evaluate)
    if model == "ensemble":
        sections["evaluate.ensemble"] = _hash(ensemble)
    return sections


def write_fingerprint(folder: Path, stage: str, sections: dict[str, str]) -> None:
    write_json(folder / FILE, {"stage": stage, "sections": sections})


def check_fingerprint(folder: Path, expected: dict[str, str], stage: str) -> None:
    """Refuse `folder` when it was made under other settings of the sections in `expected`."""
    path = folder / FILE
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("sections")
    except (ValueError, AttributeError):
        recorded = None
    if not isinstance(recorded, dict):
        raise UserError(f"{stage}: {path} is not a peftlab fingerprint; delete {folder} to make it again")
    differing = [key for key in sorted(expected.keys() | recorded.keys()) if expected.get(key) != recorded.get(key)]
    if differing:
        verb = "differs" if len(differing) == 1 else "differ"
        raise UserError(
            f"{stage}: {folder} was made under a different config ({', '.join(differing)} {verb}); use another"
            f" --out, or delete {folder} to make it again"
        )
