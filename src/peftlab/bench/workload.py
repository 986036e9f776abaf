"""The bench's training workload: the spec of one run, the profiles, the workload as a study config,
and the MFU arithmetic.

Workload: a model of a given shape with random weights (default the exact Gemma-3-1B shape), the
Gemma 3 tokenizer, `rows_per_source` real rows per source (seed 42), loss on all tokens as the
reference does, an effective batch of 16 rows per optimizer step. Each run is a fresh process
(`peftlab.bench.worker`) so peak-memory counters never mix.

Every run trains with the study's recipe as `configs/seed.yaml` states it (its `train:` and
`methods.<m>:` settings: learning rates, clipping, optimizer, LoRA / GaLore / quantisation settings,
warmup, schedule, 16 rows per optimizer step); the workload sets one epoch, `max_steps`, loss on all
tokens and no checkpoints. (`lora` and `full` are not seed methods: `lora` is QLoRA's settings on a
bf16 base with AdamW; `full` is GaLore's with AdamW at lr 1e-5.) Profiles of ours:
- `default`: nothing else: `peftlab train`'s own execution choice for the device
  (`peftlab.train.execution`), at the study's max_seq_length 2048. This is what a study runs.
- `fast`: the earlier hand-set levers, padded: 16 rows per micro-batch, no activation checkpointing,
  length-grouped batches, vocabulary logits 1,024 tokens at a time, SDPA.
- `fast-liger` (GPU): `fast` plus liger-kernel's fused RMSNorm, GeGLU and RoPE.
- `fast-compile`: `fast` with every decoder layer compiled (`torch_compile`; the first steps compile).
- `lowmem`: the study's max_seq_length 2048 and effective batch 16; each 16-row batch runs as
  forwards of at most 2,048 tokens (the memory of one full-length row, several short rows at once),
  checkpointing, vocabulary logits 32 tokens at a time, no dequantized QLoRA copies; GaLore with 8-bit
  Adam states, gradients summed at rank r (`galore.accumulate: projected`) and the tied embedding
  projected too.
- `reference` (`--reference`): the study's TRL `SFTTrainer` recipe (`peftlab.bench.reference`).

MFU = tokens/s x FLOPs per token / peak bf16 FLOP/s, with FLOPs per token = 6N (full weights
train) or 4N (frozen base + adapters: forward plus activation gradients) plus attention
12 x layers x heads x head_dim x mean sequence length; N counts every parameter once (the tied
embedding as the output projection); checkpointing's recomputation is not counted.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Dense bf16 peak of the GPU the bench runs on; H100/H200 SXM spec sheet value.
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}
METHODS = ("qlora", "lora", "galore", "full")
PROFILES: dict[str, dict[str, Any]] = {
    "default": {"max_seq_length": 2048},
    "fast": {"batch_size": 16, "grad_accum": 1, "gradient_checkpointing": False, "sampling": "group_by_length",
             "loss_chunk_tokens": 1024, "padding_free": False, "attention": "sdpa", "dequantized_base": False,
             "liger_kernel": False},
    "lowmem": {"batch_size": 16, "grad_accum": 1, "micro_batch_tokens": 2048, "gradient_checkpointing": True,
               "sampling": "random", "loss_chunk_tokens": 32, "max_seq_length": 2048, "dequantized_base": False},
}
# The report's sequential hybrid: QLoRA -> merge into the bf16 base -> GaLore; the bench times each stage.
HYBRID_STAGES = ("qlora", "galore")
# A/B profiles of the default path, one lever off each: bins without graph capture, the rows as they
# come (no bins, no graphs), no liger kernels.
PROFILES["default-eager"] = {**PROFILES["default"], "cuda_graphs": False}
PROFILES["default-unbinned"] = {**PROFILES["default"], "graph_tokens": None}
PROFILES["default-noliger"] = {**PROFILES["default"], "liger_kernel": False}
# The quality check: the default path's loss curve against padded rows without fused kernels.
PROFILES["default-padded"] = {**PROFILES["default"], "padding_free": False, "liger_kernel": False}
PROFILES["fast-liger"] = {**PROFILES["fast"], "liger_kernel": True}
PROFILES["fast-compile"] = {**PROFILES["fast"], "torch_compile": True}
# Per-method changes to a profile: low-memory GaLore keeps its Adam states in 8 bits, sums its gradients at
# rank r (no full gradient set), and projects the tied embedding too, as the reference recipe does (its
# full-rank Adam states alone would be 0.56 GiB). (QLoRA's 4-bit matmuls compute in bf16 in every
# profile: the seed's `quant.compute_dtype`.)
METHOD_PROFILE = {("galore", "lowmem"): {"galore": {"variant": "adamw8bit", "accumulate": "projected",
                                                    "targets": ["attn", "mlp", "embed_tokens"]}}}
# The workload's own settings over the seed's: one epoch, loss on all tokens as the reference trains, no checkpoints.
WORKLOAD_SETTINGS = {"epochs": 1, "loss_on": "all", "save_steps": 10**6}


@functools.cache
def _seed_yaml() -> dict[str, Any]:
    from peftlab.config import BUILTIN_CONFIG_DIR

    return yaml.safe_load((BUILTIN_CONFIG_DIR / "seed.yaml").read_text(encoding="utf-8"))


def seed_method(kind: str) -> dict[str, Any]:
    """The study's settings for `kind` as configs/seed.yaml states them (`train:` merged with
    `methods.<kind>:`); `lora` and `full` are derived (see the module docstring)."""
    from peftlab.config import _merge

    raw = _seed_yaml()
    source = {"qlora": "qlora", "lora": "qlora", "galore": "galore", "full": "galore"}[kind]
    method = _merge(raw.get("train") or {}, raw["methods"][source])
    if kind == "lora":
        method = {**{k: v for k, v in method.items() if k != "quant"}, "kind": "lora", "optimizer": "adamw_torch"}
    elif kind == "full":
        method = {**{k: v for k, v in method.items() if k != "galore"}, "kind": "full", "lr": 1e-5,
                  "optimizer": "adamw_torch"}
    return method


def study_hyperparameters(kind: str) -> dict[str, Any]:
    """The seed's learning rate, clipping and optimizer for `kind` (what the reference recipe trains with)."""
    method = seed_method(kind)
    return {key: method[key] for key in ("lr", "max_grad_norm", "optimizer") if key in method}


# Rows sampled beyond `rows_per_source` so the few unusable rows (empty outputs) can be replaced.
ROW_SLACK = 10


@dataclass
class BenchSpec:
    method: str
    profile: str
    shape: str = "builtin:gemma-3-1b"
    tokenizer: str = "builtin:gemma-3-270m"
    sources: list[dict[str, str]] = field(default_factory=list)
    rows_per_source: int = 190  # the Tulu sample has 200 rows
    max_seq_length: int = 1024
    max_steps: int = -1
    work_dir: str = ""
    # Method settings over the profile's, `--set` style, e.g. ["quant.compute_dtype=bfloat16"] (A/B runs).
    overrides: list[str] = field(default_factory=list)


def default_sources(data_dir: str | None) -> list[dict[str, str]]:
    """The real samples when a folder is given, else the built-in demo data (CPU smoke runs)."""
    if not data_dir:
        return [{"name": n, "format": n, "path": f"demo:{n}:400"} for n in ("alpaca", "tulu", "ultrachat")]
    root = Path(data_dir)
    return [
        {"name": "alpaca", "format": "alpaca", "path": str(root / "alpaca" / "alpaca_4000.json")},
        {"name": "tulu", "format": "tulu", "path": str(root / "tulu-v2-sft-mixture" / "tulu_v2_200.jsonl")},
        {"name": "ultrachat", "format": "ultrachat", "path": str(root / "ultrachat_200k" / "ultrachat_800.jsonl")},
    ]


def method_settings(kind: str, spec: BenchSpec, profile: dict[str, Any]) -> dict[str, Any]:
    """One method's settings on the workload: the seed's, the workload's, the profile's levers, overrides."""
    from peftlab.config import apply_override

    method = {**seed_method(kind), **WORKLOAD_SETTINGS, "max_steps": spec.max_steps, **profile}
    for key, value in METHOD_PROFILE.get((kind, spec.profile), {}).items():
        method[key] = {**method.get(key, {}), **value}
    for item in spec.overrides:
        apply_override(method, item)
    return method


def workload_config(spec: BenchSpec):
    """The workload as a study config: one method (a hybrid: its QLoRA and GaLore stages, one epoch
    each, with a merge between), the profile's batch settings."""
    from peftlab.config import config_from_dict

    profile = dict(PROFILES.get(spec.profile, {}))
    max_len = profile.pop("max_seq_length", spec.max_seq_length)
    # A profile that names liger_kernel sets it; otherwise the execution chooses (peftlab.train.execution).
    liger = {"liger_kernel": profile.pop("liger_kernel")} if "liger_kernel" in profile else {}
    if spec.method == "hybrid":
        methods = {kind: method_settings(kind, spec, profile) for kind in HYBRID_STAGES}
        methods["hybrid"] = {"kind": "hybrid", "stages": [{"method": HYBRID_STAGES[0]}, {"method": "merge"},
                                                          {"method": HYBRID_STAGES[1]}]}
    else:
        methods = {spec.method: method_settings(spec.method, spec, profile)}
    rows = spec.rows_per_source
    raw = {
        "name": "bench",
        "data": {"seed": 42, "train_per_source": rows, "test_per_source": 0, "train_buffer": rows + ROW_SLACK,
                 "test_buffer": 0, "max_seq_length": max_len, "sources": spec.sources},
        "model": {"name_or_path": spec.tokenizer, "config": spec.shape, **liger},
        "methods": methods,
    }
    return config_from_dict(raw, source="bench workload")


def flops_per_token(model_config: dict[str, Any], params: int, trains_all: bool, mean_seq: float) -> float:
    attention = 12 * model_config["num_hidden_layers"] * model_config["num_attention_heads"] \
        * model_config["head_dim"] * mean_seq
    return (6 if trains_all else 4) * params + attention


def peak_flops(gpu: str | None) -> float | None:
    for key, value in PEAK_BF16_FLOPS.items():
        if gpu and key in gpu:
            return value
    return None


def prepare_workload(spec: BenchSpec):
    """The workload rows, prepared exactly as a study prepares them (same rows for every run)."""
    from peftlab.data.prepare import prepare_data
    from peftlab.models import load_tokenizer

    config = workload_config(spec)
    run_dir = Path(spec.work_dir)
    prepare_data(config, run_dir, load_tokenizer(config.model))
    return config, run_dir
