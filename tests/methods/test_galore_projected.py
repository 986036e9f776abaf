"""Projected GaLore accumulation: the same updates as galore-torch's GaLoreAdamW on the summed full
gradients, with no full gradient kept, and the same after a checkpoint round trip."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from galore_torch import GaLoreAdamW
from torch import nn

from peftlab.methods.galore_basis import seed_projectors
from peftlab.methods.galore_projected import ProjectedGaLore, route_embedding_gradient
from peftlab.train import vocab_loss
from peftlab.train.loss import target_token_loss_sum

RANK, GAP, SCALE, LR, DECAY = 4, 2, 0.25, 1e-2, 0.01


class TinyLM(nn.Module):
    """A tied embedding (a GaLore target, as in the study's original code), a tall and a wide matrix, a norm."""

    def __init__(self, vocab: int = 40, width: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.up = nn.Linear(width, 20, bias=False)
        self.down = nn.Linear(20, width, bias=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def loss(self, ids: torch.Tensor, summed) -> torch.Tensor:
        hidden = self.embed(ids)
        hidden = self.norm(hidden + self.down(torch.tanh(self.up(hidden))))
        return summed(hidden[:, :-1].reshape(-1, hidden.shape[-1]), ids[:, 1:].reshape(-1), self.head, 3.0, 5)

    def targets(self) -> list[nn.Parameter]:
        return [self.embed.weight, self.up.weight, self.down.weight]

    def others(self) -> list[dict]:
        return [{"params": list(self.norm.parameters()), "weight_decay": 0.0}]


def _batches(steps: int, micro: int) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [[torch.randint(0, 40, (3, 7), generator=generator) for _ in range(micro)] for _ in range(steps)]


def _reference(model: TinyLM, batches, max_grad_norm: float = 0.0) -> list[torch.Tensor]:
    """galore-torch: full gradients summed over the micro-batches, projected at the step."""
    optimizer = GaLoreAdamW([{"params": model.targets(), "rank": RANK, "update_proj_gap": GAP, "scale": SCALE,
                              "proj_type": "std", "weight_decay": DECAY}, *model.others()], lr=LR,
                            no_deprecation_warning=True)
    snapshots = []
    for step in batches:
        for ids in step:
            model.loss(ids, target_token_loss_sum).backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        snapshots.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
    return snapshots


def _ours(model: TinyLM, batches, optimizer: ProjectedGaLore | None = None) -> list[torch.Tensor]:
    if optimizer is None:
        optimizer = _projected(model)
    snapshots = []
    for step in batches:
        for ids in step:
            model.loss(ids, vocab_loss.summed_cross_entropy).backward()
            assert all(p.grad is None for p in model.targets())  # never held at full size
        optimizer.step()
        optimizer.zero_grad()
        snapshots.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
    return snapshots


def _projected(model: TinyLM, max_grad_norm: float = 0.0, gram_min_elements: int = 10**9,
               projection: str = "gram") -> ProjectedGaLore:
    # With projection svd: a target of >= gram_min_elements takes the G^T G path, the others galore-torch's SVD.
    optimizer = ProjectedGaLore(model.targets(), model.others(), lr=LR, rank=RANK, update_proj_gap=GAP,
                                scale=SCALE, weight_decay=DECAY, max_grad_norm=max_grad_norm, eight_bit=False,
                                projection=projection, gram_min_elements=gram_min_elements)
    route_embedding_gradient(model.embed, optimizer)
    return optimizer


def _forbid_svd(monkeypatch) -> None:
    """Make galore-torch's SVD fail inside ProjectedGaLore (the reference optimizer keeps its own)."""
    from galore_torch import galore_projector

    def refuse(*args, **kwargs):
        raise AssertionError("galore-torch's SVD was called under projection gram")

    monkeypatch.setattr(galore_projector.GaLoreProjector, "get_orthogonal_matrix", refuse)


@pytest.mark.parametrize("gram", ["none", "embedding", "all"])
def test_same_weights_as_galore_torch_on_the_summed_gradients(gram, monkeypatch):
    """With galore-torch's SVD for every target, the same weights at every step. With projections from
    the Gram matrix (the embedding's only, as `projection: svd` does for huge matrices, or every one,
    the default), the same until the projection is first recomputed (step 2): both bases span the same
    subspace, but the eigenvectors' signs are not the SVD's, and GaLore carries its Adam moments over
    into the new basis, so later steps differ as any other sign choice would."""
    torch.manual_seed(0)
    model = TinyLM()
    twin = copy.deepcopy(model)
    batches = _batches(steps=5, micro=3)  # projections recomputed at steps 0, 2 and 4
    expected = _reference(model, batches)
    optimizer = _projected(twin, gram_min_elements=400 if gram == "embedding" else 10**9,
                           projection="gram" if gram == "all" else "svd")
    if gram == "all":
        _forbid_svd(monkeypatch)
    ours = _ours(twin, batches, optimizer)
    for step, (a, b) in enumerate(zip(ours[:2] if gram != "none" else ours, expected, strict=False)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6, msg=f"step {step}")
    assert (expected[-1] - expected[0]).abs().max() > 1e-3  # the weights did train


@pytest.mark.parametrize("tall", [True, False])
def test_the_gram_projection_spans_the_svd_subspace(tall, monkeypatch):
    from peftlab.methods import galore_projected

    monkeypatch.setattr(galore_projected, "ROW_BLOCK", 700)  # 3000 rows or columns: blocks of 700, ..., 200
    _forbid_svd(monkeypatch)
    torch.manual_seed(0)
    gradient = torch.randn(3000, 40) @ torch.diag(torch.linspace(3, 0.1, 40))  # distinct singular values
    gradient = gradient if tall else gradient.t().contiguous()
    param = nn.Parameter(torch.zeros(gradient.shape))
    optimizer = ProjectedGaLore([param], [], lr=LR, rank=RANK, update_proj_gap=GAP, scale=SCALE, weight_decay=0.0,
                                max_grad_norm=0.0, eight_bit=False)
    optimizer._set_projection(param, gradient.clone())
    u, _, vh = torch.linalg.svd(gradient, full_matrices=False)
    ours = optimizer.ortho[param]
    if tall:  # r x 40 rows of the right factor
        torch.testing.assert_close(ours.t() @ ours, vh[:RANK].t() @ vh[:RANK], atol=1e-5, rtol=0)
        torch.testing.assert_close(optimizer.projected[param], gradient @ ours.t())
    else:  # 40 x r columns of the left factor
        torch.testing.assert_close(ours @ ours.t(), u[:, :RANK] @ u[:, :RANK].t(), atol=1e-5, rtol=0)
        torch.testing.assert_close(optimizer.projected[param], ours.t() @ gradient)


def test_clipping_uses_the_norm_of_the_projected_gradients():
    torch.manual_seed(0)
    model = TinyLM()
    twin = copy.deepcopy(model)
    optimizer = _projected(model, max_grad_norm=1e-3)
    batches = _batches(steps=1, micro=2)
    for ids in batches[0]:
        twin.loss(ids, target_token_loss_sum).backward()
    full = {name: p.grad.clone() for name, p in twin.named_parameters()}
    _ours(model, batches, optimizer)
    projected = [full["embed.weight"] @ optimizer.ortho[model.embed.weight].t(),
                 full["up.weight"] @ optimizer.ortho[model.up.weight].t(),
                 optimizer.ortho[model.down.weight].t() @ full["down.weight"]]
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in
                                                     [*projected, full["norm.weight"], full["norm.bias"]]]))
    assert optimizer.last_grad_norm == pytest.approx(float(expected), rel=1e-4)
    whole = torch.linalg.vector_norm(torch.stack([g.norm() for g in full.values()]))
    assert optimizer.last_grad_norm < 0.999 * float(whole)  # the projection drops part of the gradient


def test_a_checkpoint_round_trip_continues_the_same_run():
    torch.manual_seed(0)
    model = TinyLM()
    batches = _batches(steps=4, micro=2)
    whole = _ours(copy.deepcopy(model), batches)

    first = copy.deepcopy(model)
    optimizer = _projected(first)
    _ours(first, batches[:3], optimizer)  # stops after a step between projection refreshes
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    second = TinyLM()
    second.load_state_dict(saved["model"])
    restored = _projected(second)
    restored.load_state_dict(saved["optimizer"])
    assert restored.steps_taken == 3
    resumed = _ours(second, batches[3:], restored)
    torch.testing.assert_close(resumed[-1], whole[-1], rtol=0, atol=0)


def test_a_target_without_gradient_on_a_projection_step_takes_a_new_one_from_its_next():
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = _projected(model)
    ids = _batches(1, 1)[0][0]
    model.loss(ids, vocab_loss.summed_cross_entropy).backward()
    optimizer.step()  # step 0 projects every target
    before = optimizer.ortho[model.up.weight].clone()
    model.up.weight.requires_grad_(False)
    model.loss(ids, vocab_loss.summed_cross_entropy).backward()
    optimizer.step()  # step 1
    model.loss(ids, vocab_loss.summed_cross_entropy).backward()
    optimizer.step()  # step 2 projects again, but `up` got no gradient
    assert optimizer.stale == {model.up.weight}
    model.up.weight.requires_grad_(True)
    model.loss(ids, vocab_loss.summed_cross_entropy).backward()
    assert model.up.weight in optimizer.host  # summed whole, for its new projection
    optimizer.step()  # step 3
    assert not optimizer.stale and not torch.equal(optimizer.ortho[model.up.weight], before)


def test_resuming_with_another_rank_is_a_clear_error():
    from peftlab.errors import UserError

    model = TinyLM()
    state = _projected(model).state_dict()
    other = ProjectedGaLore(model.targets(), model.others(), lr=LR, rank=RANK + 1, update_proj_gap=GAP, scale=SCALE,
                            weight_decay=DECAY, max_grad_norm=0.0, eight_bit=False)
    with pytest.raises(UserError, match="rank 4 and update_proj_gap 2"):
        other.load_state_dict(state)


def test_a_deep_copy_of_a_routed_model_looks_up_its_own_weight():
    model = TinyLM()
    _projected(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.embed.weight.zero_()
    ids = torch.tensor([[1, 2, 3]])
    assert twin.embed(ids).abs().sum() == 0 and model.embed(ids).abs().sum() > 0
    twin.embed(ids).sum().backward()  # a plain lookup again: its gradient lands in .grad
    assert twin.embed.weight.grad is not None


def test_a_target_unused_until_a_later_step_gets_its_projection_then():
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = _projected(model)
    optimizer.steps_taken = 1  # not a projection step, and the weights have no projection yet
    model.loss(_batches(1, 1)[0][0], vocab_loss.summed_cross_entropy).backward()
    optimizer.step()
    assert set(optimizer.ortho) == set(model.targets()) and not optimizer.host


@pytest.mark.parametrize("projection", ["svd", "gram"])
def test_eight_bit_states_match_galore_torch_8bit(monkeypatch, projection):
    """The bench's lowmem GaLore: the same weights as galore-torch's GaLoreAdamW8bit given the same summed
    gradients (bitsandbytes' CPU kernels; GaLoreAdamW8bit calls torch.cuda.synchronize, a no-op here).
    With `gram`, galore-torch's optimizer gets `GramProjector`s (what `galore.projection: gram` does to it).
    Projected shapes of at least 4,096 elements (8-bit states): for smaller ones galore-torch's 8-bit
    optimizer on the CPU barely moves the weight (1e-5 where an Adam step of lr 1e-2 x scale moves ~3e-3),
    which ours does not reproduce."""
    from galore_torch import GaLoreAdamW8bit

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    torch.manual_seed(0)
    targets = [nn.Parameter(torch.randn(5000, 64) * 0.02), nn.Parameter(torch.randn(64, 3000) * 0.02)]
    others = [nn.Parameter(torch.randn(64))]
    twins = [nn.Parameter(p.detach().clone()) for p in targets + others]
    reference = GaLoreAdamW8bit([{"params": targets, "rank": 8, "update_proj_gap": 2, "scale": SCALE,
                                  "proj_type": "std", "weight_decay": DECAY},
                                 {"params": others, "weight_decay": 0.0}], lr=1e-2)
    if projection == "gram":
        assert seed_projectors(reference) == 2
    ours = ProjectedGaLore(twins[:2], [{"params": twins[2:], "weight_decay": 0.0}], lr=1e-2, rank=8,
                           update_proj_gap=2, scale=SCALE, weight_decay=DECAY, max_grad_norm=0.0, eight_bit=True,
                           projection=projection)
    generator = torch.Generator().manual_seed(3)
    start = [p.detach().clone() for p in targets]
    for step in range(5):  # projections at steps 0, 2 and 4
        grads = [torch.randn(p.shape, generator=generator) for p in targets + others]
        for param, grad in zip(targets + others, grads, strict=True):
            param.grad = grad.clone()
        try:
            reference.step()
        except (RuntimeError, NotImplementedError) as error:  # a bitsandbytes build without CPU kernels
            pytest.skip(f"bitsandbytes 8-bit optimizer not available on this device: {error}")
        reference.zero_grad()
        for index, (param, grad) in enumerate(zip(twins, grads, strict=True)):
            param.grad = grad.clone()
            if index < 2:
                ours._absorb_grad(param)  # what the hook does when backward finishes the gradient
        ours.step()
        ours.zero_grad()
        for a, b in zip(twins, targets + others, strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6, msg=f"step {step}")
    assert all((p.detach() - s).abs().max() > 1e-3 for p, s in zip(targets, start, strict=True))


def test_eight_bit_states_train_the_same_way():
    """bitsandbytes' 8-bit Adam on the projected stand-ins (the bench's lowmem GaLore); its CPU kernels here."""
    torch.manual_seed(0)
    model = TinyLM(vocab=5000, width=64)  # large enough for 8-bit blocks
    optimizer = ProjectedGaLore(model.targets(), model.others(), lr=1e-2, rank=8, update_proj_gap=2, scale=SCALE,
                                weight_decay=DECAY, max_grad_norm=1.0, eight_bit=True)
    route_embedding_gradient(model.embed, optimizer)
    generator = torch.Generator().manual_seed(1)
    batches = [[torch.randint(0, 5000, (3, 7), generator=generator) for _ in range(2)] for _ in range(3)]
    try:
        snapshots = _ours(model, batches, optimizer)
    except (RuntimeError, NotImplementedError) as error:  # a bitsandbytes build without CPU optimizer kernels
        pytest.skip(f"bitsandbytes 8-bit optimizer not available on this device: {error}")
    assert torch.isfinite(snapshots[-1]).all()
    assert (snapshots[1] - snapshots[0]).abs().max() > 1e-3  # the weights moved at every step
    assert (snapshots[2] - snapshots[1]).abs().max() > 1e-3
    state = optimizer.inner.state[optimizer.stand_ins[model.embed.weight]]
    assert state["state1"].dtype == torch.uint8  # 8-bit moments of the projected (5000 x 8) gradient
