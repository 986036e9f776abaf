"""The static-cache decoder against plain `generate` on the CPU, real weights, fp32.

Decodes the first `--prompts` workload prompts (samples folder, 190 rows per source, as the
generation bench) greedily with both decoders over the same length-sorted batches and reports
tokens/s and how many rows are token-identical (fp32: every row should be).

Usage (CPU, repository root):
    python benchmarks/static_vs_generate_cpu.py --data SAMPLES --model builtin:gemma-3-270m \
        --prompts 16 --max-new-tokens 32 --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    from peftlab.bench.generate import generation_prompts
    from peftlab.config import ModelConfig
    from peftlab.evaluate.generate import encode_prompts, generate_token_ids, hf_greedy, stop_token_ids
    from peftlab.evaluate.static_decode import DecodeStats, static_greedy
    from peftlab.models import load_model, load_tokenizer
    from peftlab.rundir import package_versions

    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="builtin:gemma-3-270m")
    parser.add_argument("--tokenizer", default="builtin:gemma-3-270m")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    config, texts = generation_prompts(args.data, args.tokenizer, args.prompts)
    tokenizer = load_tokenizer(config.model)
    encoded = encode_prompts(tokenizer, texts)
    model = load_model(ModelConfig(name_or_path=args.model, tokenizer=args.tokenizer, attn_implementation="sdpa"),
                       device="cpu", dtype=torch.float32).eval()
    stops = stop_token_ids(tokenizer)
    stats = DecodeStats()
    runs, outputs = [], {}
    for name, decode in (("generate", hf_greedy(model, tokenizer, args.max_new_tokens)),
                         ("static", static_greedy(model, tokenizer, args.max_new_tokens, stats=stats))):
        started = time.perf_counter()
        outputs[name] = generate_token_ids(decode, encoded, tokenizer.pad_token_id, stops, args.batch, "cpu",
                                           max_batch_tokens=131072, new_tokens=args.max_new_tokens)
        seconds = time.perf_counter() - started
        tokens = sum(map(len, outputs[name]))
        runs.append({"run": name, "seconds": seconds, "generated_tokens": tokens, "tokens_per_s": tokens / seconds})
    identical = sum(a == b for a, b in zip(outputs["generate"], outputs["static"], strict=True))
    result = {"command": " ".join(["python", *sys.argv]), "device": "cpu", "dtype": "float32", "model": args.model,
              "prompts": len(encoded), "max_new_tokens": args.max_new_tokens, "batch": args.batch, "runs": runs,
              "identical_rows": identical, "decoder": stats.as_dict(), "versions": package_versions()}
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "versions"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
