"""How much memory the vocabulary loss's backward takes above the forward, for a trained tied 262k x 1152
embedding in bf16 (the Gemma 3 shape): the recomputed chunks (autograd) vs `peftlab.train.vocab_loss`.

CPU, peak resident memory sampled during backward, each case in a fresh process. The GPU's allocator
differs; what this shows is the weight-sized tensors each path adds.

    python benchmarks/vocab_loss_memory.py --out benchmarks/results/cpu-2026-11-29-vocab-loss-memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

VOCAB, WIDTH = 262144, 1152


def one(mode: str, earlier: bool, tokens: int, chunk: int) -> dict:
    import torch

    from peftlab.train import vocab_loss
    from peftlab.train.loss import target_token_loss_sum

    torch.manual_seed(0)
    embed = torch.nn.Embedding(VOCAB, WIDTH).bfloat16()
    head = torch.nn.Linear(WIDTH, VOCAB, bias=False).bfloat16()
    head.weight = embed.weight
    if earlier:  # a gradient accumulated by an earlier micro-batch
        embed.weight.grad = torch.zeros_like(embed.weight)
    ids, targets = torch.randint(0, VOCAB, (tokens,)), torch.randint(0, VOCAB, (tokens,))
    summed = vocab_loss.summed_cross_entropy if mode == "fused" else target_token_loss_sum
    if mode == "fused":
        assert vocab_loss.applies(head, embed)

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

    hidden = torch.tanh(embed(ids) * 3)
    loss = summed(hidden, targets, head, None, chunk)
    base, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    loss.backward()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return {"mode": mode, "earlier_grad": earlier, "tokens": tokens, "chunk": chunk,
            "backward_peak_above_forward_gib": (peak[0] - base) / 2**30, "weight_gib": VOCAB * WIDTH * 2 / 2**30,
            "backward_s": seconds}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        mode, earlier, chunk = args.one.split(",")
        print(json.dumps(one(mode, earlier == "1", args.tokens, int(chunk))))
        return 0
    runs = []
    for chunk in (32, 256):
        for earlier in (False, True):
            for mode in ("reference", "fused"):
                out = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--tokens", str(args.tokens),
                                      "--one", f"{mode},{int(earlier)},{chunk}"],
                                     capture_output=True, text=True, check=True).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
                print(runs[-1], flush=True)
    report = {"command": " ".join(["python", *sys.argv]), "device": "cpu", "vocab": VOCAB, "width": WIDTH,
              "runs": runs}
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
