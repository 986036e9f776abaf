"""The background Triton warm-up (`peftlab.train.kernel_warmup`): its small model, its generators, and
that a failure is recorded instead of raised."""

from __future__ import annotations

import pytest
import torch

from peftlab.models import read_model_config
from peftlab.train.kernel_warmup import (
    WARMUP_VOCABULARY,
    KernelWarmup,
    triton_cache_files,
    warmup_config,
    warmup_model,
)


def test_warmup_config_keeps_the_widths_with_one_layer_and_a_small_vocabulary():
    shape = read_model_config("builtin:gemma-3-1b")
    small = warmup_config(shape)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "rms_norm_eps", "hidden_activation"):
        assert small[key] == shape[key]
    assert small["num_hidden_layers"] == 1
    assert small["vocab_size"] == WARMUP_VOCABULARY
    for key in ("pad_token_id", "bos_token_id"):
        assert small[key] < WARMUP_VOCABULARY
    if "layer_types" in shape:
        assert small["layer_types"] == shape["layer_types"][:1]


def test_warmup_model_leaves_the_global_generator_alone_and_runs_forward_and_backward():
    shape = read_model_config("builtin:gemma-3-1b")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generator = torch.Generator().manual_seed(0)
    model = warmup_model(shape, torch.float32, "cpu", generator)
    # The main thread seeds and initialises the real model meanwhile: its draws must not move.
    assert torch.equal(torch.rand(3), expected)
    assert sum(p.numel() for p in model.parameters()) < 60_000_000
    ids = torch.randint(0, WARMUP_VOCABULARY, (1, 64), generator=generator)
    hidden = model.get_decoder()(input_ids=ids, position_ids=torch.arange(64)[None], use_cache=False).last_hidden_state
    hidden.square().mean().backward()
    assert torch.isfinite(hidden).all()
    assert model.get_decoder().layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure path of a machine without CUDA")
def test_a_failed_warmup_is_recorded_and_the_wait_returns():
    warmup = KernelWarmup(read_model_config("builtin:gemma-3-1b"), torch.bfloat16, modules=False, loss=True,
                          autocast_bf16=True).start()
    warmup.wait()
    warmup.finish()
    described = warmup.describe()
    assert described["failure"] is not None
    assert described["seconds"] is not None and described["waited_s"] is not None
    assert described["compiled_in_loop"] == 0


def test_triton_cache_files_counts_the_cache_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    assert triton_cache_files() == 0
    (tmp_path / "cache" / "abc").mkdir(parents=True)
    (tmp_path / "cache" / "abc" / "kernel.cubin").write_bytes(b"x")
    assert triton_cache_files() == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernels compile on CUDA only")
def test_warmup_compiles_liger_and_the_cross_entropy_on_cuda():
    pytest.importorskip("liger_kernel")
    shape = read_model_config("builtin:gemma-3-1b")
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    warmup = KernelWarmup(shape, torch.bfloat16, modules=True, loss=True, autocast_bf16=True,
                          tokens=[1024, 2048], trains_base=True,
                          device=f"cuda:{torch.cuda.current_device()}").start()
    assert torch.get_default_dtype() == torch.float32  # the small model is built before start returns
    warmup.wait()
    assert warmup.describe()["failure"] is None
    assert warmup.seconds > 0
    torch.cuda.synchronize()
    # The small model, its gradients and the side streams' cuBLAS workspaces are gone.
    assert torch.cuda.memory_allocated() - allocated < 16 * 2**20


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU form of the work (a GPU test may have patched in liger)")
@pytest.mark.parametrize("trains_base", [False, True])
def test_the_warmup_work_runs_every_family_and_the_layer_at_every_size(trains_base):
    # On a CPU the same work runs without liger's kernels: the shapes and calls are the GPU's.
    from peftlab.models.kernels import restore_unpatched_gemma3

    restore_unpatched_gemma3()
    shape = read_model_config("builtin:gemma-3-1b")
    warmup = KernelWarmup(shape, torch.float32, modules=True, loss=False, autocast_bf16=False, tokens=[128, 64],
                          trains_base=trains_base, device="cpu")
    assert warmup.tokens == [64, 128]
    model = warmup._model()
    assert all(p.requires_grad == trains_base for p in model.parameters())
    families = warmup._families(model)
    assert len(families) == 4  # hidden norm, head norms, MLP, RoPE
    for work in families:
        work()
    warmup._run_modules(model, 64)
    norm = model.get_decoder().layers[0].input_layernorm.weight
    assert (norm.grad is not None) == trains_base  # a frozen base: the norm's weight gradient is not computed
