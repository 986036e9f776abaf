"""Greedy text of the real Gemma 3 270M on the GPU (bf16 and fp32) against CPU fp32.

Quality numbers from the GPU only count if its greedy text matches the CPU fp32 model's text.
Writes a JSON with the texts of every prompt per setting and whether they match CPU fp32.

Usage (GPU machine): python benchmarks/greedy_gpu_vs_cpu.py --model MODEL.gguf|builtin:gemma-3-270m --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the sea:\n",
    "<start_of_turn>user\nGive three tips for staying healthy.<end_of_turn>\n<start_of_turn>model\n",
    "<start_of_turn>user\nWhat is 12 times 7?<end_of_turn>\n<start_of_turn>model\n",
    "def fibonacci(n):",
]


def greedy_texts(model, tokenizer, device: str, new_tokens: int) -> list[str]:
    texts = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").to(device)  # adds the one <bos>
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, top_p=None, top_k=None,
                                 temperature=None)
        texts.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=False))
    return texts


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    from peftlab.config import ModelConfig
    from peftlab.models import load_model, load_tokenizer

    config = ModelConfig(name_or_path=args.model)
    tokenizer = load_tokenizer(config)
    settings = [("cpu", torch.float32, "sdpa"), ("cuda", torch.bfloat16, "sdpa"), ("cuda", torch.bfloat16, "eager"),
                ("cuda", torch.float32, "sdpa")]
    report: dict = {"command": " ".join(["python", *sys.argv]), "prompts": PROMPTS, "runs": []}
    reference = None
    for device, dtype, attention in settings:
        model = load_model(ModelConfig(name_or_path=args.model, attn_implementation=attention), device=device,
                           dtype=dtype).eval()
        texts = greedy_texts(model, tokenizer, device, args.new_tokens)
        reference = reference or texts
        report["runs"].append({"device": device, "dtype": str(dtype).removeprefix("torch."), "attention": attention,
                               "texts": texts, "matches_cpu_fp32": [a == b for a, b in zip(texts, reference, strict=True)]})
        print(device, dtype, attention, sum(report["runs"][-1]["matches_cpu_fp32"]), "/", len(PROMPTS),
              repr(texts[0][:80]), flush=True)
        del model
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
