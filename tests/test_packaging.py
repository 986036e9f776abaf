"""The wheel ships every data file the package reads at run time: each non-Python file under
src/peftlab matches a `[tool.setuptools.package-data]` pattern of pyproject.toml."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "peftlab"


def test_every_data_file_of_the_package_is_package_data():
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["peftlab"]
    covered = {path for pattern in patterns for path in PACKAGE.glob(pattern)}
    data_files = {path for path in PACKAGE.rglob("*")
                  if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts}
    assert data_files, "no data files found: the test would pass vacuously"
    assert {p.relative_to(PACKAGE).as_posix() for p in data_files - covered} == set()
    assert (PACKAGE / "configs" / "models" / "tiny-gemma3.json") in covered
