"""Kernel-level speed levers applied to a loaded model: liger-kernel's fused Gemma 3 modules, and
regional `torch.compile` of the decoder layers (shared by training's `torch_compile` and the
static-cache decoder's `evaluate.compile`)."""

from __future__ import annotations

from peftlab.errors import UserError

# Compiled graphs per layer code: the layers share one cache whose variants multiply (first layer's
# input without grad vs the rest, batch of one vs more, attention mask or none): 8, torch's default,
# is reached by one run of a 26-layer model, after which torch silently runs the layers eagerly.
COMPILE_RECOMPILE_LIMIT = 64


# What liger-kernel replaces at module level in transformers' Gemma 3 code (models loaded later get it too).
LIGER_GEMMA3_NAMES = ("apply_rotary_pos_emb", "Gemma3RMSNorm", "Gemma3MLP")


def restore_unpatched_gemma3() -> None:
    """Undo liger-kernel's module-level Gemma 3 patches (kept on the patched module by
    `apply_liger_kernels`), so a model loaded without `liger_kernel` in the same process is plain."""
    from transformers.models.gemma3 import modeling_gemma3

    for name, original in getattr(modeling_gemma3, "_peftlab_unpatched", {}).items():
        setattr(modeling_gemma3, name, original)


def apply_liger_kernels(loaded, device: str) -> None:
    """liger-kernel's fused RMSNorm, GeGLU MLP and RoPE on this Gemma 3 model (loss stays ours)."""
    if device != "cuda":
        raise UserError("model.liger_kernel needs a CUDA GPU (Triton kernels); set it to false on this machine")
    if getattr(loaded.config, "model_type", None) != "gemma3_text":
        raise UserError(f"model.liger_kernel is wired for Gemma 3 text models, not '{loaded.config.model_type}'")
    patch_gemma3_modules(loaded)


def patch_gemma3_modules(loaded=None) -> None:
    """liger-kernel's module-level Gemma 3 patches (models built afterwards get its modules), and the
    instance's modules when `loaded` is given; the unpatched names are kept for `restore_unpatched_gemma3`."""
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_gemma3_text
    except ImportError:
        raise UserError("model.liger_kernel needs liger-kernel: pip install 'peftlab[gpu]'") from None
    from transformers.models.gemma3 import modeling_gemma3

    if not hasattr(modeling_gemma3, "_peftlab_unpatched"):
        modeling_gemma3._peftlab_unpatched = {name: getattr(modeling_gemma3, name) for name in LIGER_GEMMA3_NAMES}
    apply_liger_kernel_to_gemma3_text(rope=True, rms_norm=True, geglu=True, cross_entropy=False,
                                      fused_linear_cross_entropy=False, model=loaded)


def compile_decoder_layers(model) -> int:
    """Regional compilation: `torch.compile` each decoder layer in place (dynamic shapes), not the
    whole model. All layers share one compiled code cache, so compile time does not grow with
    depth; parameter names (what is saved) do not change; the vocabulary projection and the chunked
    loss stay eager. Dynamo's caches are reset first, so an earlier model in this process (a study
    trains several) cannot use up the recompile limit. Returns the number of layers compiled."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # compile_stats() then describes this model's run only
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_RECOMPILE_LIMIT)
    from peftlab.models.loading import base_model  # loading applies these levers: imported late

    layers = base_model(model).get_decoder().layers
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def compile_stats() -> dict[str, int]:
    """Frames dynamo was asked to compile and how many it did; fewer `ok` than `total` means some
    calls fell back to eager (a graph break or a limit)."""
    from torch._dynamo.utils import counters

    return {"frames_total": int(counters["frames"]["total"]), "frames_ok": int(counters["frames"]["ok"]),
            "unique_graphs": int(counters["stats"]["unique_graphs"])}


def release_side_stream_workspaces() -> None:
    """Free cuBLAS's workspaces: PyTorch keeps one per (thread's handle, stream) for good, so every
    side stream that ran a matmul would hold its own (tens of MiB each, counted as allocated: QLoRA
    `lowmem`'s peak went from 1.398 to 1.526 GiB with the warm-up threads). The next matmul on a
    stream allocates its workspace again."""
    import torch

    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None and torch.cuda.is_available():
        clear()
