"""Provenance sections of the report: the data that went in (splits, sources, dropped rows) and how to
reproduce the run (the command, the config argument and the methods' settings).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from peftlab.report import fmt
from peftlab.report.doc import Bullet, Bullets, Code, Paragraph, Table
from peftlab.report.fmt import display, is_number
from peftlab.report.load import RunData
from peftlab.report.recommend import recipe_length

# ---------------------------------------------------------------------------------------------- data


def data_blocks(run: RunData) -> list[Any]:
    stats = run.stats
    if not stats:
        return [Paragraph("No data/stats.json in the run directory.", muted=True)]
    blocks: list[Any] = []
    splits = {k: v for k, v in (stats.get("splits") or {}).items() if isinstance(v, dict)}
    if splits:
        sources = sorted({s for split in splits.values() for s in (split.get("per_source") or {})})
        rows = [
            [
                name,
                fmt.integer(split.get("rows")),
                *(fmt.integer((split.get("per_source") or {}).get(s)) for s in sources),
                fmt.integer(split.get("tokens")),
                fmt.rate(split.get("mean_tokens")),
                fmt.integer(split.get("max_tokens")),
            ]
            for name, split in splits.items()
        ]
        headers = ["Split", "Rows", *sources, "Tokens", "Mean tokens", "Max tokens"]
        blocks.append(
            Table(headers, rows, "l" + "r" * (len(headers) - 1), caption="Splits (rows per source)")
        )
    sources = {k: v for k, v in (stats.get("sources") or {}).items() if isinstance(v, dict)}
    rows = []
    for source, per_split in sources.items():
        for split, s in per_split.items():
            if isinstance(s, dict):
                rows.append(
                    [
                        source,
                        split,
                        fmt.integer(s.get("sampled")),
                        _dropped(s.get("dropped")),
                        fmt.integer(s.get("truncated")),
                        fmt.integer(s.get("usable")),
                        fmt.integer(s.get("selected")),
                    ]
                )
    if rows:
        headers = ["Source", "Split", "Sampled", "Dropped", "Truncated", "Usable", "Selected"]
        blocks.append(Table(headers, rows, "llrrrrr", caption="Preparation per source"))
    return blocks or [Paragraph("data/stats.json has no splits or sources.", muted=True)]


def _dropped(dropped: object) -> str:
    if is_number(dropped):
        return fmt.integer(dropped)
    if not isinstance(dropped, dict):
        return fmt.MISSING
    counts = {k: v for k, v in dropped.items() if is_number(v) and v}
    total = sum(counts.values())
    if not counts:
        return "0"
    return f"{fmt.integer(total)} (" + ", ".join(f"{k}: {fmt.integer(v)}" for k, v in counts.items()) + ")"


# ----------------------------------------------------------------------------------------- reproduce


def reproduce_blocks(run: RunData) -> list[Any]:
    command = reproduce_command(run)
    blocks: list[Any] = [
        Paragraph("Re-run the whole study (finished stages are skipped), then rebuild this report:"),
        Code(f"{command}\npeftlab report {shlex.quote(_run_dir_argument(run))}"),
    ]
    if run.env.get("command"):
        blocks.append(Paragraph(f"This run was started with: {run.env['command']}", muted=True))
    methods = run.config.get("methods")
    if isinstance(methods, dict) and methods:
        blocks.append(_methods_table(methods))
    versions = run.results.get("versions") or run.env.get("versions") or {}
    if isinstance(versions, dict) and versions:
        blocks.append(Paragraph("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."))
    facts = []
    hardware = run.results.get("hardware") or run.env.get("hardware") or {}
    if isinstance(hardware, dict):
        facts += [f"{k}: {v}" for k, v in hardware.items() if v is not None]
    if run.env.get("git_commit"):
        facts.append(f"git commit: {run.env['git_commit']}")
    if facts:
        blocks.append(Bullets([Bullet(f) for f in facts]))
    return blocks


def _run_dir_argument(run: RunData) -> str:
    """The run directory as the recorded command named it (--out), else as this report was built."""
    args = _recorded_args(run)
    for i, arg in enumerate(args):
        if arg == "--out" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--out="):
            return arg.removeprefix("--out=")
    return str(run.run_dir)


def _recorded_args(run: RunData) -> list[str]:
    command = run.env.get("command")
    if not isinstance(command, str):
        return []
    try:
        return shlex.split(command)[1:]
    except ValueError:
        return command.split()[1:]


def reproduce_command(run: RunData) -> str:
    """`peftlab study CONFIG [--set K=V ...] --out RUN`: the recorded command's config (repo-relative, or a
    shipped config's name), every --set override in order, and the run directory."""
    args = _recorded_args(run)
    overrides = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--set"]
    overrides += [a.removeprefix("--set=") for a in args if a.startswith("--set=")]
    parts = ["peftlab", "study", config_argument(run)]
    for item in overrides:
        parts += ["--set", item]
    parts += ["--out", _run_dir_argument(run)]
    return " ".join(shlex.quote(p) for p in parts[:3]) + "".join(
        f" \\\n  {shlex.quote(parts[i])} {shlex.quote(parts[i + 1])}" for i in range(3, len(parts), 2)
    )


def config_argument(run: RunData) -> str:
    """The study config as a command argument: a shipped config's name, a path relative to the repository
    (or working directory) holding it, else the run's own config.resolved.yaml."""
    recorded = run.env.get("config_file")
    if not isinstance(recorded, str) or not recorded:
        return str(run.run_dir / "config.resolved.yaml")
    path = Path(recorded)
    from peftlab.config import BUILTIN_CONFIG_DIR

    if path.is_absolute() and path.parent.resolve() == BUILTIN_CONFIG_DIR.resolve():
        return path.stem
    if not path.is_absolute():
        return recorded
    for root in (Path.cwd(), *_repository_roots(path)):
        try:
            return str(path.relative_to(root))
        except ValueError:
            continue
    return recorded


def _repository_roots(path: Path) -> list[Path]:
    return [parent for parent in path.parents if (parent / ".git").exists() or (parent / "pyproject.toml").is_file()]


def _methods_table(methods: dict[str, Any]) -> Table:
    rows = []
    for name, m in methods.items():
        if not isinstance(m, dict):
            continue
        stages = [st for st in m.get("stages") or [] if isinstance(st, dict)]
        if stages:  # each stage runs its own method's recipe: the hybrid's own epochs, LR and batch are unused
            trained = [st for st in stages if st.get("method") != "merge"]
            own = [methods.get(st.get("method")) if isinstance(methods.get(st.get("method")), dict) else {}
                   for st in trained]
            lrs = [f"{display(str(st.get('method')))} {o['lr']:g}" for st, o in zip(trained, own, strict=True)
                   if is_number(o.get("lr"))]
            batches = [f"{display(str(st.get('method')))} {_batch(o)}" for st, o in zip(trained, own, strict=True)
                       if _batch(o)]
            rows.append([display(name), str(m.get("kind", "")), recipe_length(m, methods),
                         ", ".join(lrs) or fmt.MISSING, ", ".join(batches) or fmt.MISSING, _method_details(m)])
            continue
        lr = m.get("lr")
        rows.append(
            [
                display(name),
                str(m.get("kind", "")),
                recipe_length(m, methods),
                f"{lr:g}" if is_number(lr) else fmt.MISSING,
                _batch(m) or fmt.MISSING,
                _method_details(m),
            ]
        )
    return Table(
        ["Method", "Kind", "Length", "LR", "Batch × accum", "Details"],
        rows,
        "llllll",
        caption="Training recipes (from the resolved config)",
        notes=["A staged method runs each stage with that method's recipe (its LR, batch and settings) for the"
               " stage's own length."] if any(isinstance(m, dict) and m.get("stages") for m in methods.values()) else [],
    )


def _batch(m: dict[str, Any]) -> str:
    if is_number(m.get("batch_size")) and is_number(m.get("grad_accum")):
        return f"{m['batch_size']} × {m['grad_accum']}"
    return ""


def _method_details(m: dict[str, Any]) -> str:
    kind = m.get("kind")
    if kind in ("qlora", "lora"):
        text = "LoRA " + _settings(m.get("lora"), {"r": "r", "alpha": "α", "dropout": "dropout"})
        quant = (m.get("quant") or {}).get("quant_type") if isinstance(m.get("quant"), dict) else None
        return text + (f", {quant}" if kind == "qlora" and quant else "")
    if kind == "galore":
        return "GaLore " + _settings(
            m.get("galore"), {"rank": "rank", "update_proj_gap": "gap", "scale": "scale"}
        )
    if kind == "hybrid":
        stages = [display(str(s.get("method"))) for s in m.get("stages") or [] if isinstance(s, dict)]
        return " → ".join(stages)
    return ""


def _settings(block: object, names: dict[str, str]) -> str:
    """`r=16, α=32` from the keys of a settings mapping that are present."""
    if not isinstance(block, dict):
        return ""
    return ", ".join(f"{label}={block[key]}" for key, label in names.items() if block.get(key) is not None)
