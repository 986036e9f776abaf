"""Greedy decoding with a static KV cache, each step replayed as one CUDA graph.

The evaluator's fast path. Per batch: one eager prefill through the model's own forward (its own
masks from the 2D padding mask), then every decoding step runs the same forward on fixed-shape
buffers: the next token, its position, the two 4D boolean masks (full and sliding-window) built on
the device from the padding mask, and a KV cache preallocated for prompt + `max_new_tokens`. On a
GPU that step is captured once as a CUDA graph and replayed, so a step costs one launch instead of
~1,000 (the host, not the GPU, bounds eager decoding of a 1B model). On a CPU, or when capture
fails, the same step runs eagerly.

Why by hand: `generate(cache_implementation="static")` reaches CUDA graphs only through
`torch.compile` (83 s before the first token on the H200, measured), and its sliding-window cache
layers keep a host-side length, which a captured graph would freeze. Here every layer is a full
`StaticLayer` (device-side length) and the sliding window lives in the mask, with the same rule as
transformers' masks: key index j is visible from query index i iff it is not padding, j <= i and,
for sliding layers, j > i - window. The step's attention runs SDPA on the key/value heads with the
query heads packed beside them (`decode_attention`): transformers 5.17's SDPA path (the H200's)
repeats the whole cache once per query head for a 4D mask.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from peftlab.errors import UserError
from peftlab.evaluate.generate import BatchDecoder, stop_token_ids

log = logging.getLogger(__name__)
DECODE_ATTENTION = "peftlab_decode_sdpa"  # registered with transformers' AttentionInterface below

STOP_CHECK_EVERY = 16  # decoding steps between host checks of "every row has stopped" (each check is a sync)

# Architectures (`model_type`) whose forward this decoder has been checked against `generate`, token for
# token (tests/evaluate/test_static_decode.py); the evaluator decodes any other with `generate`.
STATIC_ARCHITECTURES = ("gemma3_text", "llama", "mistral", "qwen2", "qwen3", "phi3")


def unsupported_reason(models) -> str | None:
    """Why the static decoder cannot run these models (then the evaluator uses `generate`), or None."""
    for model in models:
        model_type = getattr(_text_config(model), "model_type", None) or type(model).__name__
        if model_type not in STATIC_ARCHITECTURES:
            return (f"static decoder not checked for {model_type} (only {', '.join(STATIC_ARCHITECTURES)}):"
                    " decoded with generate")
    try:
        _sliding_window([_Member(m, 1.0, "") for m in models])
    except UserError as error:
        return str(error).removeprefix("evaluate.decoder static: ")
    return None


@dataclass
class DecodeStats:
    """What the decoder did, for the evaluation's speed record and the bench."""

    batches: int = 0
    steps: int = 0
    graph_steps: int = 0
    capture_seconds: float = 0.0
    prefill_seconds: float = 0.0
    fallback: list[str] = field(default_factory=list)
    compiled_layers: int = 0
    capture_out_of_memory: int = 0  # batches decoded eagerly because their capture ran out of memory
    out_of_memory_step_downs: int = 0  # the evaluator's retries with fewer batches or rows (generate.py)

    def as_dict(self) -> dict[str, Any]:
        out = {"batches": self.batches, "decode_steps": self.steps, "graph_steps": self.graph_steps,
               "capture_seconds": self.capture_seconds, "prefill_seconds": self.prefill_seconds,
               "cuda_graph_fallback": self.fallback[:3], "capture_out_of_memory": self.capture_out_of_memory,
               "out_of_memory_step_downs": self.out_of_memory_step_downs}
        if self.compiled_layers:
            from peftlab.models.kernels import compile_stats

            out["compiled_layers"] = self.compiled_layers
            out["compile"] = compile_stats()
        return out


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """SDPA for one query token per row with grouped key/value heads: the query heads of each key/value
    head become that head's query rows, so the cache is read once, not copied per query head.
    Anything else goes to transformers' own SDPA function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if length != 1 or kv_heads == heads or kwargs.get("softcap") is not None or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    packed = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # head h uses kv head h // (heads / kv_heads)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _decode_attention_for(members: list[_Member]) -> Iterator[None]:
    """Route these SDPA models' attention through `decode_attention` while a decoding step runs (or is captured)."""
    from transformers.modeling_utils import AttentionInterface

    configs = [c for c in (_text_config(m.model) for m in members) if c._attn_implementation == "sdpa"]
    AttentionInterface.register(DECODE_ATTENTION, decode_attention)
    for config in configs:
        config._attn_implementation = DECODE_ATTENTION
    try:
        yield
    finally:
        for config in configs:
            config._attn_implementation = "sdpa"


@dataclass
class _Member:
    """A model the decoder runs, its weight in the log-probability mix, and its forward's cache keyword."""

    model: Any
    weight: float
    keyword: str


def _text_config(model):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _cache_keyword(model) -> str:
    """transformers 5.2x renamed the forward's `past_key_values` to `cache` (the old name warns)."""
    import inspect

    from peftlab.models import base_model

    return "cache" if "cache" in inspect.signature(type(base_model(model)).forward).parameters else "past_key_values"


def _static_cache(layers: int):
    from transformers.cache_utils import Cache, StaticLayer

    return lambda length: Cache(layers=[StaticLayer(max_cache_len=length) for _ in range(layers)])


class _StepBuffers:
    """Fixed-address inputs and outputs of one decoding step for a batch."""

    def __init__(self, mask: torch.Tensor, first: torch.Tensor, positions: torch.Tensor, prompt_width: int,
                 max_new_tokens: int, window: int | None, stops: torch.Tensor):
        rows, length = mask.shape[0], prompt_width + max_new_tokens
        device = mask.device
        self.valid = torch.zeros(rows, length, dtype=torch.bool, device=device)
        self.valid[:, :prompt_width] = mask.bool()
        self.key_index = torch.arange(length, device=device)
        self.query_index = torch.full((1,), prompt_width, dtype=torch.long, device=device)
        self.ids = first[:, None].clone()
        self.positions = positions[:, None].clone()
        self.out = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device)
        self.out[:, 0] = first
        self.step = torch.ones(1, dtype=torch.long, device=device)
        self.finished = torch.isin(first, stops)
        self.stops = stops
        self.window = window
        self.full_mask = torch.zeros(rows, 1, 1, length, dtype=torch.bool, device=device)
        self.sliding_mask = self.full_mask.clone() if window is not None else None

    def masks(self) -> dict[str, torch.Tensor] | torch.Tensor:
        if self.sliding_mask is None:
            return self.full_mask
        return {"full_attention": self.full_mask, "sliding_attention": self.sliding_mask}


def _next_token(logits: list[torch.Tensor], members: list[_Member], mix: bool) -> torch.Tensor:
    """Greedy: the argmax of one model's logits, or (`mix`) of the members' weighted log-probabilities
    (`evaluate/ensemble.py`'s rule, summed in the same order)."""
    if not mix:
        return logits[0][:, -1, :].argmax(dim=-1)
    mixed = None
    for member, member_logits in zip(members, logits, strict=True):
        logp = member.weight * torch.log_softmax(member_logits[:, -1, :].float(), dim=-1)
        mixed = logp if mixed is None else mixed + logp
    return mixed.argmax(dim=-1)


def _decode_step(members: list[_Member], caches: list[dict[str, Any]], buffers: _StepBuffers, mix: bool) -> None:
    """One greedy step, in place on `buffers`: nothing here may sync with the host (it is captured)."""
    b = buffers
    b.valid.index_fill_(1, b.query_index, True)
    visible = b.valid & (b.key_index <= b.query_index)
    b.full_mask.copy_(visible[:, None, None, :])
    if b.sliding_mask is not None:
        b.sliding_mask.copy_((visible & (b.key_index > b.query_index - b.window))[:, None, None, :])
    logits = [member.model(input_ids=b.ids, position_ids=b.positions, attention_mask=b.masks(), use_cache=True,
                           logits_to_keep=1, **cache).logits for member, cache in zip(members, caches, strict=True)]
    token = _next_token(logits, members, mix)
    b.out.index_copy_(1, b.step, token[:, None])
    b.finished |= torch.isin(token, b.stops)
    b.ids.copy_(token[:, None])
    b.positions.add_(1)
    b.query_index.add_(1)
    b.step.add_(1)


def _capture(members: list[_Member], caches: list[dict[str, Any]], buffers: _StepBuffers, mix: bool,
             stream) -> torch.cuda.CUDAGraph:
    """Captured on the batch's own stream (which also replays it): graphs replayed concurrently must
    not share a capture stream's library workspaces (cuBLAS)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        _decode_step(members, caches, buffers, mix)
    return graph


@dataclass
class _Batch:
    """One batch in flight: its cache, step buffers, graph (once captured), replay stream and steps done."""

    caches: list[dict[str, Any]]
    buffers: _StepBuffers
    graph: Any = None
    stream: Any = None
    done: int = 1
    eager: bool = False  # its capture ran out of memory


def static_greedy(model, tokenizer, max_new_tokens: int, *, cuda_graph: bool = True, concurrent: int = 1,
                  torch_compile: bool = False, stats: DecodeStats | None = None,
                  prefill_chunk_tokens: int | None = None) -> BatchDecoder:
    """A batch decoder for `generate_all` (same contract as `hf_greedy`: ids, left-padding mask ->
    `max_new_tokens` new ids per row; anything after a row's stop token is not meaningful).

    Its `decode_many` decodes up to `concurrent` batches in lockstep, each replaying its own graph on
    its own CUDA stream, so one batch's small kernels can overlap another's.

    `torch_compile` compiles each decoder layer in place first (fused kernels, then captured in the
    graphs; each batch's first, eager step compiles what its shapes need, outside the capture).

    `prefill_chunk_tokens` runs each prefill in slices of the prompt of about that many padded tokens
    (rows x slice), so its activations stay small; None: the whole prompt in one forward."""
    return _decoder([_Member(model, 1.0, _cache_keyword(model))], tokenizer, max_new_tokens, mix=False,
                    cuda_graph=cuda_graph, concurrent=concurrent, torch_compile=torch_compile, stats=stats,
                    prefill_chunk_tokens=prefill_chunk_tokens)


def static_mixed_greedy(models, weights, tokenizer, max_new_tokens: int, *, cuda_graph: bool = True,
                        concurrent: int = 1, torch_compile: bool = False,
                        stats: DecodeStats | None = None, prefill_chunk_tokens: int | None = None) -> BatchDecoder:
    """The ensemble's decoder (`evaluate/ensemble.py`'s `mixed_greedy`: argmax of the weighted sum of
    the models' log-probabilities; models with weight 0 are not run) on static caches and CUDA graphs:
    one graph per step runs every member."""
    members = [_Member(m, w, _cache_keyword(m)) for m, w in zip(models, weights, strict=True) if w != 0]
    if not members:
        raise ValueError("at least one ensemble weight must be non-zero")
    return _decoder(members, tokenizer, max_new_tokens, mix=True, cuda_graph=cuda_graph, concurrent=concurrent,
                    torch_compile=torch_compile, stats=stats, prefill_chunk_tokens=prefill_chunk_tokens)


def _sliding_window(members: list[_Member]) -> int | None:
    """The window every member's sliding layers use (the step's masks are shared); None without one."""
    windows = set()
    for member in members:
        text_config = _text_config(member.model)
        layer_types = getattr(text_config, "layer_types", None) or []
        if getattr(text_config, "sliding_window", None) and not layer_types:
            raise UserError(f"evaluate.decoder static: {type(member.model).__name__} has a sliding window but no"
                            " layer_types; use evaluate.decoder: generate")
        windows.add(text_config.sliding_window if "sliding_attention" in layer_types else None)
    if len(windows) > 1:
        raise UserError(f"evaluate.decoder static: the ensemble's models use different sliding windows {windows};"
                        " use evaluate.decoder: generate")
    return windows.pop()


def _decoder(members: list[_Member], tokenizer, max_new_tokens: int, *, mix: bool, cuda_graph: bool,
             concurrent: int, torch_compile: bool, stats: DecodeStats | None,
             prefill_chunk_tokens: int | None = None) -> BatchDecoder:
    window = _sliding_window(members)
    new_caches = [_static_cache(_text_config(m.model).num_hidden_layers) for m in members]
    stop_ids = stop_token_ids(tokenizer)
    stats = stats if stats is not None else DecodeStats()
    if torch_compile:
        from peftlab.models.kernels import compile_decoder_layers

        stats.compiled_layers = sum(compile_decoder_layers(m.model) for m in members)

    def prefill(ids: torch.Tensor, mask: torch.Tensor) -> _Batch:
        started = time.perf_counter()
        width = ids.shape[1]
        caches = [{m.keyword: new(width + max_new_tokens)} for m, new in zip(members, new_caches, strict=True)]
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # as `generate` numbers left-padded rows
        # Chunked along the prompt: each forward holds the activations of at most ~prefill_chunk_tokens
        # tokens; later chunks attend to the cache the earlier ones wrote.
        step = width if not prefill_chunk_tokens else max(1, prefill_chunk_tokens // ids.shape[0])
        for start in range(0, width, step):
            end = min(width, start + step)
            logits = [m.model(input_ids=ids[:, start:end], attention_mask=mask[:, :end],
                              position_ids=positions[:, start:end], use_cache=True, logits_to_keep=1, **cache).logits
                      for m, cache in zip(members, caches, strict=True)]
        first = _next_token(logits, members, mix)
        stops = torch.tensor(stop_ids, dtype=torch.long, device=ids.device)
        buffers = _StepBuffers(mask, first, positions[:, -1] + 1, width, max_new_tokens, window, stops)
        stats.batches += 1
        stats.prefill_seconds += time.perf_counter() - started
        return _Batch(caches, buffers)

    def step(batch: _Batch) -> None:
        # A graph pays off from two replays on: the warm-up step is real, the capture runs nothing.
        worth_capturing = max_new_tokens - (batch.done + 1) >= 2
        if batch.graph is not None:
            with torch.cuda.stream(batch.stream):
                batch.graph.replay()
            stats.graph_steps += 1
        elif cuda_graph and worth_capturing and batch.buffers.ids.is_cuda and not stats.fallback and not batch.eager:
            # The warm-up before a capture runs on a side stream (torch.cuda.graph's rule) and is a real step.
            batch.stream = torch.cuda.Stream()
            batch.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(batch.stream), _decode_attention_for(members):
                _decode_step(members, batch.caches, batch.buffers, mix)
            torch.cuda.current_stream().wait_stream(batch.stream)
            with _decode_attention_for(members):
                batch.graph = _try_capture(members, batch.caches, batch.buffers, mix, batch.stream, stats)
            batch.eager = batch.graph is None
            batch.stream.wait_stream(torch.cuda.current_stream())
        else:
            with _decode_attention_for(members):
                _decode_step(members, batch.caches, batch.buffers, mix)
        batch.done += 1

    @torch.inference_mode()
    def decode_many(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        batches = [prefill(ids, mask) for ids, mask in pairs]
        active = [b for b in batches if b.done < max_new_tokens]
        while active:
            for batch in active:
                step(batch)
            if active[0].done % STOP_CHECK_EVERY == 0:
                _join(active)
                active = [b for b in active if not bool(b.buffers.finished.all())]
            active = [b for b in active if b.done < max_new_tokens]
        _join(batches)
        outputs = [b.buffers.out[:, :b.done].clone() for b in batches]
        stats.steps += sum(b.done - 1 for b in batches)
        return outputs

    def decode(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return decode_many([(ids, mask)])[0]

    decode.kind = "static"  # type: ignore[attr-defined]
    decode.stats = stats  # type: ignore[attr-defined]
    decode.decode_many = decode_many  # type: ignore[attr-defined]
    decode.concurrent = max(1, concurrent)  # type: ignore[attr-defined]
    return decode


def _join(batches: list[_Batch]) -> None:
    """Make the current stream wait for every batch's replay stream (before reading their buffers)."""
    for batch in batches:
        if batch.stream is not None:
            torch.cuda.current_stream().wait_stream(batch.stream)


def _try_capture(members: list[_Member], caches: list[dict[str, Any]], buffers: _StepBuffers, mix: bool, stream,
                 stats: DecodeStats):
    """Capture after the warm-up step; on failure decode eagerly from then on (and for later batches),
    saying so at once: eager decoding is ~10x slower."""
    started = time.perf_counter()
    current = torch.cuda.current_stream()
    try:
        torch.cuda.synchronize()
        graph = _capture(members, caches, buffers, mix, stream)
    except Exception as exc:  # capture is an optimisation: any failure falls back to the eager step
        torch.cuda.set_stream(current)  # a failed capture can leave torch.cuda.graph's stream current
        torch.cuda.synchronize()
        if isinstance(exc, torch.cuda.OutOfMemoryError) or isinstance(exc.__context__, torch.cuda.OutOfMemoryError):
            # A capture allocates from a pool of its own; the eager step that just ran fit, so only this
            # batch decodes eagerly (slower) and later batches still try to capture.
            stats.capture_out_of_memory += 1
            log.warning("out of GPU memory capturing a decoding step: this batch decodes eagerly (slower; lower"
                        " evaluate.max_batch_tokens or evaluate.concurrent_batches to avoid it)")
            return None
        stats.fallback.append(f"{type(exc).__name__}: {str(exc)[:200]}")
        log.warning("CUDA graph capture failed, decoding eagerly from here (much slower): %s", stats.fallback[-1])
        return None
    stats.capture_seconds += time.perf_counter() - started
    return graph
