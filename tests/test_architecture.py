"""The package's layers import downward only (cli -> workflow -> train / evaluate / report -> methods / data
-> models -> config / errors), so the tree shows the architecture and no import cycle can form."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "peftlab"

# Each top-level module or package of peftlab, by layer: a layer may import only lower layers (and itself).
LAYERS = {
    "errors": 0, "console": 0,
    "config": 1, "distributed": 1,
    "runguard": 1,
    "rundir": 2, "fingerprints": 3,
    "models": 3,
    "data": 4, "methods": 4, "network": 5,
    "train": 5, "evaluate": 5, "report": 5,
    "results": 6, "hybrid": 6,
    "export": 7, "chat": 7,
    "workflow": 8, "bench": 8,
    "cli": 9,
    "__main__": 10,
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "peftlab"


def _imports(path: Path) -> set[str]:
    """Every peftlab module `path` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("peftlab"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("peftlab"))
    return found


def test_every_part_of_the_package_has_a_layer():
    parts = {path.stem if path.is_file() else path.name for path in PACKAGE.iterdir()
             if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").exists()}
    assert parts - set(LAYERS) == set(), "add new modules to LAYERS in tests/test_architecture.py"


def test_layers_import_downward_only():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        importer = _part(".".join(relative.parts))
        if importer == "peftlab":  # peftlab/__init__.py
            continue
        for module in _imports(path):
            imported = _part(module)
            if imported != importer and LAYERS[imported] >= LAYERS[importer]:
                upward.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert upward == []
