"""Regional `torch.compile` of a causal LM's decoder layers, shared by training (`torch_compile`)
and the static-cache decoder (`evaluate.compile`)."""

from __future__ import annotations

# Compiled graphs per layer code: the layers share one cache whose variants multiply (first layer's
# input without grad vs the rest, batch of one vs more, attention mask or none): 8, torch's default,
# is reached by one run of a 26-layer model, after which torch silently runs the layers eagerly.
COMPILE_RECOMPILE_LIMIT = 64


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
    from peftlab.models import base_model

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

