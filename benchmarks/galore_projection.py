"""How long GaLore's projection refresh takes, and how exact the faster ways to compute it are.

GaLore (proj_type std) refreshes each target's projection from the top-r singular vectors of its
gradient: galore-torch calls `torch.linalg.svd(G.float(), full_matrices=False)` per weight. On the
bench's first optimizer step that is 183 SVDs of the Gemma-3-1B shapes, which dominated the first
step (about 10 s of GaLore `fast`'s 27 s in `h200-2026-11-29-svd-projection.json`).

This script takes real gradients (the bench model shape with random weights, one backward over 16
real rows, loss on all tokens), then for every GaLore target (attention, MLP, the tied embedding)
times each way of computing the rank-r basis and compares it with galore-torch's:
- `svd`: galore-torch's call (cuSOLVER gesvd);
- `svd_gesvdj` / `svd_gesvda`: the same SVD with cuSOLVER's Jacobi / approximate drivers;
- `gram_eigh`: eigenvectors of the smaller Gram matrix (G^T G or G G^T) in fp32, one call per weight;
- `gram_eigh_batched`: the same, weights of one shape stacked into one batched call;
- `gram_eigh64`: the Gram matrix's eigenvectors in fp64;
- `svd_lowrank`: torch's randomized SVD (q = r + 16, 2 power iterations);
- `gram_shipped`: what `galore.projection: gram` runs (`peftlab.methods.galore_basis.top_singular_basis`:
  the fp64 Gram matrix summed over row blocks of the bf16 gradient, no whole fp64 copy);
- `gram_shipped_batched`: the same fp64 Gram matrices, those of one shape in one batched `eigh` call
  (`galore_basis.prefetch_bases`, what `ForeachGaLoreAdamW(refresh="batched")` runs);
- `gram_shipped_threads4` / `8`: `gram_shipped` split over 4 / 8 threads, each on its own CUDA stream (a
  1,152-wide fp64 eigensolve is latency-bound: ~9 ms for ~2 GFLOP; `prefetch_bases(workers=4)` is what
  `ForeachGaLoreAdamW(refresh="threads")` runs).

For each: total seconds over all targets (synchronised, after one warm-up pass), the lowest and mean
subspace overlap with galore-torch's basis (||B_svd B_x^T||_F^2 / r: 1 is the same subspace), and the
lowest fraction of the best rank-r energy the basis captures (||G B_x^T||^2 / ||G B_svd^T||^2).

Usage (GPU machine, repository root; SAMPLES as in benchmarks/README.md):
    python benchmarks/galore_projection.py --data SAMPLES --tokenizer builtin:gemma-3-270m --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

RANK = 128  # the study's galore.rank


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def real_gradients(args) -> dict[str, torch.Tensor]:
    """Gradients of the GaLore targets after one backward over `args.rows` real rows."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from peftlab.methods.galore import target_parameter_names
    from peftlab.models import read_model_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = AutoConfig.for_model(**read_model_config(args.shape))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(device)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = json.loads((Path(args.data) / "alpaca" / "alpaca_4000.json").read_text())[: args.rows]
    texts = [f"{r['instruction']}\n{r.get('input', '')}\n{r['output']}" for r in rows]
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=1024).to(device)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(**batch, labels=labels).loss.backward()
    names = target_parameter_names(model, ["attn", "mlp", "embed_tokens"])
    params = dict(model.named_parameters())
    return {name: params[name].grad.detach().clone() for name in names}


def basis_svd(grad: torch.Tensor, driver: str | None = None) -> torch.Tensor:
    """galore-torch's get_orthogonal_matrix for proj_type std: rows of the r x min-side basis."""
    matrix = grad.float()
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False, driver=driver)
    return vh[:RANK] if matrix.shape[0] >= matrix.shape[1] else u[:, :RANK].t()


def gram(grad: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    matrix = grad.to(dtype)
    return matrix.t() @ matrix if matrix.shape[0] >= matrix.shape[1] else matrix @ matrix.t()


def basis_gram(grad: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    _, vectors = torch.linalg.eigh(gram(grad, dtype))
    return vectors[:, -RANK:].flip(-1).t().float()


def basis_lowrank(grad: torch.Tensor) -> torch.Tensor:
    matrix = grad.float()
    u, _, v = torch.svd_lowrank(matrix, q=RANK + 16, niter=2)
    return v[:, :RANK].t() if matrix.shape[0] >= matrix.shape[1] else u[:, :RANK].t()


def shipped_basis(grad: torch.Tensor) -> torch.Tensor:
    from peftlab.methods.galore_basis import top_singular_basis

    tall = grad.shape[0] >= grad.shape[1]
    basis = top_singular_basis(grad, RANK, "right" if tall else "left").float()
    return basis if tall else basis.t()  # this script compares r x min-side rows


def bases_shipped_prefetched(grads: dict[str, torch.Tensor], workers: int = 0) -> dict[str, torch.Tensor]:
    """What `ForeachGaLoreAdamW(refresh="batched")` (`workers` 0) or `refresh="threads"` runs:
    `galore_basis.prefetch_bases`."""
    from peftlab.methods.galore_basis import GramProjector, prefetch_bases

    projectors = {name: GramProjector(RANK, proj_type="std") for name in grads}
    prefetch_bases([(projectors[name], grad) for name, grad in grads.items()], workers=workers)
    out = {}
    for name, grad in grads.items():
        basis = projectors[name].prefetched.float()
        out[name] = basis if grad.shape[0] >= grad.shape[1] else basis.t()  # r x min-side rows, as above
    return out


def bases_gram_batched(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    by_shape: dict[tuple, list[str]] = defaultdict(list)
    for name, grad in grads.items():
        by_shape[tuple(grad.shape)].append(name)
    out = {}
    for names in by_shape.values():
        _, vectors = torch.linalg.eigh(torch.stack([gram(grads[n]) for n in names]))
        for name, v in zip(names, vectors, strict=True):
            out[name] = v[:, -RANK:].flip(-1).t()
    return out


def timed(fn) -> tuple[float, object]:
    fn()  # warm-up (cuSOLVER handles, workspaces)
    _sync()
    start = time.perf_counter()
    result = fn()
    _sync()
    return time.perf_counter() - start, result


def captured_energy(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    matrix = grad.float()
    return (matrix @ basis.t()).pow(2).sum() if matrix.shape[0] >= matrix.shape[1] else (basis @ matrix).pow(2).sum()


def compare(grads, exact, bases) -> dict[str, float]:
    overlaps, captured = [], []
    for name, grad in grads.items():
        ref = exact[name]
        got = bases[name].to(ref.device, torch.float32)
        overlaps.append(float((ref @ got.t()).pow(2).sum()) / RANK)
        captured.append(float(captured_energy(grad, got) / captured_energy(grad, ref)))
    return {"overlap_min": min(overlaps), "overlap_mean": sum(overlaps) / len(overlaps),
            "energy_captured_min": min(captured)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--shape", default="builtin:gemma-3-1b")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--skip", default="", help="comma-separated methods not to run")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    grads = real_gradients(args)
    shapes = sorted({tuple(g.shape) for g in grads.values()})
    methods = {
        "svd": lambda: {n: basis_svd(g) for n, g in grads.items()},
        "svd_gesvdj": lambda: {n: basis_svd(g, "gesvdj") for n, g in grads.items()},
        "svd_gesvda": lambda: {n: basis_svd(g, "gesvda") for n, g in grads.items()},
        "gram_eigh": lambda: {n: basis_gram(g) for n, g in grads.items()},
        "gram_eigh_batched": lambda: bases_gram_batched(grads),
        "gram_eigh64": lambda: {n: basis_gram(g, torch.float64) for n, g in grads.items()},
        "svd_lowrank": lambda: {n: basis_lowrank(g) for n, g in grads.items()},
        "gram_shipped": lambda: {n: shipped_basis(g) for n, g in grads.items()},
        "gram_shipped_batched": lambda: bases_shipped_prefetched(grads),
        "gram_shipped_threads4": lambda: bases_shipped_prefetched(grads, 4),
        "gram_shipped_threads8": lambda: bases_shipped_prefetched(grads, 8),
    }
    skip = set(filter(None, args.skip.split(",")))
    report = {"command": " ".join(["python", *sys.argv]), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "rank": RANK, "targets": len(grads), "shapes": [list(s) for s in shapes],
              "methods": {}}
    exact = None
    for name, fn in methods.items():
        if name in skip:
            continue
        try:
            seconds, bases = timed(fn)
        except Exception as exc:  # a driver may not support a shape: record it, go on
            report["methods"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(name, "error", exc, flush=True)
            continue
        if exact is None:
            exact = bases
        row = {"seconds_all_targets": seconds, **compare(grads, exact, bases)}
        report["methods"][name] = row
        print(name, json.dumps(row), flush=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
