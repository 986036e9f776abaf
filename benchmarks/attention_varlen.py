"""Padding-free attention kernels with Gemma 3's sliding window, timed on one GPU (issue 20).

One optimizer step's rows (16 rows, lengths drawn once with a fixed seed around the workload's mean
of ~350 tokens, clipped to 16..2048) at the Gemma-3-1B attention shape (4 query heads, 1 KV head,
head dim 256, bf16), forward + backward of one layer's attention, sliding (window 512) and full.
Each kernel runs through `peftlab.train.packing` exactly as training calls it:
- `padded-sdpa`: the padded batch (rows x longest) through SDPA with transformers' own masks: the baseline;
- `sdpa-block-mask`: packed, SDPA with a block-diagonal (windowed) bool mask;
- `flex_attention`: packed, transformers' FlexAttention with a document + causal + window BlockMask;
- `varlen`: packed, torch's `varlen_attn` (flash attention with `cu_seqlens` and a window);
- `flash_attention_2`: packed, flash-attn's varlen kernel through transformers, if flash-attn imports.
Each result has the median time of a forward + backward (after warm-up), the mask / metadata build
time (once per batch and layer type), peak memory, and the largest difference from a per-row fp32
reference. The JSON is rewritten after every kernel.

    python benchmarks/attention_varlen.py --out $OUT/attention.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch


def row_lengths(rows: int = 16, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    draws = torch.empty(rows).log_normal_(mean=5.5, std=0.8, generator=generator)
    return [int(min(max(x, 16), 2048)) for x in draws.tolist()]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_kernel(name: str, lengths: list[int], window: int | None, *, heads: int, kv_heads: int, head_dim: int,
                device: str, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from peftlab.train.packing import (
        _ProbeConfig,
        _ProbeModule,
        _reference_attention,
        attention_inputs,
        load_name,
        row_metadata,
        varlen_attention_forward,
    )

    tokens = sum(lengths)
    generator = torch.Generator().manual_seed(1)
    q32, k32, v32 = (torch.randn(1, h, tokens, head_dim, generator=generator) for h in (heads, kv_heads, kv_heads))
    module = _ProbeModule(heads // kv_heads)
    if name == "padded-sdpa":
        longest = max(lengths)

        def pad(x):
            out = x.new_zeros(len(lengths), x.shape[1], longest, head_dim)
            start = 0
            for row, n in enumerate(lengths):
                out[row, :, :n] = x[0, :, start:start + n]
                start += n
            return out

        q, k, v = (pad(x).to(device, dtype).requires_grad_() for x in (q32, k32, v32))
        index = torch.arange(longest, device=device)
        started = time.perf_counter()
        keep = (index[None, :] <= index[:, None])
        if window:
            keep &= index[:, None] - index[None, :] < window
        real = torch.tensor([[i < n for i in range(longest)] for n in lengths], device=device)
        mask = keep[None, None] & real[:, None, None, :]
        _sync()
        build_s = time.perf_counter() - started
        function, kwargs = ALL_ATTENTION_FUNCTIONS["sdpa"], {}
    else:
        implementation = {"sdpa-block-mask": "sdpa"}.get(name, name)
        loaded = load_name(implementation)
        q, k, v = (x.to(device, dtype).requires_grad_() for x in (q32, k32, v32))
        inputs = {"position_ids": torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(device),
                  **row_metadata(lengths)}
        inputs["cu_seq_lens"] = inputs["cu_seq_lens"].to(device)
        config = _ProbeConfig(loaded, window, dtype)
        started = time.perf_counter()
        kwargs = attention_inputs(config, inputs)
        _sync()
        build_s = time.perf_counter() - started
        mask = kwargs.pop("attention_mask")
        mask = mask["sliding_attention"] if isinstance(mask, dict) else mask
        function = varlen_attention_forward if implementation == "varlen" else ALL_ATTENTION_FUNCTIONS[loaded]

    def step():
        out, _ = function(module, q, k, v, mask, scaling=head_dim ** -0.5, sliding_window=window, **kwargs)
        out.float().square().mean().backward()
        return out

    out = step()  # compiles / warms up
    if name == "padded-sdpa":
        flat = torch.cat([out[row, :n] for row, n in enumerate(lengths)], 0).unsqueeze(0)
    else:
        flat = out
    reference = _reference_attention(q32, k32, v32, lengths, window)
    error = (flat.detach().float().cpu() - reference).abs().max().item()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        _sync()
        started = time.perf_counter()
        step()
        _sync()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"kernel": name, "window": window, "fwd_bwd_ms_median": 1e3 * statistics.median(times),
            "mask_build_ms": 1e3 * build_s, "peak_alloc_gib": peak, "max_abs_error_vs_fp32": error,
            "tokens": tokens}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--kernels", default=None, help="comma-separated subset (default: all that import)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lengths = row_lengths(args.rows)
    kernels = ["padded-sdpa", "sdpa-block-mask", "flex_attention", "varlen"]
    try:
        import flash_attn  # noqa: F401

        kernels.append("flash_attention_2")
    except ImportError:
        pass
    if args.kernels:
        kernels = [k for k in args.kernels.split(",") if k]
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                              "torch": torch.__version__, "row_lengths": lengths, "tokens": sum(lengths),
                              "padded_tokens": len(lengths) * max(lengths), "shape": {"heads": 4, "kv_heads": 1,
                                                                                       "head_dim": 256},
                              "command": " ".join(sys.argv), "results": [], "partial": True}
    for window in (512, None):
        for name in kernels:
            try:
                result = time_kernel(name, lengths, window, heads=4, kv_heads=1, head_dim=256, device=device,
                                     dtype=dtype, repeats=args.repeats)
            except Exception as exc:
                result = {"kernel": name, "window": window, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            report["results"].append(result)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
            print(json.dumps(result), file=sys.stderr, flush=True)
    report.pop("partial")
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
