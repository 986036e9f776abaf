"""Compiling a run's Triton kernels (liger-kernel's Gemma 3 modules, the bins' cross-entropy) in a
background thread while the model loads, instead of inside the first training step.

Triton compiles a kernel the first time it runs with a new specialisation (dtypes, constant sizes,
16-divisibility of sizes and pointers) and keeps it in its on-disk cache. On a machine whose cache is
empty, that happened inside the first eager bin: the first step of QLoRA `default` took 4.80 s, 3.24 s
more than with a warm cache (`benchmarks/results/h100-2026-12-06.json` vs `-liger-ce-warm-cache.json`).
`KernelWarmup` runs the same modules on a copy of the model with one layer and a small vocabulary
(one layer of the same widths, head counts and dtype: the same specialisations) and the cross-entropy kernel on
one small chunk of full-vocabulary logits, on its own CUDA stream, while the main thread reads and
places the weights. The Trainer waits for it before its first step (`wait`), inside the timed loop,
so a warm-up that is not done yet still counts as training time. A failure is recorded, never raised:
the kernels then compile in the first step as before.

Written here because neither liger-kernel nor Triton offers ahead-of-time compilation of a model's
kernels for given shapes.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

# Tokens of the warm-up forward: a multiple of 16, as every bin size is (Triton specialises on it).
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
    forward and backward, in a background thread (see the module docstring). `autocast_bf16`: as the
    binned step runs its decoder."""

    def __init__(self, shape: dict[str, Any], dtype: torch.dtype, *, modules: bool, loss: bool,
                 autocast_bf16: bool) -> None:
        self.shape = shape
        self.dtype = dtype
        self.modules = modules
        self.loss = loss
        self.autocast_bf16 = autocast_bf16
        self.seconds: float | None = None
        self.waited_s: float | None = None
        self.failure: str | None = None
        self.cache_files_after: int | None = None  # Triton's cache when the loop starts
        self.compiled_in_loop: int | None = None  # cache files the loop added: kernels the warm-up missed
        self._thread: threading.Thread | None = None

    def start(self) -> KernelWarmup:
        if self.modules:
            from peftlab.models.kernels import patch_gemma3_modules

            patch_gemma3_modules()  # here, not in the thread: the main thread is about to build the model
        self._thread = threading.Thread(target=self._run, name="peftlab-kernel-warmup", daemon=True)
        self._thread.start()
        return self

    def wait(self) -> None:
        """Block until the warm-up is done (once; later calls return at once)."""
        if self._thread is None or self.waited_s is not None:
            return
        started = time.perf_counter()
        self._thread.join()
        self.waited_s = time.perf_counter() - started
        self.cache_files_after = triton_cache_files()

    def finish(self) -> None:
        """After training: how many kernels the loop still compiled (new files in Triton's cache)."""
        if self.cache_files_after is not None:
            self.compiled_in_loop = triton_cache_files() - self.cache_files_after

    def describe(self) -> dict[str, Any]:
        return {"modules": self.modules, "loss": self.loss,
                "seconds": None if self.seconds is None else round(self.seconds, 3),
                "waited_s": None if self.waited_s is None else round(self.waited_s, 3),
                "compiled_in_loop": self.compiled_in_loop, "failure": self.failure}

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                if self.modules:
                    self._run_modules()
                if self.loss:
                    self._run_loss()
            stream.synchronize()
        except Exception as exc:  # the kernels then compile in the first step: record why
            self.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        self.seconds = time.perf_counter() - started

    def _run_modules(self) -> None:
        from peftlab.models.kernels import apply_liger_kernels

        generator = torch.Generator(device="cuda").manual_seed(0)
        model = warmup_model(self.shape, self.dtype, "cuda", generator)
        apply_liger_kernels(model, "cuda")
        ids = torch.randint(0, WARMUP_VOCABULARY, (1, WARMUP_TOKENS), device="cuda", generator=generator)
        positions = torch.arange(WARMUP_TOKENS, device="cuda")[None]
        precision = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if self.autocast_bf16 \
            else contextlib.nullcontext()
        with precision:
            hidden = model.get_decoder()(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
        hidden.float().square().mean().backward()

    def _run_loss(self) -> None:
        from peftlab.train.batches import IGNORE
        from peftlab.train.vocab_loss import _fused_softmax_gradient_, _liger_kernel

        kernel = _liger_kernel()
        if kernel is None:
            return
        generator = torch.Generator(device="cuda").manual_seed(0)
        vocabulary = int(self.shape["vocab_size"])
        logits = torch.randn(16, vocabulary, dtype=self.dtype, device="cuda", generator=generator)
        targets = torch.randint(0, vocabulary, (16,), device="cuda", generator=generator)
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
