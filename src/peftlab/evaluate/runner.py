"""Evaluate one model (`base`, a trained method, or `ensemble`) on the test split.

Writes `eval/<name>/predictions.jsonl` (id, source_dataset, prompt, reference, prediction,
generated token count, the last user message and the number of user turns) and `metrics.json`
(scores with bootstrap CIs, per source, generation speed and the decoder that ran: `static`, or
`generate` with `decoder_fallback` saying why when the static decoder does not support the
architecture; for the ensemble the chosen alpha and its validation scores) into an atomic folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from peftlab.config import StudyConfig
from peftlab.data.prepare import read_split
from peftlab.distributed import distributed_rank_world
from peftlab.errors import UserError
from peftlab.evaluate.ensemble import mixed_greedy
from peftlab.evaluate.generate import EvalExample, examples_from_rows, generate_all, hf_greedy, stop_token_ids
from peftlab.evaluate.metrics import bleu4, rouge_l
from peftlab.evaluate.scoring import score_table
from peftlab.evaluate.static_decode import static_greedy, static_mixed_greedy, unsupported_reason
from peftlab.fingerprints import evaluate_sections, write_fingerprint
from peftlab.models import device_name, load_model, load_tokenizer, resolve_dtype
from peftlab.rundir import atomic_dir, final_complete, read_json, write_json

log = logging.getLogger(__name__)
_WARNED: set[str] = set()  # fallback reasons already logged in this process


def load_eval_model(config: StudyConfig, run_dir: Path, name: str, device: str):
    """The model as it was trained: base; base (+ 4-bit for qlora) + adapters; or full weights.

    Always without liger-kernel: a training-speed option, and liger-patched models decoded differently
    from plain ones on the H200 (0 of 320 rows identical with the real 270M weights; see README)."""
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, liger_kernel=False))
    dtype = resolve_dtype(config.model, device)
    if name == "base":
        model = load_model(config.model, device=device, dtype=dtype)
    else:
        train_dir = run_dir / "train" / name
        if not (train_dir / "metrics.json").exists():
            raise UserError(f"{train_dir}: not trained yet; run `peftlab train --method {name}` first")
        metrics = read_json(train_dir / "metrics.json")
        if not final_complete(train_dir / "final"):
            raise UserError(f"{train_dir / 'final'}: missing or incomplete (its training was interrupted);"
                            f" run `peftlab train --method {name} --resume` or `peftlab study` again")
        if metrics["saves"] == "adapter":
            model = _adapter_model(config, name, train_dir / "final", device, dtype)
        else:
            model = load_model(config.model, device=device, dtype=dtype, source=str(train_dir / "final"))
    model.eval()
    return model


def _adapter_model(config: StudyConfig, name: str, adapter_dir: Path, device: str, dtype):
    from peft import PeftModel

    method = config.method(name)
    quantization = None
    if method.kind == "qlora":
        from peftlab.methods import BuildContext
        from peftlab.methods.qlora import quantization_config

        quantization, _ = quantization_config(BuildContext(config.model, method, device, dtype))
    base = load_model(config.model, device=device, dtype=dtype, quantization_config=quantization)
    return PeftModel.from_pretrained(base, str(adapter_dir))


def _limited(rows: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    return rows[:limit] if limit is not None else rows


def _generate(config, decode, tokenizer, examples: list[EvalExample], desc: str):
    """Generate for every example; under torchrun each process takes every N-th row and the outputs
    are gathered back into the original order on every process."""
    device = device_name()
    rank, world = distributed_rank_world()
    mine = list(range(rank, len(examples), world))
    started = time.perf_counter()
    outputs = generate_all(decode, tokenizer, [examples[i].prompt_ids for i in mine], config.evaluate.batch_size,
                           device, desc=desc, max_batch_tokens=config.evaluate.max_batch_tokens,
                           new_tokens=config.evaluate.max_new_tokens, show_progress=rank == 0)
    if device == "cuda":
        torch.cuda.synchronize()
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, list(zip(mine, outputs, strict=True)))
        ordered = dict(pair for part in gathered for pair in part)
        outputs = [ordered[i] for i in range(len(examples))]
    seconds = time.perf_counter() - started
    tokens = sum(count for _, count in outputs)
    speed = {"seconds": seconds, "generated_tokens": tokens, "tokens_per_s": tokens / seconds if seconds else None,
             "max_new_tokens": config.evaluate.max_new_tokens, "batch_size": config.evaluate.batch_size,
             "max_batch_tokens": config.evaluate.max_batch_tokens, "decoder_kind": getattr(decode, "kind", "generate"),
             "concurrent_batches": config.evaluate.concurrent_batches,
             "prefill_chunk_tokens": config.evaluate.prefill_chunk_tokens}
    if getattr(decode, "fallback", None):
        speed["decoder_fallback"] = decode.fallback
    if hasattr(decode, "stats"):
        speed["decoder"] = decode.stats.as_dict()
    return outputs, speed


def _score(config, examples, outputs) -> dict[str, Any]:
    return score_table([text for text, _ in outputs], [e.reference for e in examples],
                       [e.source_dataset for e in examples], bootstrap_samples=config.evaluate.bootstrap_samples)


def _ensemble_decoder(config: StudyConfig, models, alpha: float, tokenizer, stops):
    """Greedy over `alpha log p_A + (1 - alpha) log p_B`: on static caches and CUDA graphs, or the plain loop."""
    ev = config.evaluate
    fallback = _static_fallback(config, models)
    if ev.decoder == "static" and fallback is None:
        return static_mixed_greedy(models, [alpha, 1 - alpha], tokenizer, ev.max_new_tokens,
                                   concurrent=ev.concurrent_batches, prefill_chunk_tokens=ev.prefill_chunk_tokens)
    return _generate_kind(mixed_greedy(models, [alpha, 1 - alpha], stops, tokenizer.pad_token_id, ev.max_new_tokens),
                          fallback)


def _single_decoder(config: StudyConfig, model, tokenizer):
    """The static decoder where it supports the model's architecture, else plain `generate` (said once)."""
    ev = config.evaluate
    fallback = _static_fallback(config, [model])
    if ev.decoder == "static" and fallback is None:
        return static_greedy(model, tokenizer, ev.max_new_tokens, concurrent=ev.concurrent_batches,
                             torch_compile=ev.torch_compile, prefill_chunk_tokens=ev.prefill_chunk_tokens)
    return _generate_kind(hf_greedy(model, tokenizer, ev.max_new_tokens), fallback)


def _static_fallback(config: StudyConfig, models) -> str | None:
    if config.evaluate.decoder != "static":
        return None
    reason = unsupported_reason(models)
    if reason is not None and reason not in _WARNED:
        _WARNED.add(reason)
        log.warning("evaluate.decoder static: %s", reason)
    return reason


def _generate_kind(decode, fallback: str | None):
    decode.kind = "generate"
    decode.fallback = fallback
    return decode


def choose_alpha(config: StudyConfig, run_dir: Path, models, tokenizer) -> dict[str, Any]:
    """Pick the ensemble weight on the validation split (carved from the train buffer, never test)."""
    ensemble = config.evaluate.ensemble
    examples = examples_from_rows(_limited(read_split(run_dir, "validation"), ensemble.validation_limit), tokenizer)
    stops = stop_token_ids(tokenizer)
    trials = []
    for alpha in ensemble.alphas:
        decode = _ensemble_decoder(config, models, alpha, tokenizer, stops)
        outputs, _ = _generate(config, decode, tokenizer, examples, f"alpha={alpha:g}")
        predictions, references = [t for t, _ in outputs], [e.reference for e in examples]
        trials.append({"alpha": alpha, "bleu4": bleu4(predictions, references),
                       "rougeL": rouge_l(predictions, references)})
    best = max(trials, key=lambda t: t[ensemble.select_by])  # first of equals: the order of `alphas`
    return {"members": list(ensemble.members), "alpha": best["alpha"], "mode": "logprob",
            "select_by": ensemble.select_by, "validation_rows": len(examples), "validation": trials}


def _overlength_rows(run_dir: Path, rows: list[dict[str, Any]]) -> int:
    """How many evaluated rows were longer than max_seq_length and cut back to the last exchange that
    fits (`prepare.overlength: truncate`; under `drop` there are none). Test rows prepared before
    that cut were truncated inside a turn while their prompt and reference stayed whole: refused."""
    cut = sum(1 for row in rows if row.get("truncated"))
    stats = read_json(run_dir / "data" / "stats.json")
    if cut and "overlength_rows" not in stats.get("splits", {}).get("test", {}):
        raise UserError(f"{run_dir / 'data'}: {cut} test rows are longer than data.max_seq_length and were"
                        " prepared by an older peftlab, which scored them whole; re-run `peftlab prepare`")
    return cut


def _init_distributed(device: str) -> None:
    """Under torchrun: one GPU per process and a process group for gathering predictions."""
    import os

    _, world = distributed_rank_world()
    if world == 1 or torch.distributed.is_initialized():
        return
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group(backend="nccl" if device == "cuda" else "gloo")


def evaluate_model(config: StudyConfig, run_dir: Path, name: str, *, limit: int | None = None) -> dict[str, Any]:
    limit = limit if limit is not None else config.evaluate.limit
    tokenizer = load_tokenizer(config.model)
    rows = _limited(read_split(run_dir, "test"), limit)
    overlength = _overlength_rows(run_dir, rows)
    examples = examples_from_rows(rows, tokenizer)
    device = device_name()
    _init_distributed(device)
    extra: dict[str, Any] = {}
    if name == "ensemble":
        members = config.evaluate.ensemble.members
        if not members:
            raise UserError("evaluate.ensemble.members is empty: configure two models to ensemble")
        models = [load_eval_model(config, run_dir, member, device) for member in members]
        extra["ensemble"] = choose_alpha(config, run_dir, models, tokenizer)
        alpha = extra["ensemble"]["alpha"]
        decode = _ensemble_decoder(config, models, alpha, tokenizer, stop_token_ids(tokenizer))
    else:
        model = load_eval_model(config, run_dir, name, device)
        decode = _single_decoder(config, model, tokenizer)
    outputs, speed = _generate(config, decode, tokenizer, examples, f"eval {name}")
    rank, world = distributed_rank_world()
    if rank != 0:
        return {}
    speed["processes"] = world
    metrics = {"model": name, "limit": limit, **_score(config, examples, outputs), "overlength_rows": overlength,
               "overlength": config.prepare.overlength, "generation": speed, **extra}
    with atomic_dir(run_dir / "eval" / name) as out:
        with (out / "predictions.jsonl").open("w", encoding="utf-8") as handle:
            for example, (text, count) in zip(examples, outputs, strict=True):
                handle.write(json.dumps({
                    "id": example.id, "source_dataset": example.source_dataset, "prompt": example.prompt,
                    "reference": example.reference, "prediction": text, "generated_tokens": count,
                    "last_user": example.last_user, "user_turns": example.user_turns,
                }, ensure_ascii=False) + "\n")
        write_json(out / "metrics.json", metrics)
        write_fingerprint(out, "evaluate", evaluate_sections(config, name, limit))
    return metrics
