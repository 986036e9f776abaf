"""How a training step executes on this device: the one place that turns a method's settings into the
execution that runs them.

The recipe (what is learned) is the config's and never changes here: the rows of each optimizer step
(`batch_size` x `grad_accum`, per process), learning rate and schedule, epochs / max_steps,
`data.max_seq_length`, the optimizer and its hyperparameters, and the loss (the token mean over the
step's target tokens). The execution (how a step runs) is chosen here for each setting the YAML does
not give (`MethodConfig.explicit`, or a value that differs from the default); a given key is kept:

- the split of the step's rows into forwards: `batch_size` / `grad_accum` as the Trainer sees them
  (on a GPU always ours: their product is the recipe), and `micro_batch_tokens` (a token budget per forward);
- `padding_free` (default true), the attention kernel (`attention`), `gradient_checkpointing`,
  `loss_chunk_tokens`, `torch_compile`, `pad_tokens_to_multiple_of`, `dequantized_base` (QLoRA),
  `avoid_host_syncs`, `graph_tokens` / `cuda_graphs`, and `galore.accumulate` (`projected` sums gradients at rank r: same update).

Choices:
- CUDA, no memory budget (the bench's `fast` levers, driven by the card's memory): the whole effective
  batch is one Trainer micro-batch, padding-free, split into forwards only by the largest token budget
  that the estimated memory holds (none when the whole batch fits); no activation checkpointing while
  a full-length row fits without it; vocabulary logits 1,024 tokens at a time; the fastest exact
  variable-length attention that passes a tiny forward/backward probe here (flash-attn if installed,
  torch's `varlen_attn`, FlexAttention, else SDPA with a block-diagonal mask); QLoRA keeps bf16
  copies of its frozen NF4 weights; no host syncs per micro-batch.
- CUDA with `memory_budget_gib` (the bench's `lowmem` levers, as far as the budget needs them):
  levers are given up in order of their speed cost until the estimate fits: the loss chunk (1,024 ->
  256 -> 32), QLoRA's bf16 copies, then activation checkpointing, then (GaLore, one process) projected
  gradient accumulation; forwards then carry as many tokens as fit, at least one full-length row.
- CUDA without a memory budget, a Gemma 3 model and liger-kernel installed: liger's fused RMSNorm,
  GeGLU and RoPE (`model.liger_kernel`, unless the YAML sets it).
- CUDA, one process, padding-free, no activation checkpointing (both modes): the rows run as bins of
  `graph_tokens` (4,096, or what memory allows), each bin's forward + backward replayed from one
  CUDA graph (`peftlab.train.graphs`).
- CPU: the config as written (its batch split, checkpointing and chunk), padding-free, SDPA.

The memory estimate (`estimate_peak_gib`) is arithmetic on the model shape, stated in its docstring;
`metrics.json` records it next to the measured peak.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from peftlab.config import MethodConfig, ModelConfig
from peftlab.train.vocab_loss import triton_cross_entropy_available

GIB = 1024**3
# Settings this module may choose; any other MethodConfig key is recipe and passes through unchanged.
EXECUTION_KEYS = ("batch_size", "grad_accum", "micro_batch_tokens", "gradient_checkpointing", "loss_chunk_tokens",
                  "torch_compile", "padding_free", "attention", "pad_tokens_to_multiple_of", "dequantized_base",
                  "avoid_host_syncs", "graph_tokens", "cuda_graphs")
# Of the card's memory, what training may plan to use (allocator fragmentation, CUDA context, workspaces).
CARD_FRACTION = 0.85
FAST_LOSS_CHUNK = 1024
LOSS_CHUNKS = (1024, 256, 32)
TOKEN_GRANULE = 256
# Tokens per fixed-size bin of the CUDA-graph execution (at least max_seq_length).
GRAPH_TOKENS = 4096
# Packed attention kernels on CUDA, fastest first; each must pass `packing.probe_attention` here.
CUDA_PACKED_ATTENTION = ("flash_attention_2", "varlen", "flex_attention", "sdpa")


@dataclass
class Execution:
    """The chosen execution: `method` is the config with every execution setting resolved (what the
    recipe builder and the Trainer read), `attention` the kernel the model is loaded with, `liger`
    whether it is loaded with liger-kernel's fused modules, `liger_loss` whether the bins' vocabulary loss
    runs liger-kernel's Triton cross-entropy (any model, unless the YAML sets `model.liger_kernel: false`),
    and `described` what metrics.json records under `execution`."""

    method: MethodConfig
    attention: str
    described: dict[str, Any] = field(default_factory=dict)
    liger: bool = False
    liger_loss: bool = False


def explicit_keys(method: MethodConfig) -> set[str]:
    """Keys the YAML gave for this method, plus execution keys whose value differs from the default
    (a config built in code, e.g. with `dataclasses.replace`)."""
    defaults = MethodConfig(kind=method.kind)
    changed = {key for key in EXECUTION_KEYS if getattr(method, key) != getattr(defaults, key)}
    return set(method.explicit) | changed


def choose_execution(method: MethodConfig, explicit: set[str], *, device: str, gpu_memory_gib: float | None,
                     model: ModelConfig | None = None, shape: dict[str, Any] | None = None,
                     max_seq_length: int = 2048, world: int = 1, fsdp: bool = False,
                     probe: bool = True) -> Execution:
    """The execution for `method` on `device` (`gpu_memory_gib`: the card's total memory) given the keys
    the user set (`explicit`); `shape` is the model's config (layers, widths, vocabulary) for the
    memory estimate; `probe` runs the attention probe on CUDA (off in tests of the choice itself)."""
    model = model or ModelConfig()
    chosen: dict[str, Any] = {}

    def choose(key: str, value: Any) -> None:
        if key not in explicit:
            chosen[key] = value

    attention = _attention_setting(method, model, explicit)
    if device != "cuda" or gpu_memory_gib is None or shape is None:
        mode = "as_written"
        if attention == "auto":
            attention = "sdpa"
        resolved = dataclasses.replace(method, **chosen)
        probes: dict[str, str | None] = {}
    else:
        budget = method.memory_budget_gib
        mode = "memory_budget" if budget is not None else "fast"
        rows = method.batch_size * method.grad_accum
        if not fsdp:
            # batch_size x grad_accum is the recipe (rows per step); how they split is always ours. (FSDP
            # runs the same number of forwards on every rank: no token-budget slices, the split as written.)
            chosen.update(batch_size=rows, grad_accum=1)
        choose("avoid_host_syncs", True)
        resolved = dataclasses.replace(method, **chosen)
        probes = {}
        if attention == "auto":
            attention, probes = _fastest_packed_attention(shape, probe) if resolved.padding_free else ("sdpa", {})
        limit = min(budget, gpu_memory_gib * CARD_FRACTION) if budget is not None else gpu_memory_gib * CARD_FRACTION
        resolved, fit = _fit_memory(resolved, explicit, shape, limit, max_seq_length, attention, world, fsdp, chosen)
        chosen.update(fit)
        if "graph_tokens" not in explicit:
            graph_tokens = _graph_tokens(resolved, shape, limit, max_seq_length, attention, world, fsdp)
            resolved = dataclasses.replace(resolved, graph_tokens=graph_tokens)
            chosen["graph_tokens"] = graph_tokens
    liger = model.liger_kernel
    if "liger_kernel" not in model.explicit and mode == "fast" and not resolved.torch_compile:
        liger = liger_applies(shape)
    liger_loss = (device == "cuda" and resolved.graph_tokens is not None
                  and (liger or "liger_kernel" not in model.explicit) and triton_cross_entropy_available())
    if not resolved.padding_free and attention in ("varlen", "flash_attention_2", "flex_attention") \
            and "attention" not in explicit:
        attention = "sdpa"
    resolved = dataclasses.replace(resolved, attention=attention)
    described = {
        "mode": mode,
        "device": device,
        "rows_per_step": method.batch_size * method.grad_accum * world,
        "rows_per_forward_batch": resolved.batch_size,
        "grad_accum": resolved.grad_accum,
        "micro_batch_tokens": resolved.micro_batch_tokens,
        "padding_free": resolved.padding_free,
        "attention": attention,
        "gradient_checkpointing": resolved.gradient_checkpointing,
        "loss_chunk_tokens": resolved.loss_chunk_tokens,
        "torch_compile": resolved.torch_compile,
        "pad_tokens_to_multiple_of": resolved.pad_tokens_to_multiple_of,
        "dequantized_base": resolved.dequantized_base if method.kind == "qlora" else None,
        "avoid_host_syncs": resolved.avoid_host_syncs,
        "liger_kernel": liger,
        "liger_cross_entropy": liger_loss,
        "graph_tokens": resolved.graph_tokens,
        "cuda_graphs": bool(resolved.graph_tokens and resolved.cuda_graphs and device == "cuda"),
        "galore_accumulate": resolved.galore.accumulate if method.kind == "galore" else None,
        "memory_budget_gib": method.memory_budget_gib,
        "gpu_memory_gib": gpu_memory_gib,
        "chosen": sorted(k for k in chosen if k != "galore"),
        "kept_as_written": sorted(k for k in explicit if k in (*EXECUTION_KEYS, "memory_budget_gib", "galore.accumulate")
                                  and k not in chosen),
    }
    if shape is not None and device == "cuda":
        described["estimated_peak_gib"] = round(estimate_peak_gib(
            resolved, shape, tokens=_forward_tokens(resolved, max_seq_length), attention=attention), 3)
    if probes:
        described["attention_probe"] = probes
    return Execution(method=resolved, attention=attention, described=described, liger=liger, liger_loss=liger_loss)


def liger_applies(shape: dict[str, Any] | None) -> bool:
    """Whether liger-kernel's fused Gemma 3 modules (RMSNorm, GeGLU, RoPE) can serve this model here:
    a Gemma 3 text model and liger-kernel installed. (The fast execution turns them on: +22% / +31%
    steady tokens/s for QLoRA / GaLore on one H100, for a first step that compiles their Triton kernels.)"""
    import importlib.util

    return bool(shape) and shape.get("model_type") == "gemma3_text" \
        and importlib.util.find_spec("liger_kernel") is not None


def _attention_setting(method: MethodConfig, model: ModelConfig, explicit: set[str]) -> str:
    if "attention" in explicit or method.attention != "auto":
        return method.attention
    if "attn_implementation" in model.explicit:
        return model.attn_implementation
    return "auto"


def _fastest_packed_attention(shape: dict[str, Any], probe: bool) -> tuple[str, dict[str, str | None]]:
    """The first kernel of CUDA_PACKED_ATTENTION that runs exactly here (SDPA when not probing), and
    each tried kernel's result (None = passed)."""
    if not probe:
        return "sdpa", {}
    import torch

    from peftlab.train.packing import load_name, probe_attention

    results: dict[str, str | None] = {}
    heads, kv = shape.get("num_attention_heads", 1), shape.get("num_key_value_heads", 1)
    head_dim = shape.get("head_dim") or shape.get("hidden_size", 64) // max(heads, 1)
    for name in CUDA_PACKED_ATTENTION:
        if name == "sdpa":
            break
        results[name] = probe_attention(load_name(name), heads=heads, kv_heads=kv, head_dim=head_dim,
                                        window=shape.get("sliding_window"), device="cuda", dtype=torch.bfloat16)
        if results[name] is None:
            return name, results
    return "sdpa", results


def _graph_tokens(method: MethodConfig, shape: dict[str, Any], limit_gib: float, max_seq_length: int,
                  attention: str, world: int, fsdp: bool) -> int | None:
    """Bin size of the CUDA-graph execution (`peftlab.train.graphs`), or None where it does not apply:
    several processes, padded batches, activation checkpointing, compiled layers, or a GaLore whose
    hooks own the gradients; GRAPH_TOKENS, or fewer where memory needs it (never below one row)."""
    galore = method.galore
    if (world > 1 or fsdp or not method.padding_free or method.gradient_checkpointing or method.torch_compile
            or attention == "flex_attention"
            or (method.kind == "galore" and (galore.accumulate == "projected" or galore.variant == "layerwise"))):
        return None
    tokens = _largest_fitting_tokens(method, shape, limit_gib, attention, max(GRAPH_TOKENS, max_seq_length))
    if tokens < max_seq_length:
        return None
    return max(max_seq_length, min(GRAPH_TOKENS, tokens // TOKEN_GRANULE * TOKEN_GRANULE))


def _forward_tokens(method: MethodConfig, max_seq_length: int) -> int:
    if method.graph_tokens:
        return method.graph_tokens
    whole = method.batch_size * max_seq_length
    return min(whole, method.micro_batch_tokens) if method.micro_batch_tokens else whole


def _fit_memory(method: MethodConfig, explicit: set[str], shape: dict[str, Any], limit_gib: float,
                max_seq_length: int, attention: str, world: int, fsdp: bool,
                chosen: dict[str, Any]) -> tuple[MethodConfig, dict[str, Any]]:
    """Give up levers in order of their speed cost until one full-length row fits `limit_gib`, then
    let each forward carry as many tokens as fit."""
    fit: dict[str, Any] = {}

    def set_(key: str, value: Any) -> None:
        nonlocal method
        if key not in explicit:
            method = dataclasses.replace(method, **{key: value})
            fit[key] = value

    set_("gradient_checkpointing", False)
    set_("loss_chunk_tokens", FAST_LOSS_CHUNK)
    if method.kind == "qlora":
        set_("dequantized_base", True)

    def fits(m: MethodConfig) -> bool:
        return estimate_peak_gib(m, shape, tokens=max_seq_length, attention=attention) <= limit_gib

    steps = [("loss_chunk_tokens", chunk) for chunk in LOSS_CHUNKS[1:2]]
    if method.kind == "qlora":
        steps.append(("dequantized_base", False))
    steps.append(("gradient_checkpointing", True))
    steps.append(("loss_chunk_tokens", LOSS_CHUNKS[-1]))
    for key, value in steps:
        if fits(method):
            break
        set_(key, value)
    galore = method.galore
    if (not fits(method) and method.kind == "galore" and world == 1 and not fsdp
            and "galore.accumulate" not in explicit
            and galore.variant in ("adamw", "adamw8bit") and galore.proj_type == "std"):
        method = dataclasses.replace(method, galore=dataclasses.replace(galore, accumulate="projected"))
        fit["galore"] = {"accumulate": "projected"}
    if "micro_batch_tokens" not in explicit and not fsdp:
        whole = method.batch_size * max_seq_length
        tokens = _largest_fitting_tokens(method, shape, limit_gib, attention, whole)
        budget = None if tokens >= whole else max(max_seq_length, tokens // TOKEN_GRANULE * TOKEN_GRANULE)
        method = dataclasses.replace(method, micro_batch_tokens=budget)
        fit["micro_batch_tokens"] = budget
    return method, fit


def _largest_fitting_tokens(method: MethodConfig, shape: dict[str, Any], limit_gib: float, attention: str,
                            whole: int) -> int:
    low, high = 0, whole
    while low < high:
        middle = (low + high + 1) // 2
        if estimate_peak_gib(method, shape, tokens=middle, attention=attention) <= limit_gib:
            low = middle
        else:
            high = middle - 1
    return low


def estimate_peak_gib(method: MethodConfig, shape: dict[str, Any], *, tokens: int, attention: str = "sdpa") -> float:
    """Estimated peak GPU memory (GiB) of a bf16 step whose forwards carry `tokens` tokens.

    Weights: bf16 (2 bytes per parameter), NF4 for QLoRA's layer weights (0.53 bytes) plus the bf16
    copies when `dequantized_base`. Gradients and optimizer states: bf16 gradients of trained weights
    (none when GaLore sums them projected), Adam states of 4 bytes per trained parameter (GaLore: of the
    untargeted parameters, plus rank-r states), adapters at 16 bytes per parameter. Activations per
    token and layer: what a Gemma-style layer saves for backward (12 hidden-sized, 4 MLP-sized and 6
    head-sized bf16 tensors, 4 fp32 norm copies; LoRA dropout adds 6 hidden + 1 MLP), all layers without
    checkpointing, else one layer's plus each layer's input; x 1.25 for allocator slack. The loss: one
    chunk's fp32 logits and their gradient (10 bytes per token and vocabulary entry). SDPA/eager with
    padding-free batches: the two bool block masks (tokens^2 each). Plus 1 GiB (CUDA context, workspaces).
    """
    layers = shape["num_hidden_layers"]
    hidden = shape["hidden_size"]
    inner = shape["intermediate_size"]
    heads = shape["num_attention_heads"]
    kv = shape.get("num_key_value_heads", heads)
    head_dim = shape.get("head_dim") or hidden // heads
    vocab = shape["vocab_size"]
    per_layer = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2 + 3 * hidden * inner
    layer_params = layers * per_layer
    embed = vocab * hidden
    kind = method.kind
    lora_params = layers * method.lora.r * (4 * hidden + heads * head_dim * 2 + kv * head_dim * 2
                                            + 3 * (hidden + inner))
    if kind == "qlora":
        weights = 0.53 * layer_params + 2 * embed + (2 * layer_params if method.dequantized_base else 0)
        states = 16 * lora_params
    elif kind == "lora":
        weights = 2 * (layer_params + embed)
        states = 16 * lora_params
    elif kind == "galore":
        weights = 2 * (layer_params + embed)
        projected = method.galore.accumulate == "projected"
        rank = method.galore.rank
        low_rank_states = 8 * layers * rank * (hidden * 4 + inner * 3)
        states = (0 if projected else 2 * (layer_params + embed)) + 4 * embed + low_rank_states
    else:
        weights = 2 * (layer_params + embed)
        states = 2 * (layer_params + embed) + 4 * (layer_params + embed)
    saved = 2 * (12 * hidden + 4 * inner + 6 * heads * head_dim) + 16 * hidden
    if kind in ("qlora", "lora") and method.lora.dropout > 0:
        saved += 2 * (6 * hidden + inner)
    if method.gradient_checkpointing:
        activations = tokens * (saved + layers * 2 * hidden)
    else:
        activations = tokens * saved * layers
    loss = method.loss_chunk_tokens * vocab * 10
    masks = 2 * tokens * tokens if method.padding_free and attention in ("sdpa", "eager") else 0
    total = weights + states + 1.25 * activations + loss + masks + GIB
    return total / GIB
