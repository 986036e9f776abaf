"""Padding-free batches: each micro-batch's rows as one concatenated sequence, attention kept inside rows.

`PackedCollator` concatenates a batch's rows into one row of shape [1, total tokens] with
transformers' `DataCollatorWithFlattening` (position ids restart at 0 for every row, and each row's
first label is -100), plus host-side metadata: `row_lengths` (Python ints) and `cu_seq_lens`
(cumulative row starts, int32). The target-token loss shifts labels by one over the flat sequence:
the label after a row's last token is the next row's first, which is -100, so no target crosses a
row boundary and the target count equals the padded batch's.

Attention never reads the position ids to find rows (transformers' inference from `position_ids`
costs a device-to-host sync and graph breaks): `attention_inputs` builds explicit per-batch metadata
for the loaded kernel, causal and, on sliding layers, inside the window within the row:
- `sdpa` / `eager`: a block-diagonal causal mask per layer type (bool / additive);
- `flex_attention`: a FlexAttention `BlockMask` (document + causal + window), empty blocks skipped;
- `flash_attention_2/3` and `peftlab_varlen` (torch's `varlen_attn`, registered here):
  `cu_seq_lens_q/k` and `max_length_q/k`, no mask.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from peftlab.train.batches import IGNORE

VARLEN = "peftlab_varlen"  # the attention name our torch.nn.attention.varlen kernel is registered under
FLASH = ("flash_attention_2", "flash_attention_3")
PACKED_KEYS = ("input_ids", "labels", "position_ids")


class PackedCollator:
    """Concatenates a batch's rows into one padding-free row (see the module docstring)."""

    def __init__(self) -> None:
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE)

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        rows = [row for row in batch if row["input_ids"]]
        flat = self.flatten(rows, return_tensors="pt")
        lengths = [len(row["input_ids"]) for row in rows]
        return {"input_ids": flat["input_ids"].long(), "labels": flat["labels"].long(),
                "position_ids": flat["position_ids"].long(), **row_metadata(lengths)}


def row_metadata(lengths: list[int]) -> dict[str, Any]:
    """`row_lengths` (host ints: slicing and token counts without a sync), `cu_seq_lens` (int32, moved
    to the device with the batch) and `max_length`."""
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + length)
    return {"row_lengths": list(lengths), "cu_seq_lens": torch.tensor(starts, dtype=torch.int32),
            "max_length": max(lengths)}


def is_packed(inputs: dict[str, Any]) -> bool:
    return "row_lengths" in inputs


def packed_slices(row_lengths: list[int], budget: int | None) -> list[tuple[int, int]]:
    """Consecutive rows grouped into forwards of at most `budget` tokens (a longer row alone):
    (first row, end row) per forward; one slice = no split needed."""
    if budget is None or sum(row_lengths) <= budget:
        return [(0, len(row_lengths))]
    slices: list[tuple[int, int]] = []
    start, tokens = 0, 0
    for index, length in enumerate(row_lengths):
        if index > start and tokens + length > budget:
            slices.append((start, index))
            start, tokens = index, 0
        tokens += length
    slices.append((start, len(row_lengths)))
    return slices


def select_rows(inputs: dict[str, Any], start: int, end: int) -> dict[str, Any]:
    """The packed batch of rows `start:end` of `inputs` (a contiguous span of its tokens)."""
    lengths = inputs["row_lengths"]
    first = sum(lengths[:start])
    last = first + sum(lengths[start:end])
    out = {key: value for key, value in inputs.items() if key not in (*PACKED_KEYS, "row_lengths", "cu_seq_lens",
                                                                        "max_length")}
    out.update({key: inputs[key][:, first:last] for key in PACKED_KEYS})
    meta = row_metadata(lengths[start:end])
    meta["cu_seq_lens"] = meta["cu_seq_lens"].to(inputs["cu_seq_lens"].device)
    return {**out, **meta}


def pad_to_multiple(inputs: dict[str, Any], multiple: int | None, pad_id: int) -> dict[str, Any]:
    """Append a dummy row so the token count is a multiple of `multiple` (few shapes for a compiled
    step). The dummy row is its own sequence, its labels are -100: it adds no target and no count;
    `row_lengths` keeps the real rows only (token counts), `cu_seq_lens` includes the dummy."""
    total = inputs["input_ids"].shape[1]
    pad = -total % multiple if multiple else 0
    if pad == 0:
        return inputs
    device = inputs["input_ids"].device
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], torch.full((1, pad), pad_id, dtype=torch.long, device=device)], 1)
    out["labels"] = torch.cat([inputs["labels"], torch.full((1, pad), IGNORE, dtype=torch.long, device=device)], 1)
    out["position_ids"] = torch.cat([inputs["position_ids"], torch.arange(pad, device=device).unsqueeze(0)], 1)
    meta = row_metadata([*inputs["row_lengths"], pad])
    out["cu_seq_lens"] = meta["cu_seq_lens"].to(device)
    out["max_length"] = max(inputs["max_length"], pad)
    return out


def attention_inputs(config, inputs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments that make the decoder attend within rows: `attention_mask` (a mapping per
    layer type for models with sliding layers, e.g. Gemma 3) and, for varlen kernels, the row bounds."""
    implementation = config._attn_implementation
    if implementation in (*FLASH, VARLEN):
        cu = inputs["cu_seq_lens"]
        mask = {kind: None for kind in set(getattr(config, "layer_types", None) or ["full_attention"])}
        return {"attention_mask": mask if getattr(config, "layer_types", None) else None,
                "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                "max_length_q": inputs["max_length"], "max_length_k": inputs["max_length"]}
    positions = inputs["position_ids"][0]
    row = torch.cumsum((positions == 0).to(torch.int32), 0)  # rows start at position 0
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    build = functools.partial(_mask, implementation, row, dtype=_dtype(config))
    if not layer_types:
        return {"attention_mask": build(None)}
    return {"attention_mask": {kind: build(window if kind == "sliding_attention" else None)
                               for kind in set(layer_types)}}


def _dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def row_mask_function(row: torch.Tensor, window: int | None):
    """The mask predicate (query index, key index) -> attend: causal, same row, and with `window`
    fewer than `window` positions back (the token itself and window - 1 before it, as transformers'
    sliding-window mask counts it). FlexAttention evaluates it per block; SDPA/eager over the grid."""

    def keep(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        allowed = (row[q] == row[kv]) & (kv <= q)
        return allowed & (q - kv < window) if window else allowed

    return keep


def _mask(implementation: str, row: torch.Tensor, window: int | None, dtype: torch.dtype):
    keep = row_mask_function(row, window)
    tokens = row.shape[0]
    if implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(lambda batch, head, q, kv: keep(q, kv), B=None, H=None, Q_LEN=tokens, KV_LEN=tokens,
                                 device=row.device, _compile=row.device.type == "cuda")
    index = torch.arange(tokens, device=row.device)
    dense = keep(index[:, None], index[None, :])[None, None]
    if implementation == "eager":
        return torch.zeros(dense.shape, dtype=dtype, device=row.device).masked_fill(~dense, torch.finfo(dtype).min)
    return dense


# ---------------------------------------------------------------------------------------------------
# torch's variable-length flash attention as a transformers attention function


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             sliding_window=None, softcap=None, **kwargs):
    """transformers' attention-function contract over `torch.nn.attention.varlen.varlen_attn`: rows from
    `cu_seq_lens_q` / `max_length_q`, causal, and on sliding layers `sliding_window` tokens (the token
    itself and window - 1 before it, flash attention's inclusive left window)."""
    from torch.nn.attention.varlen import varlen_attn

    if softcap or dropout:
        raise NotImplementedError("peftlab_varlen attention: no logit soft-capping or attention dropout")
    q, k, v = (tensor[0].transpose(0, 1).contiguous() for tensor in (query, key, value))  # [tokens, heads, dim]
    cu, longest = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    window = (sliding_window - 1, 0) if sliding_window else (-1, 0)
    grouped = {}
    if q.shape[1] != k.shape[1]:
        if _varlen_takes_gqa():
            grouped["enable_gqa"] = True
        else:  # torch 2.11's kernel has no GQA: share each key/value head with its query group
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=window, **grouped)
    return out.unsqueeze(0), None


@functools.cache
def _varlen_takes_gqa() -> bool:
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def load_name(attention: str) -> str:
    """The attn_implementation a model is loaded with for a training `attention` setting."""
    return register_varlen_attention() if attention == "varlen" else attention


def register_varlen_attention() -> str:
    """Register `peftlab_varlen` with transformers (attention function; masks are never built for it)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, lambda *args, **kwargs: None)
    return VARLEN


def probe_attention(implementation: str, *, heads: int, kv_heads: int, head_dim: int, window: int | None,
                    device: str, dtype: torch.dtype) -> str | None:
    """Run a tiny packed forward and backward through `implementation` (two rows, GQA, a window) and
    compare it with a per-row SDPA reference; the reason it cannot serve here, or None."""
    try:
        if implementation == "flash_attention_2":
            import flash_attn  # noqa: F401
        lengths = [40, 24]
        tokens = sum(lengths)
        generator = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, h, tokens, head_dim, generator=generator).to(device, dtype).requires_grad_()
                   for h in (heads, kv_heads, kv_heads))
        inputs = {"position_ids": torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(device),
                  **row_metadata(lengths)}
        inputs["cu_seq_lens"] = inputs["cu_seq_lens"].to(device)
        config = _ProbeConfig(implementation, window, dtype)
        kwargs = attention_inputs(config, inputs)
        mask = kwargs.pop("attention_mask")
        mask = mask["sliding_attention"] if isinstance(mask, dict) else mask
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        function = varlen_attention_forward if implementation == VARLEN else ALL_ATTENTION_FUNCTIONS[implementation]
        module = _ProbeModule(heads // kv_heads)
        out, _ = function(module, q, k, v, mask, scaling=head_dim ** -0.5, sliding_window=window, **kwargs)
        out.float().square().sum().backward()
        reference = _reference_attention(q.detach().float(), k.detach().float(), v.detach().float(), lengths, window)
        error = (out.detach().float() - reference).abs().max().item()
        if not error < 0.05:
            return f"differs from per-row attention by {error:.3g}"
        return None
    except Exception as exc:  # any failure means: not this kernel here
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


class _ProbeConfig:
    def __init__(self, implementation: str, window: int | None, dtype: torch.dtype) -> None:
        self._attn_implementation = implementation
        self.sliding_window = window
        self.layer_types = ["sliding_attention"]
        self.dtype = dtype


class _ProbeModule(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True
        self.training = True


def _reference_attention(q, k, v, lengths: list[int], window: int | None) -> torch.Tensor:
    """Per-row causal (windowed) attention in fp32: [1, tokens, heads, head_dim]."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    outs, start = [], 0
    for length in lengths:
        span = slice(start, start + length)
        index = torch.arange(length, device=q.device)
        keep = index[None, :] <= index[:, None]
        if window:
            keep &= index[:, None] - index[None, :] < window
        outs.append(torch.nn.functional.scaled_dot_product_attention(q[:, :, span], k[:, :, span], v[:, :, span],
                                                                     attn_mask=keep, scale=q.shape[-1] ** -0.5))
        start += length
    return torch.cat(outs, 2).transpose(1, 2)
