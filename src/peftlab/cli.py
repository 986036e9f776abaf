"""Command-line interface: argument parsing only; each command calls one workflow function.

User errors (`UserError`) become one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from peftlab.config import EvaluateConfig
from peftlab.errors import UserError


def _add_config(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    if optional:
        parser.add_argument("config", nargs="?", default=None,
                            help="study YAML, or a shipped config name (default: demo)")
    else:
        parser.add_argument("config", help="study YAML, or a shipped config name (demo, smoke, samples, seed)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set data.seed=7 (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<name>)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftlab",
        description="Comparative parameter-efficient fine-tuning studies (QLoRA, GaLore, hybrid, ensemble):"
        " one YAML per study, honest numbers, a report with tables and plots.",
        epilog="Run `peftlab study` for the built-in demo; `peftlab COMMAND --help` for each command.",
    )
    parser.add_argument("--version", action="version", version=f"peftlab {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prepare = commands.add_parser("prepare", help="sample, convert, tokenise and balance the study data")
    _add_config(prepare)

    train = commands.add_parser("train", help="fine-tune one configured method")
    _add_config(train)
    train.add_argument("--method", required=True, help="a name under methods: in the config")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    train.add_argument("--gpus", type=int, default=1,
                       help="data-parallel processes (DDP through torchrun); same as `torchrun --nproc_per_node N -m peftlab train ...`")
    train.add_argument("--fsdp", action="store_true",
                       help="with --gpus N: shard weights, gradients and optimizer states (FSDP2) instead of DDP;"
                            " lora, qlora and full")

    evaluate = commands.add_parser("evaluate", help="generate on the test split and score")
    _add_config(evaluate)
    evaluate.add_argument("--model", required=True, help="base, a trained method, or ensemble")
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate only the first N test rows")
    evaluate.add_argument("--gpus", type=int, default=1, help="shard generation over N processes (torchrun)")

    score = commands.add_parser("score", help="score a JSONL file of prediction/reference rows")
    score.add_argument("file", type=Path)
    score.add_argument("--json", action="store_true", help="print one JSON object")

    report = commands.add_parser("report", help="write report.md, report.html and plots for a run directory")
    report.add_argument("run_dir", type=Path)

    export = commands.add_parser("export", help="write a trained model as a standalone Hugging Face folder"
                                 " (merged weights, tokenizer, model card)")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--model", required=True, help="a trained method of the run")
    export.add_argument("--out", type=Path, required=True, help="a new folder (refused if it exists and is not empty)")

    chat = commands.add_parser("chat", help="try a model of a run: one --prompt, or a conversation on stdin")
    chat.add_argument("run_dir", type=Path)
    chat.add_argument("--model", required=True, help="base or a trained method of the run")
    chat.add_argument("--prompt", default=None, help="answer this one prompt and exit (default: read turns from"
                      " stdin until EOF, an empty line or 'exit')")
    chat.add_argument("--max-new-tokens", type=int, default=None,
                      help="at most this many new tokens per answer (default: the run's evaluate.max_new_tokens)")

    study = commands.add_parser("study", help="prepare -> train -> evaluate -> report, skipping finished stages")
    _add_config(study, optional=True)

    bench = commands.add_parser("bench", help="measure speed and memory: `bench train` or `bench generate`")
    kinds = bench.add_subparsers(dest="bench_kind", required=True, metavar="KIND")
    _add_train_bench(kinds.add_parser("train", help="time the training workload: our profiles vs the original recipe"))
    _add_generate_bench(kinds.add_parser(
        "generate", help="time greedy decoding: plain generate (batch 64) vs the evaluator's path"))

    demo = commands.add_parser("demo-data", help="write the built-in demo dataset files")
    demo.add_argument("--out", type=Path, required=True)
    demo.add_argument("--rows", type=int, default=400, help="rows per schema")
    return parser


def _add_workload(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", default="builtin:gemma-3-1b", help="model config (random weights)")
    parser.add_argument("--tokenizer", default="builtin:gemma-3-270m")
    parser.add_argument("--data", default=None,
                        help="a folder with the dataset samples (alpaca/, tulu-v2-sft-mixture/, ultrachat_200k/);"
                             " default: built-in demo data")
    parser.add_argument("--rows-per-source", type=int, default=190)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here (figures beside it)")


def _add_train_bench(bench: argparse.ArgumentParser) -> None:
    _add_workload(bench)
    bench.add_argument("--methods", default="qlora,galore,lora", help="comma-separated: qlora, galore, lora, full, hybrid")
    bench.add_argument("--profiles", default="default,lowmem",
                       help="comma-separated: default (the study's own path), fast, fast-liger, fast-compile, lowmem")
    bench.add_argument("--reference", action="store_true", help="also run the original study's TRL SFTTrainer recipe")
    bench.add_argument("--max-steps", type=int, default=-1, help="cap optimizer steps (-1: one epoch)")
    bench.add_argument("--resume", action="store_true",
                       help="keep the finished runs of the report at --out (same workload) and run the rest")


def _add_generate_bench(bench: argparse.ArgumentParser) -> None:
    _add_workload(bench)
    bench.add_argument("--model", default=None, help="real weights to decode with (default: random weights of --shape)")
    bench.add_argument("--prompts", type=int, default=320, help="prompts from the workload")
    bench.add_argument("--max-new-tokens", type=int, default=256, help="tokens per prompt")
    bench.add_argument("--batch", type=int, default=320, help="rows per batch of our path")
    bench.add_argument("--plain-batches", default="64",
                       help="batch sizes for plain generate (comma-separated; 64 is the original study's);"
                            " the others show how many rows plain decoding changes with the batch size alone")
    bench.add_argument("--max-batch-tokens", type=int, default=131072,
                       help="padded-token budget per batch of our path (rows x (prompt + new tokens))")
    bench.add_argument("--concurrent", type=int, default=EvaluateConfig.concurrent_batches,
                       help="batches our decoder runs at once, each on its own CUDA stream")
    bench.add_argument("--prefill-chunk-tokens", type=int, default=None,
                       help="also time our decoder with chunked prefill (run ours-p{N}, the main settings)")
    bench.add_argument("--extra", default="",
                       help="more settings of our decoder to time, TOKENS:CONCURRENT comma-separated"
                            " (e.g. 262144:1,131072:4); an optional third number caps the rows per batch (131072:3:64)")
    bench.add_argument("--compile", action="store_true",
                       help="also time our path with every decoder layer compiled (torch.compile)")
    bench.add_argument("--liger", action="store_true",
                       help="(GPU) also time our path with liger-kernel's fused RMSNorm/GeGLU/RoPE")
    bench.add_argument("--static-cache", action="store_true",
                       help="also time our path with a static KV cache (compiled decoding step)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peftlab")
    except PackageNotFoundError:
        return "unknown"


def _load(args: argparse.Namespace):
    from peftlab.config import load_config
    from peftlab.network import offline_unless_hub
    from peftlab.rundir import default_run_dir

    config = load_config(args.config, args.overrides)
    offline_unless_hub(config)  # before anything loads: no network unless the config names a hub id
    return config, (args.out or default_run_dir(config))


def run_command(args: argparse.Namespace) -> int:
    if args.command == "prepare":
        from peftlab.workflow import run_prepare

        config, run_dir = _load(args)
        run_prepare(config, run_dir)
    elif args.command == "train":
        from peftlab.workflow import run_train

        if "WORLD_SIZE" not in os.environ:
            # User errors surface here, once, before any process is launched.
            from peftlab.train.launch import check_launch

            config, run_dir = _load(args)
            check_launch(config, args.method, world=args.gpus, fsdp=args.fsdp)
            if args.gpus > 1:
                return launch_distributed(args.gpus)

        config, run_dir = _load(args)
        run_train(config, run_dir, args.method, resume=args.resume, fsdp=args.fsdp)
        _leave_process_group()
    elif args.command == "evaluate":
        from peftlab.workflow import run_evaluate

        if args.gpus > 1 and "WORLD_SIZE" not in os.environ:
            return launch_distributed(args.gpus)

        config, run_dir = _load(args)
        run_evaluate(config, run_dir, args.model, limit=args.limit)
        _leave_process_group()
    elif args.command == "score":
        return _score(args)
    elif args.command == "report":
        from peftlab.workflow import run_report

        run_report(args.run_dir)
    elif args.command == "export":
        from peftlab.export import export_model

        export_model(args.run_dir, args.model, args.out)
    elif args.command == "chat":
        from peftlab.chat import run_chat

        run_chat(args.run_dir, args.model, prompt=args.prompt, max_new_tokens=args.max_new_tokens)
    elif args.command == "study":
        from peftlab.workflow import run_study

        config, run_dir = _load(args)
        run_study(config, run_dir)
    elif args.command == "bench" and args.bench_kind == "generate":
        report = _generation_bench(args)
        if args.out is None:
            print(json.dumps(report, indent=2))
    elif args.command == "bench":
        from peftlab.bench.train import run_bench

        report = run_bench(
            [m for m in args.methods.split(",") if m], [p for p in args.profiles.split(",") if p],
            reference=args.reference, shape=args.shape, tokenizer=args.tokenizer, data_dir=args.data,
            rows_per_source=args.rows_per_source, max_steps=args.max_steps, out=args.out, resume=args.resume,
        )
        if args.out is None:
            print(json.dumps(report, indent=2))
    elif args.command == "demo-data":
        from peftlab.data.demo import write_demo_files

        for schema, path in write_demo_files(args.out, args.rows).items():
            print(f"{schema}: {path}")
    return 0



def _extra_setting(item: str, rows: int) -> tuple[int, int, int]:
    """`TOKENS:CONCURRENT[:ROWS]` -> (max_batch_tokens, concurrent batches, rows per batch at most)."""
    values = [int(value) for value in item.split(":")]
    if len(values) not in (2, 3):
        raise ValueError(item)
    return (values[0], values[1], values[2] if len(values) == 3 else rows)

def _generation_bench(args: argparse.Namespace) -> dict:
    import tempfile

    from peftlab.bench.generate import plot_generation, run_generation_bench
    from peftlab.rundir import write_json

    for flag in ("prompts", "max_new_tokens", "batch", "rows_per_source", "max_batch_tokens", "concurrent",
                 "prefill_chunk_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"bench generate --{flag.replace('_', '-')} must be at least 1")
    try:
        plain_batches = tuple(dict.fromkeys(int(item) for item in args.plain_batches.split(",") if item.strip()))
    except ValueError:
        raise UserError(f"bench generate --plain-batches: expected comma-separated integers, got {args.plain_batches!r}") from None
    if any(rows < 1 for rows in plain_batches):
        raise UserError("bench generate --plain-batches: every batch size must be at least 1")
    try:
        extra = tuple(_extra_setting(item, args.batch) for item in args.extra.split(",") if item.strip())
    except ValueError:
        raise UserError("bench generate --extra: expected TOKENS:CONCURRENT[:ROWS] settings, comma-separated,"
                        f" got {args.extra!r}") from None
    if any(value < 1 for setting in extra for value in setting):
        raise UserError("bench generate --extra: tokens, concurrent batches and rows must be at least 1")
    main_setting = (args.max_batch_tokens, args.concurrent, args.batch)
    if main_setting in extra:
        print(f"bench generate --extra: {':'.join(map(str, main_setting))} is the main run's setting; timed once, as 'ours'",
              file=sys.stderr)
    extra = tuple(setting for setting in dict.fromkeys(extra) if setting != main_setting)
    with tempfile.TemporaryDirectory(prefix="peftlab-genbench-") as work:
        report = run_generation_bench(
            shape=None if args.model else args.shape, model_name=args.model or args.tokenizer,
            tokenizer=args.tokenizer, data_dir=args.data, rows_per_source=args.rows_per_source,
            prompts=args.prompts, max_new_tokens=args.max_new_tokens, batch=args.batch,
            static=args.static_cache, work=Path(work), plain_batches=plain_batches,
            max_batch_tokens=args.max_batch_tokens, concurrent=args.concurrent, extra=extra, liger=args.liger,
            prefill_chunk_tokens=args.prefill_chunk_tokens,
            compile_layers=args.compile,
            progress=(lambda partial: write_json(args.out, partial)) if args.out is not None else None,
        )
    if args.out is not None:
        write_json(args.out, report)
        plot_generation(report, args.out.with_suffix(".png"))
    return report


def _leave_process_group() -> None:
    """Under torchrun, every rank leaves the process group together: a group left to interpreter
    shutdown can abort a rank ("terminate called without an active exception")."""
    if "WORLD_SIZE" not in os.environ:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def launch_distributed(processes: int) -> int:
    """Re-run this command under torchrun (the standard launcher): one process per GPU, DDP."""
    import subprocess

    import torch

    if torch.cuda.is_available() and processes > torch.cuda.device_count():
        raise UserError(f"--gpus {processes}: this machine has {torch.cuda.device_count()} GPU(s)")

    argv = sys.argv[1:]
    cleaned: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--gpus":
            skip = True
            continue
        if item.startswith("--gpus="):
            continue
        cleaned.append(item)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "peftlab", *cleaned]
    return subprocess.run(command).returncode


def _score(args: argparse.Namespace) -> int:
    from peftlab.evaluate.scoring import score_file

    table = score_file(args.file)
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print(f"{'rows':>10} {'BLEU-4':>8} {'ROUGE-L':>8} {'EM':>6} {'norm EM':>7}  (95% bootstrap CI;"
          " EM: exact match, norm EM: after SQuAD normalisation)")
    blocks = {"all": table, **table.get("per_source", {})}
    for name, block in blocks.items():
        print(f"{name:>10} {block['bleu4']:8.4f} {block['rougeL']:8.4f} {block['exact_match']:6.4f}"
              f" {block['exact_match_norm']:7.4f}  n={block['n']}"
              f"  BLEU-4 [{block['bleu4_ci'][0]:.4f}, {block['bleu4_ci'][1]:.4f}]"
              f"  ROUGE-L [{block['rougeL_ci'][0]:.4f}, {block['rougeL_ci'][1]:.4f}]"
              f"  EM {block['exact_match_count']}/{block['n']}, norm EM {block['exact_match_norm_count']}/{block['n']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes warns on CPU imports that its optional hub kernel was not loaded, and `kernels` that
    # offline mode skips its publisher check (offline: see peftlab.network).
    for noisy in ("bitsandbytes", "kernels"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    import contextlib

    from peftlab.console import quiet_libraries
    from peftlab.network import network_settings_restored

    # Importing transformers takes seconds: only commands that load models pay for quieting it.
    loads_models = args.command not in ("score", "report", "demo-data")
    try:
        with network_settings_restored(), quiet_libraries() if loads_models else contextlib.nullcontext():
            return run_command(args)
    except UserError as exc:
        print(f"peftlab: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:  # not about a path: a bug or the system, keep the traceback
            raise
        # A path the user gave (or one under it) that cannot be read or written: read-only, full, a file.
        print(f"peftlab: error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peftlab: interrupted (finished stages are kept; re-run to continue)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
