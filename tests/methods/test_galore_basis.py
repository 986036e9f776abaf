"""GaLore's basis from the fp64 Gram matrix: the SVD's subspace, block-summed, and galore-torch's
optimizer using it through `seed_projectors`."""

from __future__ import annotations

import copy

import pytest
import torch
from galore_torch import GaLoreAdamW
from galore_torch.galore_projector import GaLoreProjector
from torch import nn

from peftlab.methods import galore_basis
from peftlab.methods.galore_basis import GramProjector, seed_projectors, top_singular_basis


def _gradient(rows: int, cols: int) -> torch.Tensor:
    """A gradient with distinct singular values (a subspace the rank cut does not split)."""
    generator = torch.Generator().manual_seed(0)
    left = torch.linalg.qr(torch.randn(rows, min(rows, cols), generator=generator)).Q
    right = torch.linalg.qr(torch.randn(cols, min(rows, cols), generator=generator)).Q
    return left @ torch.diag(torch.linspace(5, 0.1, min(rows, cols))) @ right.t()


@pytest.mark.parametrize("shape", [(300, 24), (24, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gram_basis_spans_galore_torchs_svd_subspace(shape, dtype, monkeypatch):
    monkeypatch.setattr(galore_basis, "ROW_BLOCK", 64)  # 300 rows (or columns) summed in 5 blocks
    grad = _gradient(*shape).to(dtype)
    side = "right" if shape[0] >= shape[1] else "left"
    ours = top_singular_basis(grad, 6, side)
    theirs = GaLoreProjector(6).get_orthogonal_matrix(grad, 6, side)
    assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape
    ours, theirs = ours.float(), theirs.float()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the bases' own rounding
    if side == "right":  # r x n rows: the same projector onto the row space
        torch.testing.assert_close(ours.t() @ ours, theirs.t() @ theirs, atol=tolerance, rtol=0)
    else:
        torch.testing.assert_close(ours @ ours.t(), theirs @ theirs.t(), atol=tolerance, rtol=0)


def test_a_rank_above_the_smaller_side_keeps_every_vector():
    grad = _gradient(40, 6)
    basis = top_singular_basis(grad, 10, "right")
    assert basis.shape == GaLoreProjector(10).get_orthogonal_matrix(grad, 10, "right").shape == (6, 6)
    torch.testing.assert_close(basis @ basis.t(), torch.eye(6), atol=1e-6, rtol=0)


def test_galore_torch_with_gram_projectors_trains_as_with_its_svd_until_the_refresh():
    """Adam is element-wise and the update is projected back by the same basis, so the bases' sign
    choices cancel until the projection is recomputed (step 3 here); then GaLore carries its moments into
    a basis whose signs differ, so later steps differ as another SVD's sign choice would make them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 40, bias=False), nn.Tanh(), nn.Linear(40, 16, bias=False))
    twin = copy.deepcopy(model)

    def optimizer_for(net):
        return GaLoreAdamW([{"params": [net[0].weight, net[2].weight], "rank": 4, "update_proj_gap": 3,
                             "scale": 0.25, "proj_type": "std", "weight_decay": 0.01}], lr=1e-2,
                           no_deprecation_warning=True)

    start = model[0].weight.detach().clone()
    plain, ours = optimizer_for(model), optimizer_for(twin)
    assert seed_projectors(ours) == 2
    generator = torch.Generator().manual_seed(1)
    for step in range(3):
        inputs = torch.randn(8, 16, generator=generator)
        for net, optimizer in ((model, plain), (twin, ours)):
            net(inputs).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        for a, b in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"step {step}")
    assert all(isinstance(ours.state[p]["projector"], GramProjector) for p in twin.parameters())
    assert (model[0].weight - start).abs().max() > 1e-3  # the weights did train


def test_a_full_projection_keeps_galore_torchs_svd():
    grad = _gradient(30, 20)
    ours = GramProjector(4, proj_type="full").get_orthogonal_matrix(grad, 4, "full")
    theirs = GaLoreProjector(4, proj_type="full").get_orthogonal_matrix(grad, 4, "full")
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "right", "left"])
@pytest.mark.parametrize("shape", [(60, 8), (8, 60)])
def test_every_proj_type_projects_as_galore_torch(proj_type, shape):
    """The Gram route serves the smaller side only; the larger side (reverse_std, or left / right on
    the other shape) keeps galore-torch's SVD, so shapes and subspaces always match galore-torch's."""
    grad = _gradient(*shape)
    ours = GramProjector(16, proj_type=proj_type).project(grad, 0)
    theirs = GaLoreProjector(16, proj_type=proj_type).project(grad, 0)
    assert ours.shape == theirs.shape
    # Same subspace: the projections have the same Gram matrix on their kept side.
    kept = (lambda x: x @ x.t()) if ours.shape[0] <= ours.shape[1] else (lambda x: x.t() @ x)
    torch.testing.assert_close(kept(ours), kept(theirs), atol=1e-4, rtol=1e-4)


def test_a_larger_side_request_never_builds_its_gram_matrix(monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(galore_basis, "top_singular_basis", lambda *a: calls.append(1))
    GramProjector(4, proj_type="reverse_std").project(_gradient(60, 8), 0)  # tall: reverse_std asks for U
    assert calls == []
    with pytest.raises(AttributeError):  # the smaller side does go through it (the stub returns None)
        GramProjector(4, proj_type="std").project(_gradient(60, 8), 0)
    assert calls == [1]


def test_seeding_keeps_a_projector_already_there():
    weight = nn.Parameter(torch.zeros(12, 5))
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 2, "update_proj_gap": 5, "scale": 1.0,
                              "proj_type": "std"}], lr=1e-3, no_deprecation_warning=True)
    assert seed_projectors(optimizer) == 1
    first = optimizer.state[weight]["projector"]
    assert seed_projectors(optimizer) == 0 and optimizer.state[weight]["projector"] is first


@pytest.mark.parametrize("projection", ["gram", "svd"])
def test_a_loaded_state_gets_the_configured_projectors(projection):
    """A checkpoint written under the other setting resumes with the configured projector class, with
    the basis it saved (moved to the parameter's device)."""
    weight = nn.Parameter(torch.randn(12, 5))
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 2, "update_proj_gap": 5, "scale": 1.0,
                              "proj_type": "std"}], lr=1e-3, no_deprecation_warning=True)
    if projection == "svd":
        seed_projectors(optimizer)  # the checkpoint's run used gram
    weight.grad = torch.randn(12, 5)
    optimizer.step()
    saved = optimizer.state[weight]["projector"]
    assert galore_basis.restore_projectors(optimizer, projection) == 1
    restored = optimizer.state[weight]["projector"]
    assert type(restored) is (GramProjector if projection == "gram" else GaLoreProjector)
    torch.testing.assert_close(restored.ortho_matrix, saved.ortho_matrix)
    assert restored.rank == 2 and restored.update_proj_gap == 5


def test_a_loaded_basis_moves_to_its_parameters_device():
    """The Trainer loads optimizer states onto the CPU; the basis inside a projector must follow the
    parameter (here on the meta device, standing in for a GPU)."""
    weight = nn.Parameter(torch.empty(12, 5, device="meta"))
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 2, "update_proj_gap": 5, "scale": 1.0,
                              "proj_type": "std"}], lr=1e-3, no_deprecation_warning=True)
    loaded = GaLoreProjector(2)
    loaded.ortho_matrix = torch.randn(2, 5)  # where torch.load(map_location="cpu") leaves it
    optimizer.state[weight]["projector"] = loaded
    assert galore_basis.restore_projectors(optimizer, "gram") == 1
    assert optimizer.state[weight]["projector"].ortho_matrix.device.type == "meta"
