"""GaLore's projection basis from the eigenvectors of the gradient's smaller Gram matrix, in fp64.

GaLore (`proj_type: std`) projects a gradient G (m x n) onto its top-r singular vectors: the right
ones (r x n rows) when G is tall, the left ones (m x r) when it is wide. galore-torch computes a full
`torch.linalg.svd` of G per weight; on an H200 that took 9.98 s for Gemma-3-1B's 183 targets, most of
the first step of a short run (`benchmarks/results/h200-2026-11-29-galore-projection-shipped.json`). The
same vectors are the top eigenvectors of G^T G (tall) or G G^T (wide), a min(m, n)-sized symmetric
problem: in fp64 (Gram matrix and eigensolver) the subspace matches the SVD's to fp32 precision
(same file), 5.8x faster. Eigenvector signs are arbitrary, as the SVD's are.

The Gram matrix is summed over row blocks, so no fp64 copy of a large gradient (the 262k-row tied
embedding) is ever whole. `GramProjector` is galore-torch's projector with this basis. fp64 matmuls
run at 1/32-1/64 of the fp32 rate on consumer GPUs, where the refresh costs more than on an H200
(not measured; `galore.projection: svd` is galore-torch's own call).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from galore_torch.galore_projector import GaLoreProjector

# Rows of a gradient converted to fp64 at a time (8192 x 1152 fp64 = 75 MB).
ROW_BLOCK = 8192


def gram_of_row_blocks(blocks: Iterable[torch.Tensor], size: int, device: torch.device | str) -> torch.Tensor:
    """The fp64 sum of block^T block over `blocks` (each k x size): the Gram matrix of their rows."""
    gram = torch.zeros(size, size, dtype=torch.float64, device=device)
    for block in blocks:
        block = block.to(device=device, dtype=torch.float64)
        gram.addmm_(block.t(), block)
    return gram


def basis_from_gram(gram: torch.Tensor, rank: int, side: Literal["left", "right"], dtype: torch.dtype) -> torch.Tensor:
    """The top-`rank` eigenvectors of `gram`, as galore-torch lays out its basis: `right` r x n rows
    (Vh[:r]), `left` m x r columns (U[:, :r]); largest eigenvalue first."""
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    return _laid_out(vectors, rank, side, dtype)


def _laid_out(vectors: torch.Tensor, rank: int, side: Literal["left", "right"], dtype: torch.dtype) -> torch.Tensor:
    top = vectors[:, -min(rank, vectors.shape[0]):].flip(-1)
    return (top.t() if side == "right" else top).contiguous().to(dtype)


def gradient_gram(grad: torch.Tensor, side: Literal["left", "right"]) -> torch.Tensor:
    """The fp64 Gram matrix of `grad`'s `side`: G^T G (right) or G G^T (left), summed over row blocks."""
    rows = grad if side == "right" else grad.t()  # the Gram matrix of `rows`' rows is G^T G or G G^T
    blocks = (rows[start:start + ROW_BLOCK] for start in range(0, rows.shape[0], ROW_BLOCK))
    return gram_of_row_blocks(blocks, rows.shape[1], grad.device)


def top_singular_basis(grad: torch.Tensor, rank: int, side: Literal["left", "right"]) -> torch.Tensor:
    """galore-torch's `get_orthogonal_matrix(grad, rank, side)` for `left` / `right`, in `grad`'s dtype.
    Meant for the smaller side (right: a tall grad, left: a wide one): the Gram matrix is that side squared."""
    return basis_from_gram(gradient_gram(grad, side), rank, side, grad.dtype)


def prefetch_bases(due: list[tuple[GaLoreProjector, torch.Tensor]], workers: int = 0,
                   meanwhile: Callable[[], Any] | None = None) -> int:
    """Compute the bases of several `GramProjector`s due for a refresh (`std`: the smaller side) at once.
    `workers` 0: one batched fp64 eigensolve per gradient shape instead of one call per weight; `workers`
    > 0: one call per weight, spread over that many threads, each on its own CUDA stream (a 1,152-wide
    fp64 eigensolve is latency-bound, so several overlap on one GPU; the caller frees the streams' cuBLAS
    workspaces afterwards, `models.kernels.release_side_stream_workspaces`); `meanwhile` then runs on
    the calling thread while they work. Each projector takes its basis at its refresh
    (`get_orthogonal_matrix`), the same as it would compute alone. Returns how many bases were computed."""
    members: list[tuple[GramProjector, torch.Tensor, str]] = []
    for projector, grad in due:
        if not isinstance(projector, GramProjector) or projector.proj_type != "std" or grad.dim() != 2:
            continue
        members.append((projector, grad, "right" if grad.shape[0] >= grad.shape[1] else "left"))
    if workers > 0:
        _bases_in_threads(members, workers, meanwhile)
        return len(members)
    groups: dict[tuple, list[tuple[GramProjector, torch.Tensor, str]]] = {}
    for projector, grad, side in members:
        groups.setdefault((tuple(grad.shape), grad.dtype, grad.device, projector.rank), []).append(
            (projector, grad, side))
    for group in groups.values():
        _, vectors = torch.linalg.eigh(torch.stack([gradient_gram(grad, side) for _, grad, side in group]))
        for (projector, grad, side), found in zip(group, vectors, strict=True):
            projector.prefetched = _laid_out(found, projector.rank, side, grad.dtype)
    return len(members)


def _bases_in_threads(members: list[tuple[GramProjector, torch.Tensor, str]], workers: int,
                      meanwhile: Callable[[], Any] | None) -> None:
    from concurrent.futures import ThreadPoolExecutor

    cuda = bool(members) and members[0][1].is_cuda
    if cuda:
        # torch loads its CUDA linear-algebra library on the first call; two threads at once fail there.
        torch.linalg.eigh(torch.eye(2, dtype=torch.float64, device=members[0][1].device))
    current = torch.cuda.current_stream() if cuda else None
    streams = [torch.cuda.Stream() if cuda else None for _ in range(workers)]

    def work(index: int) -> None:
        if cuda:
            torch.cuda.set_device(members[0][1].device)  # a new thread starts on GPU 0
        stream = streams[index]
        if stream is not None:
            stream.wait_stream(current)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for projector, grad, side in members[index::workers]:
                projector.prefetched = top_singular_basis(grad, projector.rank, side)
                if stream is not None:
                    projector.prefetched.record_stream(current)  # used on the main stream, freed after it

    with ThreadPoolExecutor(workers, thread_name_prefix="peftlab-galore-basis") as pool:
        futures = [pool.submit(work, index) for index in range(workers)]
        try:
            if meanwhile is not None:
                meanwhile()
        finally:
            for future in futures:
                future.result()  # a worker's exception is raised here
    for stream in streams:
        if stream is not None:
            current.wait_stream(stream)


class GramProjector(GaLoreProjector):
    """galore-torch's projector (same project / project_back, same refresh schedule) with the basis
    from `top_singular_basis` whenever the requested side is the smaller one (`std`, the default, always
    asks for it); otherwise (`reverse_std`, `left` / `right` on the other shape, `full`) galore-torch's
    SVD, since the Gram matrix of the larger side would be max(m, n) squared."""

    prefetched: torch.Tensor | None = None  # a basis from `prefetch_bases`, taken at the next refresh

    def get_orthogonal_matrix(self, weights, rank, type):  # galore-torch names its argument `type`
        if self.prefetched is not None:
            basis, self.prefetched = self.prefetched, None
            return basis
        rows, cols = weights.shape
        if (type == "right" and rows >= cols) or (type == "left" and rows <= cols):
            return top_singular_basis(weights.data, rank, type)
        return super().get_orthogonal_matrix(weights, rank, type)


def seed_projectors(optimizer: torch.optim.Optimizer) -> int:
    """Give every GaLore-projected parameter of a galore-torch optimizer without a projector yet a
    `GramProjector`: its step creates a `GaLoreProjector` only for a state without one. Returns how
    many were seeded."""
    seeded = 0
    for group in optimizer.param_groups:
        if "rank" not in group:
            continue
        for param in group["params"]:
            if "projector" in optimizer.state[param]:
                continue
            optimizer.state[param]["projector"] = GramProjector(
                group["rank"], update_proj_gap=group["update_proj_gap"], scale=group["scale"],
                proj_type=group["proj_type"])
            seeded += 1
    return seeded


def restore_projectors(optimizer: torch.optim.Optimizer, projection: Literal["gram", "svd"]) -> int:
    """After a checkpoint's optimizer state is loaded: each projector becomes the class `projection`
    names (the checkpoint may come from the other setting; both classes hold the same attributes) and
    its basis moves to its parameter's device (the Trainer loads optimizer states onto the CPU, and
    `Optimizer.load_state_dict` moves only tensors it sees, not those inside projector objects).
    Returns how many projectors were restored."""
    cls = GramProjector if projection == "gram" else GaLoreProjector
    restored = 0
    for param, state in optimizer.state.items():
        old = state.get("projector") if isinstance(state, dict) else None
        if old is None:
            continue
        new = cls.__new__(cls)
        new.__dict__.update(old.__dict__)
        ortho = new.ortho_matrix
        if isinstance(ortho, torch.Tensor):
            new.ortho_matrix = ortho.to(param.device)
        elif isinstance(ortho, list | tuple):  # proj_type full: both sides
            new.ortho_matrix = [o.to(param.device) for o in ortho]
        state["projector"] = new
        restored += 1
    return restored
