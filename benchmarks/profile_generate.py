"""Where the time of greedy decoding goes: torch.profiler over the evaluator's decoding of one batch.

Takes the first `--batch` prompts of the generation bench's workload (the 1B shape with random
weights, or `--model` real weights), decodes them once untimed (warm-up: allocator, kernels), then
profiles a second identical decode of `--new-tokens` tokens and reports wall time per decoding
step, GPU busy time per step (kernels' own time), kernel launches per step and the top operators.
Compare `--batch 64` and `--batch 320` to see what a larger batch buys.

Usage (GPU machine, repository root):
    python benchmarks/profile_generate.py --data DIR --tokenizer DIR --batch 320 --new-tokens 32 --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# The sibling script: its folder is on sys.path when this one runs as a script.
from profile_train import _sync, top_ops


def main() -> int:
    from peftlab.bench.generate import generation_prompts
    from peftlab.config import ModelConfig
    from peftlab.evaluate.generate import encode_prompts, hf_greedy, left_pad
    from peftlab.evaluate.static_decode import static_greedy
    from peftlab.models import device_name, load_model, load_tokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--shape", default="builtin:gemma-3-1b")
    parser.add_argument("--model", default=None, help="real weights instead of the random --shape")
    parser.add_argument("--batch", type=int, default=320)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--static-cache", action="store_true", help="--decoder generate: transformers' static cache")
    parser.add_argument("--decoder", choices=("generate", "static"), default="generate",
                        help="plain `generate`, or the evaluator's static-cache CUDA-graph decoder")
    parser.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="keep each prompt's last N tokens (one long prompt pads the whole batch)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    device = device_name()
    config, texts = generation_prompts(args.data, args.tokenizer, args.batch, shape=args.shape)
    tokenizer = load_tokenizer(config.model)
    if args.model:
        model_config = ModelConfig(name_or_path=args.model, tokenizer=args.tokenizer, attn_implementation="sdpa")
    else:
        model_config = ModelConfig(name_or_path=args.tokenizer, config=args.shape, attn_implementation="sdpa")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_model(model_config, device=device, dtype=dtype).eval()
    encoded = encode_prompts(tokenizer, texts)
    # Longest first, as the evaluator batches them; random weights never stop early.
    encoded.sort(key=len, reverse=True)
    if args.max_prompt_tokens:
        encoded = [ids[-args.max_prompt_tokens:] for ids in encoded]
    ids, mask = left_pad(encoded, tokenizer.pad_token_id, device)
    if args.decoder == "static":
        decode = static_greedy(model, tokenizer, args.new_tokens)
    else:
        decode = hf_greedy(model, tokenizer, args.new_tokens, static_cache=args.static_cache)
    _sync()
    started = time.perf_counter()
    decode(ids, mask)
    _sync()
    warmup_s = time.perf_counter() - started
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        started = time.perf_counter()
        new = decode(ids, mask)
        _sync()
        wall = time.perf_counter() - started
    steps = new.shape[1]
    kernels = [e for e in profiler.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    busy_ms = sum(e.self_device_time_total for e in kernels) / 1e3
    launches = sum(e.count for e in profiler.key_averages() if e.key in ("cudaLaunchKernel", "cuLaunchKernelEx"))
    report = {
        "command": " ".join(["python", *sys.argv]), "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "batch": len(encoded), "prompt_tokens_max": len(encoded[0]), "prompt_tokens_mean": sum(map(len, encoded)) / len(encoded),
        "decode_steps": steps, "static_cache": args.static_cache, "decoder": args.decoder, "warmup_s": warmup_s,
        "profiled_wall_s": wall, "wall_ms_per_step": wall * 1e3 / steps, "gpu_busy_ms_per_step": busy_ms / steps,
        "gpu_busy_fraction": busy_ms / (wall * 1e3) if wall else None, "kernel_launches_per_step": launches / steps,
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "top_gpu_ops": top_ops(profiler, "self_device_time_total"), "top_cpu_ops": top_ops(profiler, "self_cpu_time_total"),
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if not k.startswith("top_")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
