"""One workflow function per stage (prepare -> train -> evaluate -> report) and the study that chains them.

Each stage reads only what earlier stages wrote in the run directory and writes its own folder
atomically, so any stage can be re-run alone and `study` skips stages whose outputs are complete.
"""

from __future__ import annotations

import sys
from pathlib import Path

from peftlab.config import StudyConfig
from peftlab.errors import UserError


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_prepare(config: StudyConfig, run_dir: Path) -> dict:
    from peftlab.data.prepare import prepare_data
    from peftlab.models import load_tokenizer
    from peftlab.rundir import write_provenance

    tokenizer = load_tokenizer(config.model)
    stats = prepare_data(config, run_dir, tokenizer)
    write_provenance(run_dir, config, data_hashes={**stats["source_fingerprints"], **stats["file_hashes"]})
    for split, summary in stats["splits"].items():
        if summary["rows"]:
            per_source = ", ".join(f"{k} {v}" for k, v in summary["per_source"].items())
            say(f"{split}: {summary['rows']} rows ({per_source}), {summary['tokens']} tokens")
    say(f"wrote {run_dir / 'data'}")
    return stats


def run_train(config: StudyConfig, run_dir: Path, method: str, *, resume: bool = False) -> dict:
    from peftlab.rundir import write_provenance
    from peftlab.train.runner import train_method

    config.method(method)  # unknown method -> one clear error before anything loads
    if not (run_dir / "data" / "train.jsonl").exists():
        raise UserError(f"{run_dir / 'data'}: no prepared data; run `peftlab prepare` first")
    write_provenance(run_dir, config)
    metrics = train_method(config, run_dir, method, resume=resume)
    peak = metrics["peak_gpu_alloc_gib"]
    memory = f"peak GPU {peak:.2f} GiB" if peak is not None else f"peak RSS {metrics['peak_rss_gib']:.2f} GiB (CPU)"
    say(f"{method}: {metrics['optimizer_steps']} steps, final loss {metrics['final_loss']:.4f},"
        f" {metrics['train_time_s']:.1f} s, {metrics['tokens_per_s']:.0f} tokens/s, {memory}")
    return metrics
