"""The run directory: its layout, atomic writes, and the provenance files (resolved config, env.json).

Every stage writes into a temporary sibling and renames it into place when complete, so a folder
that exists under its final name is always whole. A stage is "done" when its folder exists.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from peftlab.config import StudyConfig, dump_config

TRACKED_PACKAGES = (
    "peftlab", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "galore-torch", "trl",
    "datasets", "tokenizers", "safetensors", "sacrebleu", "rouge-score", "numpy", "liger-kernel", "gguf",
)


def default_run_dir(config: StudyConfig) -> Path:
    return Path("runs") / config.name


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `final` only if the block completes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir()
    try:
        yield temp
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    # Set the old folder aside before deleting it: a kill leaves the stage whole or absent (to be re-run),
    # never half-deleted; what was set aside is a leftover that runguard removes.
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(temp, final)
    if old.exists():
        shutil.rmtree(old)


def final_complete(final: Path) -> bool:
    """A trained model's `final/` holds its config and weights (full model or adapters)."""
    has_config = any((final / name).is_file() for name in ("config.json", "adapter_config.json"))
    return has_config and any(next(final.glob(pattern), None) is not None for pattern in ("*.safetensors", "*.bin"))


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temp, path)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


_JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
                    bool: "boolean", type(None): "null"}


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type (for messages about user files)."""
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def json_object(line: str, where: str) -> dict[str, Any]:
    """One JSONL line as an object; a bad line is a user error starting with `where`."""
    from peftlab.errors import UserError

    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: malformed JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {json_type(row)}")
    return row


def jsonl_objects(text: str, label: str) -> list[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for each non-blank line; a bad line is a user error naming it."""
    return [(number, json_object(line, f"{label} line {number}"))
            for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file the project wrote."""
    return [row for _, row in jsonl_objects(path.read_text(encoding="utf-8"), str(path))]


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
            info["cuda"] = torch.version.cuda
        else:
            info["gpu"] = None
    except ImportError:
        info["gpu"] = None
    return info


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit() -> str | None:
    out = _git("rev-parse", "HEAD")
    return (out.strip() or None) if out is not None else None


def git_dirty() -> bool | None:
    """True when tracked files differ from `git_commit()`: the code that ran is not that commit."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    return bool(out.strip()) if out is not None else None


def read_run_config(run_dir: Path) -> StudyConfig:
    """The study config a run directory was made with (its config.resolved.yaml)."""
    import yaml

    from peftlab.config import config_from_dict
    from peftlab.errors import UserError

    path = run_dir / "config.resolved.yaml"
    if not path.is_file():
        what = "no such run directory" if not run_dir.is_dir() else "no config.resolved.yaml (not a peftlab run?)"
        raise UserError(f"{run_dir}: {what}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of config sections")
    return config_from_dict(raw, source=str(path))


def write_provenance(run_dir: Path, config: StudyConfig, data_hashes: dict[str, str] | None = None) -> None:
    """config.resolved.yaml and env.json at the top of the run directory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.resolved.yaml", dump_config(config))
    env_path = run_dir / "env.json"
    env = _read_env(env_path) if env_path.exists() else {}
    env.update({
        "versions": package_versions(),
        "hardware": hardware(),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config_file": config.source_file,
    })
    if data_hashes is not None:
        env["data_hashes"] = data_hashes
    write_json(env_path, env)


def _read_env(path: Path) -> dict[str, Any]:
    from peftlab.errors import UserError

    advice = "delete it and peftlab writes a new one"
    try:
        env = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({getattr(exc, 'msg', exc)}); {advice}") from None
    if not isinstance(env, dict):
        raise UserError(f"{path}: expected a JSON object, got {json_type(env)}; {advice}")
    return env


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()
