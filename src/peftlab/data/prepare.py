"""The data stage: sample, convert, render, tokenise, balance and write `data/` of a run directory.

Report sections 3-4, done right:
- an independent seeded RNG per source (seeded by the study seed and the source name), drawing
  `train_buffer + test_buffer` distinct indices; train and test index sets are disjoint (asserted);
- conversion per format (`formats.py`), rendering with the tokenizer's own chat template (`chat.py`;
  Gemma 3: one `<bos>`), content tokenised as text, the assistant tokens marked;
- over-long rows dropped or truncated (`prepare.overlength`), every drop counted by reason;
- a test row over the length is truncated at a turn boundary (`chat.fit_exchanges`: a prompt ending in
  a user turn and its answer, within `max_seq_length`) or dropped when its first exchange is longer;
  `overlength_rows` counts the rows kept after truncation per split;
- exactly `train_per_source` / `test_per_source` rows per source, else a clear error;
- the combined rows shuffled with the study seed; output files are byte-identical for a config.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from peftlab.config import SourceConfig, StudyConfig
from peftlab.data.chat import ChatTemplate, chat_template, fit_exchanges
from peftlab.data.formats import Dropped, convert_row
from peftlab.data.sources import LoadedSource, load_source
from peftlab.errors import UserError
from peftlab.fingerprints import prepare_sections, write_fingerprint
from peftlab.rundir import atomic_dir, read_jsonl, sha256_file, write_json, write_text

SPLITS = ("train", "validation", "test")


@dataclass
class SplitBuffer:
    """The rows of one source and split that survived conversion, in sampling order."""

    sampled: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0


def source_rng(seed: int, source_name: str) -> np.random.Generator:
    """Independent stream per source: its draw does not depend on any other source."""
    return np.random.default_rng([seed, zlib.crc32(source_name.encode("utf-8"))])


def sample_indices(num_rows: int, train_buffer: int, test_buffer: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    order = rng.permutation(num_rows)[: train_buffer + test_buffer]
    train, test = order[:train_buffer].tolist(), order[train_buffer:].tolist()
    assert not set(train) & set(test), "train and test indices overlap"
    return train, test


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def prepare_data(config: StudyConfig, run_dir: Path, tokenizer) -> dict[str, Any]:
    """Write `run_dir/data/` atomically and return the stats written to `stats.json`."""
    data = config.data
    chat = chat_template(tokenizer, f"tokenizer {config.model.tokenizer or config.model.name_or_path}")
    per_split: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    source_stats: dict[str, Any] = {}
    fingerprints: dict[str, str] = {}
    for source in data.sources:
        loaded = load_source(source)
        fingerprints[source.name] = loaded.fingerprint
        selected, stats = _prepare_source(config, source, loaded, chat)
        source_stats[source.name] = stats
        for split in SPLITS:
            per_split[split].extend(selected[split])
    mixer = np.random.default_rng(data.seed)
    for split in SPLITS:
        rows = per_split[split]
        per_split[split] = [rows[i] for i in mixer.permutation(len(rows))]
    stats = {
        "seed": data.seed,
        "max_seq_length": data.max_seq_length,
        "overlength": config.prepare.overlength,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_template": {"sha256": hashlib.sha256(chat.template.encode("utf-8")).hexdigest()[:16],
                          "turn_end": chat.turn_end, "system": chat.system,
                          "assistant_spans": "generation blocks" if chat.has_generation_markers else "turn prefixes"},
        "sources": source_stats,
        "splits": {split: _split_summary(rows) for split, rows in per_split.items()},
        "source_fingerprints": fingerprints,
    }
    with atomic_dir(run_dir / "data") as out:
        for split in SPLITS:
            if split == "validation" and not per_split[split]:
                continue
            _write_jsonl(out / f"{split}.jsonl", per_split[split])
        stats["file_hashes"] = {p.name: sha256_file(p) for p in sorted(out.glob("*.jsonl"))}
        write_json(out / "stats.json", stats)
        write_fingerprint(out, "prepare", prepare_sections(config))
        _write_examples(out / "examples", config.data.sources, per_split["train"], tokenizer)
    return stats


def _prepare_source(config: StudyConfig, source: SourceConfig, loaded: LoadedSource, chat: ChatTemplate):
    data = config.data
    needed = data.train_buffer + data.test_buffer
    available = len(loaded.rows)
    if available < needed:
        raise UserError(
            f"data source '{source.name}': {loaded.origin} has {available} rows, fewer than"
            f" data.train_buffer + data.test_buffer = {needed}; lower the buffers (and the per-source counts)"
        )
    train_idx, test_idx = sample_indices(available, data.train_buffer, data.test_buffer, source_rng(data.seed, source.name))
    buffers = {
        "train": _convert_buffer(config, source, loaded, train_idx, chat, "train"),
        "test": _convert_buffer(config, source, loaded, test_idx, chat, "test"),
    }
    quotas = {"train": data.train_per_source, "test": data.test_per_source}
    val_quota = config.prepare.validation_per_source
    for split, buffer_key in (("train", "train_buffer"), ("test", "test_buffer")):
        usable = len(buffers[split].rows)
        need = quotas[split] + (val_quota if split == "train" else 0)
        if usable < need:
            raise UserError(
                f"data source '{source.name}': only {usable} usable {split} rows after filtering"
                f" ({_describe_drops(buffers[split])}), need {need}; raise data.{buffer_key}"
                f" (now {getattr(data, buffer_key)}) or lower the per-source count"
            )
    train_rows = buffers["train"].rows
    selected = {
        "train": train_rows[: quotas["train"]],
        "validation": train_rows[quotas["train"]: quotas["train"] + val_quota],
        "test": buffers["test"].rows[: quotas["test"]],
    }
    stats = {
        "origin": loaded.origin,
        "format": source.format,
        "rows_available": available,
        **{split: _buffer_stats(buffers[split], len(selected[split])) for split in ("train", "test")},
        "validation": {"selected": len(selected["validation"])},
    }
    return selected, stats


def _convert_buffer(config, source, loaded, indices, chat: ChatTemplate, split) -> SplitBuffer:
    buffer = SplitBuffer(sampled=len(indices))
    max_len = config.data.max_seq_length
    truncate = config.prepare.overlength == "truncate"
    for index in tqdm(indices, desc=f"{source.name} {split}", unit="row", leave=False, disable=None):
        where = loaded.where(index)
        try:
            messages = convert_row(loaded.rows[index], source.format, where)
        except Dropped as drop:
            buffer.dropped[drop.reason] += 1
            continue
        messages = chat.conversation(messages, where)
        rendered = chat.render(messages, where)
        evaluated = split == "test"  # a prompt and its reference: cut at turns, never inside one
        tokens = chat.tokenize(rendered, max_len if truncate and not evaluated else None, where)
        if len(tokens.input_ids) > max_len and truncate and evaluated:
            fitted = fit_exchanges(messages, chat, max_len, where)
            if fitted is not None:
                messages, rendered = fitted, chat.render(fitted, where)
                tokens = replace(chat.tokenize(rendered, None, where), truncated=True)
        if len(tokens.input_ids) > max_len:
            buffer.dropped["overlength"] += 1
            continue
        if tokens.num_assistant_tokens == 0:
            buffer.dropped["no_assistant_tokens_after_truncation"] += 1
            continue
        buffer.truncated += tokens.truncated
        buffer.rows.append({
            "id": f"{source.name}-{index}",
            "source_dataset": source.name,
            "source_index": index,
            "messages": messages,
            "text": rendered.text,
            "num_tokens": len(tokens.input_ids),
            "truncated": tokens.truncated,
            "input_ids": tokens.input_ids,
            "assistant_spans": tokens.assistant_spans,
        })
    return buffer


def _describe_drops(buffer: SplitBuffer) -> str:
    if not buffer.dropped:
        return f"{buffer.sampled} sampled, none dropped"
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(buffer.dropped.items()))
    return f"{buffer.sampled} sampled, dropped: {reasons}"


def _buffer_stats(buffer: SplitBuffer, selected: int) -> dict[str, Any]:
    return {
        "sampled": buffer.sampled,
        "dropped": dict(sorted(buffer.dropped.items())),
        "truncated": buffer.truncated,
        "usable": len(buffer.rows),
        "selected": selected,
    }


def _split_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    lengths = [row["num_tokens"] for row in rows]
    return {
        "rows": len(rows),
        # Rows longer than max_seq_length kept by truncation (train: cut at the limit; test: cut back
        # to the last exchange that fits). Dropped rows are counted per source.
        "overlength_rows": sum(1 for row in rows if row["truncated"]),
        "per_source": dict(sorted(Counter(row["source_dataset"] for row in rows).items())),
        "tokens": int(sum(lengths)),
        "assistant_tokens": int(sum(e - s for row in rows for s, e in row["assistant_spans"])),
        "mean_tokens": round(float(np.mean(lengths)), 2) if lengths else 0.0,
        "max_tokens": int(max(lengths)) if lengths else 0,
    }


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")


def _write_examples(folder: Path, sources: list[SourceConfig], train_rows: list[dict[str, Any]], tokenizer) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    bos = tokenizer.bos_token
    for source in sources:
        row = next((r for r in train_rows if r["source_dataset"] == source.name), None)
        if row is None:
            continue
        body = (
            f"# {row['id']} ({source.format}, {row['num_tokens']} tokens)\n\n"
            f"## Rendered text (tokenised without adding special tokens: {_written_by_template(row['text'], bos)})"
            f"\n\n{row['text']}\n\n"
            f"## Messages\n\n{json.dumps(row['messages'], indent=2, ensure_ascii=False)}\n"
        )
        write_text(folder / f"{source.name}_example.txt", body)


def _written_by_template(text: str, bos: str | None) -> str:
    if bos and text.startswith(bos) and text.count(bos) == 1:
        return f"one {bos}"
    return "only the template's own"


def read_split(run_dir: Path, split: str) -> list[dict[str, Any]]:
    path = run_dir / "data" / f"{split}.jsonl"
    if not path.exists():
        raise UserError(f"{path}: missing; run `peftlab prepare` first")
    return read_jsonl(path)
