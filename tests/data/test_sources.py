"""Local source files: .json arrays, .jsonl, .parquet, each optionally gzipped; demo sources."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from peftlab.config import SourceConfig
from peftlab.data.sources import load_source
from peftlab.errors import UserError

ROWS = [{"instruction": f"Say {i}", "input": "", "output": str(i)} for i in range(5)]


def _source(path) -> SourceConfig:
    return SourceConfig(name="s", format="alpaca", path=str(path))


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet", "json.gz", "jsonl.gz", "parquet.gz"])
def test_every_local_format_loads_the_same_rows(tmp_path, kind):
    base = kind.removesuffix(".gz")
    if base == "json":
        payload = json.dumps(ROWS).encode()
    elif base == "jsonl":
        payload = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    else:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(ROWS), sink)
        payload = sink.getvalue().to_pybytes()
    if kind.endswith(".gz"):
        payload = gzip.compress(payload)
    path = tmp_path / f"rows.{kind}"
    path.write_bytes(payload)
    loaded = load_source(_source(path))
    assert list(loaded.rows) == ROWS
    assert loaded.fingerprint.startswith("sha256:")


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + "[1, 2]\n")
    with pytest.raises(UserError, match=r"rows.jsonl line 3: expected a JSON object"):
        load_source(_source(path))


def test_unsupported_and_corrupt_files(tmp_path):
    csv = tmp_path / "rows.csv"
    csv.write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported file type"):
        load_source(_source(csv))
    bad = tmp_path / "rows.jsonl.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(UserError, match="not a valid gzip file"):
        load_source(_source(bad))


def test_demo_source_and_its_errors():
    loaded = load_source(SourceConfig(name="d", format="tulu", path="demo:tulu:30"))
    assert len(loaded.rows) == 30 and "messages" in loaded.rows[0]
    with pytest.raises(UserError, match="use demo:"):
        load_source(SourceConfig(name="d", format="tulu", path="demo:csv"))
