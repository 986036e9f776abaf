"""Compiling a run's Triton kernels (liger-kernel's Gemma 3 modules, the bins' cross-entropy) in a
background thread while the model loads, instead of inside the first training step.

Triton compiles a kernel the first time it runs with a new specialisation (dtypes, constant sizes,
16-divisibility of sizes and pointers) and keeps it in its on-disk cache. On a machine whose cache is
empty, that happened inside the first eager bin: the first step of QLoRA `default` took 4.80 s, 3.24 s
more than with a warm cache (`benchmarks/results/h100-2026-12-06-before-warmup.json` vs
`-liger-ce-warm-cache.json`).
`KernelWarmup` runs the same modules on a copy of the model with one layer and a small vocabulary
(the same widths, head counts and dtype: the same specialisations), at every bin size, one thread per
kernel family, each on its own CUDA stream, and the cross-entropy kernel on one chunk of
full-vocabulary logits, while the main thread loads the data and the weights. Measured: QLoRA's first
step 1.33 s, nothing compiled in the loop (`benchmarks/results/h100-2026-12-06.json`). The Trainer waits
for it before its first step (`wait`), inside the timed loop, so a warm-up that is not done yet still
counts as training time. A failure is recorded, never raised: the kernels then compile in the first
step as before.

Written here because neither liger-kernel nor Triton offers ahead-of-time compilation of a model's
kernels for given shapes.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from peftlab.errors import one_line
from peftlab.models.kernels import release_side_stream_workspaces

# Tokens of the warm-up forward when the sizes to come are not known (no bins).
WARMUP_TOKENS = 64
WARMUP_VOCABULARY = 512


def warmup_config(shape: dict[str, Any]) -> dict[str, Any]:
    """The model's text config with one layer and a small vocabulary (about 30M parameters for Gemma 3 1B)."""
    small = {**shape, "num_hidden_layers": 1, "vocab_size": WARMUP_VOCABULARY}
    if isinstance(shape.get("layer_types"), list):
        small["layer_types"] = shape["layer_types"][: small["num_hidden_layers"]]
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = small.get(key)
        if isinstance(value, int) and value >= WARMUP_VOCABULARY:
            small[key] = 0
        elif isinstance(value, list):
            small[key] = [v if v < WARMUP_VOCABULARY else 0 for v in value]
    return small


class KernelWarmup:
    """Runs `shape`'s liger-kernel modules (`modules`) and the bins' Triton cross-entropy (`loss`) once,
    forward and backward, in background threads (see the module docstring).

    `tokens`: the token counts of the forwards to come (the bin sizes): Triton specialises some
    backward kernels on row counts (their 16-divisibility), so each size runs once. `trains_base`: the model's own weights train (GaLore, full) or are frozen
    (LoRA, QLoRA: the RMSNorm backward then skips its weight gradient, another specialisation).
    `autocast_bf16`: as the binned step runs its decoder."""

    def __init__(self, shape: dict[str, Any], dtype: torch.dtype, *, modules: bool, loss: bool,
                 autocast_bf16: bool, tokens: list[int] | None = None, trains_base: bool = True,
                 device: str = "cuda") -> None:
        self.shape = shape
        self.dtype = dtype
        self.modules = modules
        self.loss = loss
        self.autocast_bf16 = autocast_bf16
        self.tokens = sorted(set(tokens or [WARMUP_TOKENS]))
        self.trains_base = trains_base
        if device == "cuda" and torch.cuda.is_available():
            device = f"cuda:{torch.cuda.current_device()}"
        self.device = device  # this process's GPU ("cuda:N"); "cpu" only in tests: the work without Triton
        self.seconds: float | None = None
        self.waited_s: float | None = None
        self.failure: str | None = None
        self.cache_files_after: int | None = None  # Triton's cache when the loop starts
        self.compiled_in_loop: int | None = None  # cache files the loop added: kernels the warm-up missed
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._model_copy = None

    def start(self) -> KernelWarmup:
        """Build the small model here, on the calling thread (transformers sets the process's default
        dtype while it builds one, which a thread would change under the main thread's feet), then
        compile in background threads."""
        self._started = time.perf_counter()
        self._model_copy = None
        if self.modules:
            try:
                self._model_copy = self._model()  # also liger's module-level patch, before the real model is built
            except Exception as exc:
                self.failure = one_line(exc)
        self._thread = threading.Thread(target=self._run, name="peftlab-kernel-warmup", daemon=True)
        self._thread.start()
        return self

    def wait(self) -> None:
        """Block until the warm-up is done (once; later calls return at once)."""
        if self._thread is None or self.waited_s is not None:
            return
        started = time.perf_counter()
        self._thread.join()
        release_side_stream_workspaces()
        self.waited_s = time.perf_counter() - started
        self.cache_files_after = triton_cache_files()

    def finish(self) -> None:
        """After training: how many kernels the loop still compiled (new files in Triton's cache)."""
        if self.cache_files_after is not None:
            self.compiled_in_loop = triton_cache_files() - self.cache_files_after

    def describe(self) -> dict[str, Any]:
        return {"modules": self.modules, "loss": self.loss, "tokens": self.tokens, "trains_base": self.trains_base,
                "seconds": None if self.seconds is None else round(self.seconds, 3),
                "waited_s": None if self.waited_s is None else round(self.waited_s, 3),
                "compiled_in_loop": self.compiled_in_loop, "failure": self.failure}

    def _run(self) -> None:
        failures: list[str] = [self.failure] if self.failure else []
        model, self._model_copy = self._model_copy, None

        def guarded(work: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                try:
                    if self.device.startswith("cuda"):
                        torch.cuda.set_device(torch.device(self.device))  # a new thread starts on GPU 0
                    stream = torch.cuda.Stream()
                    with torch.cuda.stream(stream):
                        work()
                    stream.synchronize()
                except Exception as exc:  # the kernels then compile in the first step: record why
                    failures.append(one_line(exc))
            return run

        # One thread per kernel family (a compile mostly waits on the compiler's processes), each over
        # every size; then the whole layer at each size, which finds them compiled (and compiles anything
        # the families missed).
        families: list[Callable[[], None]] = []
        if model is not None:
            try:
                families = self._families(model)
            except Exception as exc:
                failures.append(one_line(exc))
        if self.loss:
            families.append(self._run_loss)
        threads = [threading.Thread(target=guarded(work), name="peftlab-kernel-warmup", daemon=True)
                   for work in families]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if model is not None:
            for tokens in self.tokens:
                guarded(lambda tokens=tokens, model=model: self._run_modules(model, tokens))()
            # liger binds its forwards to the modules (a reference cycle): unbind, so the copy is freed now.
            for module in model.modules():
                module.__dict__.pop("forward", None)
        del model, families
        self.failure = failures[0] if failures else None
        self.seconds = time.perf_counter() - self._started

    def _model(self):
        from peftlab.models.kernels import apply_liger_kernels

        model = warmup_model(self.shape, self.dtype, self.device, torch.Generator(device=self.device).manual_seed(0))
        if self.device.startswith("cuda"):
            apply_liger_kernels(model, "cuda")
        model.requires_grad_(self.trains_base)
        return model

    def _families(self, model) -> list[Callable[[], None]]:
        """Work per liger-kernel family, each over every size: the RMSNorms of the hidden states and of
        the heads (the query and key norms, as Gemma 3's attention calls them), the GeGLU MLP, RoPE."""
        from transformers.models.gemma3 import modeling_gemma3

        layer = model.get_decoder().layers[0]
        attention = layer.self_attn
        hidden = int(self.shape["hidden_size"])
        heads, kv_heads = int(self.shape["num_attention_heads"]), int(self.shape["num_key_value_heads"])
        head_dim = int(self.shape.get("head_dim") or hidden // heads)

        def through(module: Callable[..., Any], *shapes: tuple[int, ...]) -> Callable[[int], None]:
            def run(tokens: int) -> None:
                generator = torch.Generator(device=self.device).manual_seed(tokens)
                inputs = [torch.randn([tokens if size == -1 else size for size in shape], dtype=self.dtype,
                                      device=self.device, generator=generator).requires_grad_() for shape in shapes]
                with self._precision():
                    outputs = module(*inputs)
                outputs = outputs if isinstance(outputs, tuple) else (outputs,)
                sum(out.float().square().mean() for out in outputs).backward()
            return run

        def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
            return modeling_gemma3.apply_rotary_pos_emb(q, k, cos.detach(), sin.detach())

        per_size = [
            through(layer.input_layernorm, (1, -1, hidden)),
            through(lambda q, k: (attention.q_norm(q), attention.k_norm(k)), (1, heads, -1, head_dim),
                    (1, kv_heads, -1, head_dim)),
            through(layer.mlp, (1, -1, hidden)),
            through(rope, (1, heads, -1, head_dim), (1, kv_heads, -1, head_dim), (1, -1, head_dim), (1, -1, head_dim)),
        ]
        def every_size(work: Callable[[int], None]) -> Callable[[], None]:
            def run() -> None:
                for tokens in self.tokens:
                    work(tokens)
            return run

        return [every_size(work) for work in per_size]

    def _precision(self):
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, cache_enabled=False) if self.autocast_bf16 \
            else contextlib.nullcontext()

    def _run_modules(self, model, tokens: int) -> None:
        generator = torch.Generator(device=self.device).manual_seed(tokens)
        hidden_size = int(self.shape["hidden_size"])
        embeds = torch.randn(1, tokens, hidden_size, dtype=self.dtype, device=self.device, generator=generator)
        embeds.requires_grad_()  # as the hidden states entering a LoRA model's layers after the first
        positions = torch.arange(tokens, device=self.device)[None]
        with self._precision():
            hidden = model.get_decoder()(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
        hidden.float().square().mean().backward()

    def _run_loss(self) -> None:
        from peftlab.train.batches import IGNORE
        from peftlab.train.vocab_loss import _fused_softmax_gradient_, _liger_kernel

        kernel = _liger_kernel()
        if kernel is None:
            return
        generator = torch.Generator(device=self.device).manual_seed(0)
        vocabulary = int(self.shape["vocab_size"])
        logits = torch.randn(16, vocabulary, dtype=self.dtype, device=self.device, generator=generator)
        targets = torch.randint(0, vocabulary, (16,), device=self.device, generator=generator)
        targets[::4] = IGNORE
        _fused_softmax_gradient_(kernel, logits, targets, self.shape.get("final_logit_softcapping"))


def warmup_model(shape: dict[str, Any], dtype: torch.dtype, device: str, generator: torch.Generator):
    """`warmup_config(shape)`'s causal LM on `device`, its weights drawn from `generator`: built on the
    meta device first, so that neither the global CPU generator nor the device's default one moves
    (the main thread is seeding and initialising the real model meanwhile)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**warmup_config(shape))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.to_empty(device=device)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.uniform_(0.0, 0.02, generator=generator)
    return model


def triton_cache_files() -> int:
    """Files in Triton's kernel cache (TRITON_CACHE_DIR, else $TRITON_HOME or ~, /.triton/cache): 0 on a
    fresh machine."""
    home = os.environ.get("TRITON_HOME") or Path.home()
    root = Path(os.environ.get("TRITON_CACHE_DIR") or Path(home) / ".triton" / "cache")
    return sum(1 for path in root.rglob("*") if path.is_file()) if root.is_dir() else 0

