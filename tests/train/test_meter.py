"""The resource meter's pure parts: where an allocator trace's peak comes from."""

from __future__ import annotations

from peftlab.train.meter import peak_allocation_sites


def _frame(path: str, line: int, name: str) -> dict:
    return {"filename": path, "line": line, "name": name}


def _alloc(addr: int, size: int, *frames: dict) -> dict:
    return {"action": "alloc", "addr": addr, "size": size, "frames": list(frames)}


def _free(addr: int, size: int) -> dict:
    return {"action": "free_requested", "addr": addr, "size": size}


TORCH = _frame("/venv/lib/python3.12/site-packages/torch/nn/functional.py", 10, "linear")
LOSS = _frame("/work/src/peftlab/train/runner.py", 40, "chunk_loss")
MLP = _frame("/venv/lib/python3.12/site-packages/transformers/models/gemma3/modeling_gemma3.py", 99, "forward")


def test_the_peak_is_located_and_grouped_by_the_code_that_allocated():
    trace = [
        _alloc(1, 100, TORCH, MLP), _alloc(2, 50, LOSS), _alloc(3, 30, TORCH, MLP),
        _free(1, 100),                      # total 80 after this
        _alloc(4, 60, LOSS),                # 140: not above the 180 peak
        _free(99, 70),                      # a block from before the recording: 70
        _alloc(5, 100, LOSS),               # 170 live in the trace, 100 of it new: no new peak
        _free(2, 50), _free(3, 30),
        {"action": "free_completed", "addr": 4, "size": 60},  # ignored: frees count once, when requested
    ]
    result = peak_allocation_sites(trace, baseline_bytes=1000)
    assert result["recorded_peak_bytes"] == 180 and result["peak_bytes"] == 1180
    assert result["peak_event"] == 2
    sites = {site["site"]: site for site in result["sites"]}
    # At the peak: blocks 1 and 3 (the MLP, reached through torch) and block 2 (the loss).
    assert sites["transformers/models/gemma3/modeling_gemma3.py:99 forward"]["bytes"] == 130
    assert sites["transformers/models/gemma3/modeling_gemma3.py:99 forward"]["blocks"] == 2
    assert sites["peftlab/train/runner.py:40 chunk_loss"]["bytes"] == 50
    assert [s["bytes"] for s in result["sites"]] == [130, 50]


def test_a_later_higher_peak_wins_and_free_completed_is_used_when_alone():
    inductor = _frame("/tmp/torchinductor_root/xy/cxyz.py", 80, "call")
    trace = [_alloc(1, 10, LOSS), {"action": "free_completed", "addr": 1, "size": 10}, _alloc(2, 25, inductor, MLP),
             _alloc(3, 5, {"filename": "??", "line": 0, "name": "?"})]
    result = peak_allocation_sites(trace)
    assert result["recorded_peak_bytes"] == 30 and result["peak_event"] == 3
    assert {s["site"] for s in result["sites"]} == {"transformers/models/gemma3/modeling_gemma3.py:99 forward",
                                                     "(no Python frame: autograd backward or C++)"}


def test_phase_peaks_name_the_span_of_a_step_that_peaked():
    """Forward, the loss after the final norm, and a recompute inside backward (checkpointing) are
    told apart; the fake peak reader stands in for torch.cuda's."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from peftlab.train.meter import PhasePeaks

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
            self.norm = torch.nn.LayerNorm(4)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = Decoder()

        def get_decoder(self):
            return self.decoder

    model = Model()
    readings = iter(range(1, 1000))
    phases = PhasePeaks(lambda: next(readings) * 2**20)
    phases.attach(model)
    x = torch.randn(2, 4, requires_grad=True)
    for layer in model.decoder.layers:
        x = checkpoint(layer, x, use_reentrant=False)
    loss = model.decoder.norm(x).sum()
    phases.mark("loss")
    loss.backward()
    phases.mark("optimizer start")
    spans = [s["span"] for s in phases.result(top=100)["spans"]]
    assert "layer 0 forward start -> layer 0 forward end" in spans
    assert "layer 1 forward end -> final norm" in spans
    # torch stops a recompute once it has what backward needs: a layer's recompute and backward are
    # the span from its recompute start to the next one's.
    assert "layer 1 recompute start -> layer 0 recompute start" in spans
    assert "layer 0 recompute start -> optimizer start" in spans
    # The last span read the highest fake peak, so it ranks first.
    assert phases.result()["spans"][0]["span"] == "layer 0 recompute start -> optimizer start"
    assert {"kind": "layer N recompute start -> layer N recompute start", "peak_mib": 8.0} in phases.result()["kinds"]


def test_step_times_measure_each_run_from_its_own_start(monkeypatch):
    import time

    import torch

    from peftlab.train.meter import StepTimes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the host clock (a GPU: CUDA events)
    clock = iter([10.0, 11.5, 12.0, 50.0, 50.25])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    times = StepTimes()
    times.on_train_begin(None, None, None)
    times.on_step_end(None, None, None)
    times.on_step_end(None, None, None)
    assert times.summary() == {"first_step_s": 1.5, "step_s_median": 0.5, "first_steps_s": [1.5, 0.5]}
    times.on_train_begin(None, None, None)  # a second run (resumed): the 38 s between runs are no step
    times.on_step_end(None, None, None)
    assert times.durations == [1.5, 0.5, 0.25]
