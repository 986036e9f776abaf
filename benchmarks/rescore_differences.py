"""Re-score a generation bench's differing rows in true fp32 on the CPU.

`peftlab bench generate` scores the first difference between plain `generate` and our decoder
with the GPU model converted to fp32 (`differing_rows_fp32`). This script rebuilds the same prompts
(same workload: samples folder, tokenizer, 190 rows per source, the report's prompt count), loads
the real weights in fp32 on the CPU, and for every recorded difference scores plain's token, ours
and the argmax on the shared prefix. A near-tie here (small `plain_minus_ours`) means bf16
rounding chose between two near-equal tokens, whatever the GPU re-scoring said.

Usage (CPU, repository root):
    python benchmarks/rescore_differences.py --report benchmarks/results/X-generation-270m.json \
        --data SAMPLES --tokenizer builtin:gemma-3-270m --model builtin:gemma-3-270m --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main() -> int:
    from peftlab.bench.generate import generation_prompts
    from peftlab.config import ModelConfig
    from peftlab.evaluate.generate import encode_prompts
    from peftlab.models import load_model, load_tokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--report", required=True, type=Path)
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--model", required=True, help="the real weights the report decoded with")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    report = json.loads(args.report.read_text())
    config, texts = generation_prompts(args.data, args.tokenizer, report["prompts"])
    encoded = encode_prompts(load_tokenizer(config.model), texts)
    model = load_model(ModelConfig(name_or_path=args.model, tokenizer=args.tokenizer, attn_implementation="sdpa"),
                       device="cpu", dtype=torch.float32).eval()
    rows = []
    for gap in report["differing_rows_fp32"]:
        if "plain_token" not in gap:
            continue
        prompt = encoded[gap["row"]]
        if len(prompt) != gap["prompt_tokens"]:
            raise SystemExit(f"row {gap['row']}: {len(prompt)} prompt tokens here, {gap['prompt_tokens']} in the report:"
                             " not the same workload")
        tail = gap["generated_prefix_tail"]
        if gap["position"] > len(tail):
            rows.append({"row": gap["row"], "skipped": "prefix longer than the recorded tail"})
            continue
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([prompt + tail]), logits_to_keep=1).logits[0, -1].float()
        top2 = torch.topk(logits, 2).values
        plain, ours = gap["plain_token"], gap["ours_token"]
        rows.append({"row": gap["row"], "position": gap["position"], "sequence_tokens": len(prompt) + len(tail),
                     "plain_minus_ours_cpu_fp32": float(logits[plain] - logits[ours]),
                     "plain_minus_ours_gpu_fp32": gap["plain_minus_ours"],
                     "top2_margin_cpu_fp32": float(top2[0] - top2[1]),
                     "argmax_cpu_fp32": int(logits.argmax()), "plain_token": plain, "ours_token": ours})
    scored = [r for r in rows if "plain_minus_ours_cpu_fp32" in r]
    result = {"command": " ".join(["python", *sys.argv]), "report": str(args.report), "model": args.model,
              "rows": rows, "max_abs_gap_cpu_fp32": max((abs(r["plain_minus_ours_cpu_fp32"]) for r in scored), default=None),
              "max_abs_gap_gpu_fp32": max((abs(r["plain_minus_ours_gpu_fp32"]) for r in scored), default=None)}
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
