"""One workflow function per stage (prepare -> train -> evaluate -> report) and the study that chains them.

Each stage reads only what earlier stages wrote in the run directory and writes its own folder
atomically, so any stage can be re-run alone and `study` skips stages whose outputs are complete.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from peftlab.config import StudyConfig
from peftlab.errors import UserError
from peftlab.runguard import claim_run_dir


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_prepare(config: StudyConfig, run_dir: Path) -> dict:
    with claim_run_dir(run_dir):
        return _prepare(config, run_dir)


def _prepare(config: StudyConfig, run_dir: Path) -> dict:
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


def run_train(config: StudyConfig, run_dir: Path, method: str, *, resume: bool = False, fsdp: bool = False) -> dict:
    with claim_run_dir(run_dir):
        return _train(config, run_dir, method, resume=resume, fsdp=fsdp)


def _train(config: StudyConfig, run_dir: Path, method: str, *, resume: bool, fsdp: bool) -> dict:
    from peftlab.distributed import distributed_rank_world
    from peftlab.fingerprints import check_fingerprint, prepare_sections, train_sections
    from peftlab.hybrid import train_hybrid
    from peftlab.rundir import write_provenance
    from peftlab.train.launch import check_launch
    from peftlab.train.runner import train_method

    rank, world = distributed_rank_world()
    check_launch(config, method, world=world, fsdp=fsdp)  # before anything loads
    if not (run_dir / "data" / "train.jsonl").exists():
        raise UserError(f"{run_dir / 'data'}: no prepared data; run `peftlab prepare` first")
    check_fingerprint(run_dir / "data", prepare_sections(config), f"train {method}")
    if resume:
        check_fingerprint(run_dir / "train" / method, train_sections(config, method), f"train {method} --resume")
    if rank == 0:
        write_provenance(run_dir, config)
    if config.method(method).kind == "hybrid":
        metrics = train_hybrid(config, run_dir, method, resume=resume)
    else:
        metrics = train_method(config, run_dir, method, resume=resume, fsdp=fsdp)
    if rank != 0:
        return metrics
    peak = metrics["peak_gpu_alloc_gib"]
    memory = f"peak GPU {peak:.2f} GiB" if peak is not None else f"peak RSS {metrics['peak_rss_gib']:.2f} GiB (CPU)"
    final_loss = "n/a" if metrics["final_loss"] is None else f"{metrics['final_loss']:.4f}"
    say(f"{method}: {metrics['optimizer_steps']} steps, final loss {final_loss},"
        f" {metrics['train_time_s']:.1f} s, {metrics['tokens_per_s']:.0f} tokens/s, {memory}")
    return metrics


def run_evaluate(config: StudyConfig, run_dir: Path, model: str, *, limit: int | None = None) -> dict:
    with claim_run_dir(run_dir):
        return _evaluate(config, run_dir, model, limit=limit)


def _evaluate(config: StudyConfig, run_dir: Path, model: str, *, limit: int | None) -> dict:
    from peftlab.config import evaluated_models, seed_runs
    from peftlab.evaluate.runner import evaluate_model
    from peftlab.fingerprints import check_fingerprint, prepare_sections, train_sections

    known = {run for name in ("base", *config.methods, *evaluated_models(config)) for run in seed_runs(config, name)}
    if model not in known:
        raise UserError(f"--model {model}: not base, a configured method or ensemble (known: {', '.join(sorted(known))})")
    if not (run_dir / "data" / "test.jsonl").exists():
        raise UserError(f"{run_dir / 'data'}: no prepared data; run `peftlab prepare` first")
    check_fingerprint(run_dir / "data", prepare_sections(config), f"evaluate {model}")
    for member in (config.evaluate.ensemble.members if model == "ensemble" else [model]):
        if member != "base":
            check_fingerprint(run_dir / "train" / member, train_sections(config, member), f"evaluate {model}")
    metrics = evaluate_model(config, run_dir, model, limit=limit)
    if not metrics:  # a non-zero rank of a sharded evaluation
        return metrics
    speed = metrics["generation"]
    say(f"{model}: BLEU-4 {metrics['bleu4']:.4f} [{metrics['bleu4_ci'][0]:.4f}, {metrics['bleu4_ci'][1]:.4f}]"
        f"  ROUGE-L {metrics['rougeL']:.4f} [{metrics['rougeL_ci'][0]:.4f}, {metrics['rougeL_ci'][1]:.4f}]"
        f"  n={metrics['n']}  ({speed['tokens_per_s']:.0f} generated tokens/s)")
    return metrics


def run_report(run_dir: Path) -> None:
    from peftlab.report import build_report
    from peftlab.results import ensure_results

    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    with claim_run_dir(run_dir, create=False):
        done = ensure_results(run_dir)  # rebuilds results.json from the stage outputs when it is missing
        if done:
            say(done)
        written = build_report(run_dir)
    for path in written.values():
        say(f"wrote {path}")


def run_study(config: StudyConfig, run_dir: Path) -> dict:
    """prepare -> train every method -> evaluate every model -> results.json -> report; skips finished stages
    (and refuses finished stages made under other settings of the config sections they depend on)."""
    with claim_run_dir(run_dir):
        return _study(config, run_dir)


def _study(config: StudyConfig, run_dir: Path) -> dict:
    from peftlab.config import evaluated_models, seed_runs
    from peftlab.fingerprints import check_fingerprint, evaluate_sections, prepare_sections, train_sections
    from peftlab.results import collect_results
    from peftlab.rundir import final_complete, write_provenance

    models = evaluated_models(config)
    trained = [run for method in config.methods for run in seed_runs(config, method)]
    evaluated = [run for model in models for run in seed_runs(config, model)]
    stages = ["prepare", *[f"train {m}" for m in trained], *[f"evaluate {m}" for m in evaluated], "report"]
    step = iter(range(1, len(stages) + 1))
    started = time.perf_counter()

    def header(name: str, skipped: bool) -> None:
        elapsed = time.perf_counter() - started
        say(f"[{next(step)}/{len(stages)}] {name}{' (done, skipped)' if skipped else ''}  (+{elapsed:.0f} s)")

    done = (run_dir / "data" / "stats.json").exists()
    if done:
        check_fingerprint(run_dir / "data", prepare_sections(config), "study")
    header("prepare", done)
    if not done:
        run_prepare(config, run_dir)
    write_provenance(run_dir, config)
    for method in trained:
        train_dir = run_dir / "train" / method
        done = (train_dir / "metrics.json").exists() and final_complete(train_dir / "final")
        if done:
            check_fingerprint(train_dir, train_sections(config, method), "study")
        header(f"train {method}", done)
        if not done:
            resume = any((train_dir / "checkpoints").glob("checkpoint-*")) or (train_dir / "stages").exists()
            run_train(config, run_dir, method, resume=resume)
    for model in evaluated:
        done = (run_dir / "eval" / model / "metrics.json").exists()
        if done:
            check_fingerprint(run_dir / "eval" / model, evaluate_sections(config, model, config.evaluate.limit), "study")
        header(f"evaluate {model}", done)
        if not done:
            run_evaluate(config, run_dir, model)
    header("report", False)
    results = collect_results(config, run_dir)
    run_report(run_dir)
    say_summary(results, run_dir)
    return results


def say_summary(results: dict, run_dir: Path) -> None:
    """The end of a study: every model's numbers in one table, where the report is, the run's size."""
    from peftlab.console import disk_usage, human_bytes, results_table

    say("")
    say(results_table(results))
    say("")
    say(f"report: {run_dir / 'report.html'} (and report.md)")
    say(f"run directory: {run_dir}, {human_bytes(disk_usage(run_dir))} on disk")
