"""The optimizer-step levers give the libraries' own updates to the bit: GaLore-AdamW with foreach
moments (`methods/galore_foreach.py`) and bitsandbytes' 8-bit AdamW without its syncs
(`train/optimizers.py`)."""

from __future__ import annotations

import copy

import pytest
import torch


def _params(dtype: torch.dtype, device: str = "cpu") -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(24, 16), (16, 40), (8, 8), (16,), (300, 12)]
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(device, dtype)) for shape in shapes]


def _groups(params: list[torch.nn.Parameter]) -> list[dict]:
    return [{"params": params[:2], "rank": 4, "update_proj_gap": 2, "scale": 0.25, "proj_type": "std",
             "weight_decay": 0.01},
            {"params": [params[2], params[4]], "weight_decay": 0.01},
            {"params": [params[3]], "weight_decay": 0.0}]


def _train(optimizer_class, params, steps: int, seed_projectors: bool = False, **kwargs) -> None:
    optimizer = optimizer_class(_groups(params), lr=1e-2, **kwargs)
    if seed_projectors:
        from peftlab.methods.galore_basis import seed_projectors as seed

        seed(optimizer)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator).to(param.device, param.dtype)
        optimizer.step()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gram", [False, True])
def test_foreach_galore_adamw_gives_galore_torchs_update_to_the_bit(device, dtype, gram):
    from galore_torch import GaLoreAdamW

    from peftlab.methods.galore_foreach import ForeachGaLoreAdamW

    theirs, ours = _params(dtype, device), _params(dtype, device)
    # 5 steps with update_proj_gap 2: the projection is recomputed twice on the way.
    _train(GaLoreAdamW, theirs, 5, gram, no_deprecation_warning=True)
    _train(ForeachGaLoreAdamW, ours, 5, gram, no_deprecation_warning=True, foreach=True)
    start = _params(dtype, device)
    for a, b, before in zip(theirs, ours, start, strict=True):
        assert not torch.equal(a, before)
        if device == "cuda" or dtype == torch.float32:
            assert torch.equal(a, b)
        else:  # a CPU's per-tensor bf16 `mul_` by a Python number rounds otherwise (see the class)
            torch.testing.assert_close(a, b, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("refresh", ["batched", "threads"])
def test_prefetched_refresh_gives_the_same_updates(device, refresh, monkeypatch):
    from peftlab.methods import galore_basis
    from peftlab.methods.galore_foreach import ForeachGaLoreAdamW

    counted: list[int] = []
    prefetch = galore_basis.prefetch_bases
    monkeypatch.setattr(galore_basis, "prefetch_bases",
                        lambda due, workers=0, meanwhile=None: counted.append(prefetch(due, workers, meanwhile))
                        or counted[-1])
    results = []
    meanwhile: list[int] = []
    for mode in (None, refresh):
        generator = torch.Generator().manual_seed(0)
        # Two weights of one shape (one batched eigensolve for both), a wide one, and an unprojected one.
        params = [torch.nn.Parameter(torch.randn(shape, generator=generator).to(device))
                  for shape in [(24, 16), (24, 16), (16, 40), (8,)]]
        optimizer = ForeachGaLoreAdamW([{"params": params[:3], "rank": 4, "update_proj_gap": 2, "scale": 0.25,
                                         "proj_type": "std"}, {"params": params[3:]}], lr=1e-2,
                                       no_deprecation_warning=True, foreach=True, refresh=mode)
        optimizer.while_refreshing = lambda: meanwhile.append(1)
        galore_basis.seed_projectors(optimizer)
        grads = torch.Generator().manual_seed(1)
        for _ in range(5):
            for param in params:
                param.grad = torch.randn(param.shape, generator=grads).to(device)
            optimizer.step()
        results.append(params)
    assert counted == [3, 3, 3]  # every projected weight, refreshed at steps 0, 2 and 4
    # `threads` runs the host's work while the bases are computed, at each refresh only.
    assert len(meanwhile) == (3 if refresh == "threads" else 0)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_foreach_galore_adamw_runs_galore_torchs_loop_on_a_cpu():
    from galore_torch import GaLoreAdamW

    from peftlab.methods.galore_foreach import ForeachGaLoreAdamW

    theirs, ours = _params(torch.bfloat16), _params(torch.bfloat16)
    _train(GaLoreAdamW, theirs, 3, no_deprecation_warning=True)
    _train(ForeachGaLoreAdamW, ours, 3, no_deprecation_warning=True)  # foreach=None: CUDA only
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours, strict=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("paged", [False, True])
def test_bitsandbytes_step_without_syncs_gives_the_same_update(device, paged, monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    if paged and device == "cpu":
        pytest.skip("bitsandbytes pages GPU memory only")
    from peftlab.train import optimizers

    called: list[int] = []
    direct = optimizers._direct_8bit_update()
    if device == "cuda":  # the CUDA path calls bitsandbytes' implementation directly
        assert direct is not None
        monkeypatch.setattr(optimizers, "_direct_8bit_update", lambda: lambda *args: called.append(1) or direct(*args))
    # 131,072 elements per tensor: bitsandbytes keeps fewer than 4,096 in fp32 states and pages only
    # buffers of 100,000 or more.
    shape = (512, 256)
    theirs = [torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(s)).to(device))
              for s in range(3)]
    ours = copy.deepcopy(theirs)
    kind = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
    plain = kind(theirs, lr=1e-2, weight_decay=0.01)
    patched = kind(ours, lr=1e-2, weight_decay=0.01)
    assert optimizers.without_step_syncs(patched)
    assert not optimizers.without_step_syncs(torch.optim.AdamW(ours))
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        for a, b in zip(theirs, ours, strict=True):
            a.grad = torch.randn(a.shape, generator=generator).to(device)
            b.grad = a.grad.clone()
        plain.step()
        patched.step()
    if device == "cuda":
        torch.cuda.synchronize()
        assert len(called) == 9
    assert all(getattr(patched.state[p]["state1"], "is_paged", False) == paged for p in ours)
    start = [torch.randn(shape, generator=torch.Generator().manual_seed(s)).to(device) for s in range(3)]
    for a, b, before in zip(theirs, ours, start, strict=True):
        assert torch.equal(a, b) and not torch.equal(a, before)
