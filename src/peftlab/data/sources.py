"""Where rows come from: hub datasets, local `.json` / `.jsonl` / `.parquet` files (optionally `.gz`),
and the package's own demo data (`demo:<schema>[:<rows>]`).

A source is returned as a random-access table (`len()` and indexing), so sampling can draw indices
without converting the rows it does not use. Local files are read fully; hub datasets stay lazy.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.config import SourceConfig, expand_path
from peftlab.errors import UserError
from peftlab.rundir import jsonl_objects

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
DEMO_SCHEMAS = ("alpaca", "tulu", "ultrachat")
DEMO_DEFAULT_ROWS = 1000


@dataclass
class LoadedSource:
    rows: Sequence[dict[str, Any]]
    # Human-readable origin used in error messages ("file.jsonl", "hub tatsu-lab/alpaca[train]").
    origin: str
    # sha256 of the local file, or the hub id + split + fingerprint, for env.json.
    fingerprint: str
    # 1-based line number of each row of a JSONL file (blank lines skipped), for error messages.
    line_numbers: list[int] | None = None

    def where(self, index: int) -> str:
        """Names a row in an error message: `file.jsonl line 12` or `file.json row 11`."""
        if self.line_numbers is not None:
            return f"{self.origin} line {self.line_numbers[index]}"
        return f"{self.origin} row {index}"


def load_source(source: SourceConfig) -> LoadedSource:
    path = expand_path(source.path)
    if path.startswith("demo:"):
        return _load_demo(path)
    local = Path(path)
    if local.exists():
        return _load_local(local)
    if _looks_local(path):
        raise UserError(f"data source '{source.name}': file not found: {path}")
    return _load_hub(source, path)


def names_hub_dataset(path_setting: str) -> bool:
    """Whether `load_source` loads a source whose path is `path_setting` from the hub."""
    path = expand_path(path_setting)
    return not (path.startswith("demo:") or Path(path).exists() or _looks_local(path))


def _looks_local(path: str) -> bool:
    base = path.removesuffix(".gz")
    return path.startswith((".", "/", "~")) or base.endswith(LOCAL_SUFFIXES) or path.count("/") != 1


def _load_demo(path: str) -> LoadedSource:
    from peftlab.data.demo import generate_rows

    parts = path.split(":")
    schema = parts[1] if len(parts) > 1 else ""
    if schema not in DEMO_SCHEMAS or len(parts) > 3:
        raise UserError(f"demo source '{path}': use demo:<{'|'.join(DEMO_SCHEMAS)}>[:<rows>]")
    try:
        count = int(parts[2]) if len(parts) == 3 else DEMO_DEFAULT_ROWS
    except ValueError:
        raise UserError(f"demo source '{path}': the row count must be an integer") from None
    rows = generate_rows(schema, count, seed=0)  # type: ignore[arg-type]
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    return LoadedSource(rows=rows, origin=path, fingerprint=f"sha256:{digest}")


def _load_local(path: Path) -> LoadedSource:
    if path.is_dir():
        raise UserError(f"{path}: is a directory; point data.sources[].path at a .json/.jsonl/.parquet file")
    raw = path.read_bytes()
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    name = path.name
    if name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise UserError(f"{path}: not a valid gzip file ({exc})") from None
        name = name[:-3]
    if name.endswith(".jsonl"):
        rows, lines = _parse_jsonl(raw, path)
        return LoadedSource(rows, str(path), digest, line_numbers=lines)
    if name.endswith(".json"):
        return LoadedSource(_parse_json_array(raw, path), str(path), digest)
    if name.endswith(".parquet"):
        return LoadedSource(_parse_parquet(raw, path), str(path), digest)
    raise UserError(f"{path}: unsupported file type; use .json (array), .jsonl or .parquet, optionally .gz")


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def _parse_jsonl(raw: bytes, path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    numbered = jsonl_objects(_decode(raw, path), str(path))
    if not numbered:
        raise UserError(f"{path}: no rows")
    return [row for _, row in numbered], [number for number, _ in numbered]


def _parse_json_array(raw: bytes, path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(_decode(raw, path))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} line {exc.lineno}: malformed JSON ({exc.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of objects (use .jsonl for one object per line)")
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise UserError(f"{path} row {index}: expected a JSON object, got {type(row).__name__}")
    if not data:
        raise UserError(f"{path}: no rows")
    return data


def _parse_parquet(raw: bytes, path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(raw))
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise UserError(f"{path}: not a readable parquet file ({exc})") from None
    rows = table.to_pylist()
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def _load_hub(source: SourceConfig, hub_id: str) -> LoadedSource:
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"data source '{source.name}': loading hub dataset {hub_id} needs the 'datasets' package"
        ) from None
    try:
        table = datasets.load_dataset(hub_id, source.subset, split=source.split)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UserError(
            f"data source '{source.name}': could not load hub dataset {hub_id} (split {source.split}): {reason}."
            " Offline? Download it elsewhere and set the source's path to a local .jsonl/.json/.parquet file"
        ) from None
    fingerprint = f"hub:{hub_id}:{source.subset or ''}:{source.split}:{getattr(table, '_fingerprint', '')}"
    return LoadedSource(rows=table, origin=f"hub {hub_id}[{source.split}]", fingerprint=fingerprint)
