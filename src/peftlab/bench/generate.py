"""`peftlab bench generate`: greedy decoding speed of the evaluation path against plain `generate`.

Workload: the first `prompts` rows of the bench workload, each rendered up to its last
model turn, greedy, `max_new_tokens` 256, bf16, SDPA. Runs:

- `plain`: `model.generate` on batches of 64 in the workload's order with torch's default SDPA
  backends (the study's setting, as a user gets it);
- `ours`: the evaluator's path (`peftlab.evaluate.static_decode`): length-sorted, left-padded batches
  of at most `batch` rows and `max_batch_tokens` padded tokens, a static KV cache, every decoding
  step one CUDA graph replay (on a GPU), stopping when every row has hit `<end_of_turn>`/EOS, SDPA
  without cuDNN (as `load_model` sets it); capture time is inside the measured wall time;
- `ours-compile` (with `compile_layers=True`): `ours` with every decoder layer compiled first
  (`evaluate.torch_compile`), compile time inside the wall time; `ours-liger` (with `liger=True`, GPU):
  `ours` with liger-kernel's fused RMSNorm/GeGLU/RoPE; both on a freshly loaded model;
- `ours-generate`: the evaluator's batches (`batch` rows, no token budget) through plain `generate`:
  what length-sorting and a large batch alone buy;
- `ours-static` (with `static=True`): `ours-generate` with transformers' static KV cache, which
  compiles the decoding step (torch.compile); compile time is inside the measured wall time.

Tokens/s = generated tokens (cut at the first stop token) / wall time of the decoding loop.
Agreement = rows whose generated tokens equal plain's exactly. For each differing row the two
candidate tokens at the first difference are scored by the model in fp32 on the shared prefix:
their logit gap says whether the split is a near-tie that bf16 rounding can flip.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from peftlab.bench.workload import BenchSpec, default_sources, prepare_workload
from peftlab.config import EvaluateConfig
from peftlab.data.chat import render_prompt
from peftlab.data.prepare import read_split
from peftlab.errors import UserError
from peftlab.evaluate.generate import (
    cut_at_stop,
    encode_prompts,
    generate_token_ids,
    hf_greedy,
    left_pad,
    stop_token_ids,
)
from peftlab.evaluate.static_decode import DecodeStats, static_greedy

PLAIN_BATCH = 64


def workload_prompts(spec: BenchSpec, count: int) -> tuple[Any, list[str]]:
    config, run_dir = prepare_workload(spec)
    from peftlab.models import load_tokenizer

    rows = read_split(run_dir, "train")[:count]
    tokenizer = load_tokenizer(config.model)
    return config, [render_prompt(row["messages"], tokenizer) for row in rows]


def generation_prompts(data_dir: str | None, tokenizer: str, count: int, rows_per_source: int = 190,
                       shape: str = "builtin:gemma-3-1b") -> tuple[Any, list[str]]:
    """The generation bench's prompts (the first `count` workload rows up to their last model turn),
    prepared in a temporary folder; for scripts that rebuild the bench's inputs."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="peftlab-prompts-") as work:
        spec = BenchSpec("lora", "fast", shape, tokenizer, default_sources(data_dir), rows_per_source, 1024, -1, work)
        return workload_prompts(spec, count)


def _timed(fn) -> tuple[Any, float, float]:
    """(result, seconds, peak allocated GiB) of `fn()` with the peak counter reset first."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return result, seconds, peak


def plain_generate(model, tokenizer, encoded: list[list[int]], max_new_tokens: int, device,
                   batch: int = PLAIN_BATCH) -> list[list[int]]:
    """The study's loop: batches of 64 (or `batch`) in order, `generate`, tokens after the prompt, cut at a stop."""
    decode = hf_greedy(model, tokenizer, max_new_tokens)
    stops = stop_token_ids(tokenizer)
    out: list[list[int]] = []
    for start in range(0, len(encoded), batch):
        ids, mask = left_pad(encoded[start:start + batch], tokenizer.pad_token_id, device)
        out.extend(cut_at_stop(row, stops) for row in decode(ids, mask).tolist())
    return out


def ours_generate(model, tokenizer, encoded: list[list[int]], max_new_tokens: int, batch: int, device,
                  static: bool) -> list[list[int]]:
    """Length-sorted batches of `batch` rows through `generate`."""
    decode = hf_greedy(model, tokenizer, max_new_tokens, static_cache=static)
    return generate_token_ids(decode, encoded, tokenizer.pad_token_id, stop_token_ids(tokenizer), batch, device,
                              desc="ours-generate")


def ours_decode(model, tokenizer, encoded: list[list[int]], max_new_tokens: int, batch: int, device,
                max_batch_tokens: int | None, stats: DecodeStats, concurrent: int = 1,
                torch_compile: bool = False, prefill_chunk_tokens: int | None = None) -> list[list[int]]:
    """The evaluator's path: the static-cache decoder over token-budgeted length-sorted batches."""
    decode = static_greedy(model, tokenizer, max_new_tokens, stats=stats, concurrent=concurrent,
                           torch_compile=torch_compile, prefill_chunk_tokens=prefill_chunk_tokens)
    return generate_token_ids(decode, encoded, tokenizer.pad_token_id, stop_token_ids(tokenizer), batch, device,
                              desc="ours", max_batch_tokens=max_batch_tokens, new_tokens=max_new_tokens)


def near_tie_gaps(model, tokenizer, encoded: list[list[int]], plain: list[list[int]], ours: list[list[int]],
                  device, limit: int = 40) -> list[dict[str, Any]]:
    """fp32 logit gap between plain's and ours' token at the first difference, for differing rows.

    Converts `model` to fp32 in place (the bench's last use of it)."""
    differing = [i for i in range(len(plain)) if plain[i] != ours[i]][:limit]
    if not differing:
        return []
    model32 = model.float()
    gaps = []
    with torch.inference_mode():
        for index in differing:
            a, b = plain[index], ours[index]
            at = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
            if at >= min(len(a), len(b)):  # one stopped earlier: compare the stop with the other's token
                gaps.append({"row": index, "position": at, "kind": "length"})
                continue
            prefix = torch.tensor([encoded[index] + a[:at]], device=device)
            logits = model32(input_ids=prefix, logits_to_keep=1).logits[0, -1].float()
            top2 = torch.topk(logits, 2).values
            argmax = int(logits.argmax())
            # Token ids and the shared prefix's tail, so a large gap can be re-examined offline.
            gaps.append({"row": index, "position": at, "plain_minus_ours": float(logits[a[at]] - logits[b[at]]),
                         "top2_margin": float(top2[0] - top2[1]), "fp32_argmax_is_plain": argmax == a[at],
                         "fp32_argmax_is_ours": argmax == b[at], "plain_token": a[at], "ours_token": b[at],
                         "fp32_argmax_token": argmax, "prompt_tokens": len(encoded[index]),
                         "generated_prefix_tail": a[max(0, at - 32):at]})
    return gaps


def _run_variant(name: str, rows_per_batch: int, fn, runs: list[dict[str, Any]], outputs: dict[str, list[list[int]]],
                 extra: dict[str, Any]) -> None:
    """Time one decoding variant and compare its tokens with plain's; callables in `extra` are called after."""
    try:
        tokens, seconds, peak = _timed(fn)
    except Exception as exc:
        runs.append({"run": name, "batch": rows_per_batch, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        if name == "plain":
            raise UserError(f"bench generate: the plain run failed ({runs[0].get('error')}); nothing to compare") from exc
        return
    outputs[name] = tokens
    generated = sum(len(t) for t in tokens)
    identical = sum(a == b for a, b in zip(tokens, outputs["plain"], strict=True))
    runs.append({"run": name, "batch": rows_per_batch, "generated_tokens": generated, "seconds": seconds,
                 "tokens_per_s": generated / seconds, "peak_alloc_gib": peak,
                 "identical_rows": identical, "identical_fraction": identical / len(tokens),
                 **{key: value() if callable(value) else value for key, value in extra.items()}})
    print(f"{name:<12} batch {rows_per_batch:>4}  {generated / seconds:>9.0f} tokens/s  {seconds:7.1f} s"
          f"  identical to plain: {identical}/{len(tokens)}", file=sys.stderr, flush=True)


def run_generation_bench(*, shape: str | None, model_name: str, tokenizer: str, data_dir: str | None,
                         rows_per_source: int, prompts: int, max_new_tokens: int, batch: int, static: bool,
                         work: Path, plain_batches: tuple[int, ...] = (),
                         max_batch_tokens: int | None = EvaluateConfig.max_batch_tokens,
                         concurrent: int = EvaluateConfig.concurrent_batches,
                         extra: tuple[tuple[int, ...], ...] = (), liger: bool = False,
                         compile_layers: bool = False, prefill_chunk_tokens: int | None = None,
                         progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """`plain_batches`: more batch sizes for plain `generate`, each compared with batch 64: how many rows
    plain greedy decoding itself changes when only the batch size changes (the noise floor of the
    identical-rows fraction in bf16). `extra`: (max_batch_tokens, concurrent[, rows per batch]) settings of
    our decoder to time besides the chosen one (runs `ours-t{tokens}-c{concurrent}[-r{rows}]`). `progress` gets the report so
    far (marked `partial`) after every run."""
    from peftlab.config import ModelConfig
    from peftlab.models import avoid_cudnn_attention, device_name, load_model, load_tokenizer
    from peftlab.rundir import hardware, package_versions

    spec = BenchSpec("lora", "fast", shape or "builtin:gemma-3-1b", tokenizer, default_sources(data_dir),
                     rows_per_source, 1024, -1, str(work))
    config, texts = workload_prompts(spec, prompts)
    device = device_name()
    tok = load_tokenizer(config.model)
    if shape:
        model_config = ModelConfig(name_or_path=tokenizer, config=shape, attn_implementation="sdpa")
    else:
        model_config = ModelConfig(name_or_path=model_name, tokenizer=tokenizer, attn_implementation="sdpa")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_model(model_config, device=device, dtype=dtype).eval()
    encoded = encode_prompts(tok, texts)
    def plain_default_backends(rows: int) -> list[list[int]]:
        # The study's setting as a user gets it: torch's default SDPA backends (cuDNN included).
        torch.backends.cuda.enable_cudnn_sdp(True)
        try:
            return plain_generate(model, tok, encoded, max_new_tokens, device, rows)
        finally:
            if device == "cuda":
                avoid_cudnn_attention()

    variants = [("plain", PLAIN_BATCH, lambda: plain_default_backends(PLAIN_BATCH))]
    variants += [(f"plain-b{rows}", rows, lambda rows=rows: plain_default_backends(rows))
                 for rows in plain_batches if rows != PLAIN_BATCH]
    stats = DecodeStats()
    variants.append(("ours", batch, lambda: ours_decode(model, tok, encoded, max_new_tokens, batch, device,
                                                        max_batch_tokens, stats, concurrent)))
    variants.append(("ours-generate", batch,
                     lambda: ours_generate(model, tok, encoded, max_new_tokens, batch, device, False)))
    if static:
        variants.append(("ours-static", batch,
                         lambda: ours_generate(model, tok, encoded, max_new_tokens, batch, device, True)))
    extra_stats = {}

    def add_ours(name: str, budget: int | None, streams: int, rows: int, chunk: int | None = None) -> None:
        run_stats = extra_stats[name] = (budget, streams, DecodeStats())
        variants.append((name, rows, lambda: ours_decode(model, tok, encoded, max_new_tokens, rows, device, budget,
                                                          run_stats[2], streams, prefill_chunk_tokens=chunk)))

    for budget, streams, *cap in extra:
        rows = cap[0] if cap else batch
        add_ours(f"ours-t{budget}-c{streams}" + (f"-r{rows}" if rows != batch else ""), budget, streams, rows)
    if prefill_chunk_tokens:
        add_ours(f"ours-p{prefill_chunk_tokens}", max_batch_tokens, concurrent, batch, prefill_chunk_tokens)
    runs: list[dict[str, Any]] = []
    outputs: dict[str, list[list[int]]] = {}

    scored: dict[str, Any] = {"gaps": None}  # None until the fp32 gaps are computed

    def snapshot(partial: bool) -> dict[str, Any]:
        gaps = scored["gaps"]
        margins = [abs(g["plain_minus_ours"]) for g in gaps or [] if "plain_minus_ours" in g]
        return {
            "prompts": len(texts), "max_new_tokens": max_new_tokens, "model": model_name, "shape": shape,
            "mean_prompt_tokens": statistics.fmean(len(e) for e in encoded), "runs": runs,
            "speedup_vs_plain": {r["run"]: r["tokens_per_s"] / runs[0]["tokens_per_s"]
                                 for r in runs if "tokens_per_s" in r},
            "versions": package_versions(), "gpu": hardware().get("gpu") or "cpu",
            "command": " ".join(["peftlab", *sys.argv[1:]]), "differing_rows_fp32": gaps,
            "differing_max_abs_gap_fp32": max(margins) if margins else None,
            **({"partial": True} if partial else {}),
        }

    def run_variant(name: str, rows_per_batch: int, fn, extra_fields: dict[str, Any]) -> None:
        _run_variant(name, rows_per_batch, fn, runs, outputs, extra_fields)
        if progress is not None:  # a run cut by a time limit keeps what finished
            progress(snapshot(partial=True))

    settings = {"ours": (max_batch_tokens, concurrent, stats), **extra_stats}
    for name, rows_per_batch, fn in variants:
        budget, streams, run_stats = settings.get(name, (None, None, None))
        run_variant(name, rows_per_batch, fn,
                    {"max_batch_tokens": budget, "concurrent": streams, "decoder": run_stats.as_dict}
                    if run_stats is not None else {})
    if "plain" not in outputs:
        raise UserError(f"bench generate: the plain run failed ({runs[0].get('error')})")
    plain, ours = outputs["plain"], outputs.get("ours")
    scored["gaps"] = near_tie_gaps(model, tok, encoded, plain, ours, device) if ours is not None else []
    if progress is not None:
        progress(snapshot(partial=True))
    model = None  # fp32 now, and done: the variants below load fresh bf16 models
    if compile_layers:
        compiled = load_model(model_config, device=device, dtype=dtype).eval()
        compile_stats = DecodeStats()
        run_variant("ours-compile", batch, lambda: ours_decode(compiled, tok, encoded, max_new_tokens, batch, device,
                                                               max_batch_tokens, compile_stats, concurrent, True),
                    {"max_batch_tokens": max_batch_tokens, "concurrent": concurrent, "decoder": compile_stats.as_dict})
        compiled = None
    if liger and device == "cuda":
        # liger patches module-level functions, so it runs last.
        liger_model = load_model(dataclasses.replace(model_config, liger_kernel=True), device=device, dtype=dtype).eval()
        liger_stats = DecodeStats()
        run_variant("ours-liger", batch, lambda: ours_decode(liger_model, tok, encoded, max_new_tokens, batch, device,
                                                             max_batch_tokens, liger_stats, concurrent),
                    {"max_batch_tokens": max_batch_tokens, "concurrent": concurrent, "decoder": liger_stats.as_dict})
    return snapshot(partial=False)


def plot_generation(report: dict[str, Any], path: Path) -> Path | None:
    """Tokens/s of every decoding run, each bar labelled with its rows identical to plain batch 64."""
    from matplotlib.figure import Figure

    runs = [r for r in report.get("runs", []) if isinstance(r.get("tokens_per_s"), (int, float))]
    if not runs:
        return None
    figure = Figure(figsize=(max(4.0, 1.1 * len(runs) + 1.5), 3.4), layout="constrained")
    axis = figure.subplots()
    names = [r["run"] for r in runs]
    bars = axis.bar(names, [r["tokens_per_s"] for r in runs],
                    color=["#9e9e9e" if name.startswith("plain") else "#1f77b4" for name in names])
    for bar, run in zip(bars, runs, strict=True):
        axis.annotate(f"{run['identical_rows']}/{report['prompts']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize=8)
    axis.set_ylabel("generated tokens/s")
    axis.set_title(f"greedy decoding, {report['prompts']} prompts x {report['max_new_tokens']} new tokens"
                   " (label: rows identical to plain)", fontsize=9)
    axis.tick_params(axis="x", labelrotation=30, labelsize=8)
    figure.savefig(path, dpi=110)
    return path
