"""The study configuration: typed dataclasses, YAML loading, `--set` overrides and validation.

One YAML file describes a whole study. This module is the only place that knows its shape:
`load_config` reads the YAML, applies `--set key.path=value` overrides, merges the shared
`train:` defaults into every method, converts the result into dataclasses (rejecting unknown
keys and wrong types with the key path in the message) and checks values that types cannot.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from peftlab.errors import UserError

SourceFormat = Literal["alpaca", "tulu", "ultrachat", "messages", "sharegpt"]
MethodKind = Literal["qlora", "lora", "galore", "full", "hybrid"]
# Scores of every evaluated model (peftlab.evaluate.metrics.METRICS); `evaluate.metrics` picks the leading ones.
MetricName = Literal["rougeL", "bleu4", "exact_match", "exact_match_norm", "rouge1", "rouge2"]
BUILTIN_CONFIG_DIR = Path(__file__).parent / "configs"
PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


@dataclass
class SourceConfig:
    name: str
    format: SourceFormat
    path: str
    split: str = "train"
    subset: str | None = None


@dataclass
class DataConfig:
    seed: int = 42
    train_per_source: int = 5000
    test_per_source: int = 2000
    train_buffer: int = 5200
    test_buffer: int = 2100
    max_seq_length: int = 2048
    sources: list[SourceConfig] = field(default_factory=list)


@dataclass
class PrepareConfig:
    """How the data stage treats rows (kept apart from `data:`, whose keys are a fixed contract)."""

    overlength: Literal["drop", "truncate"] = "truncate"
    # Rows carved from each source's train buffer (after the train rows) to choose ensemble weights.
    validation_per_source: int = 0


@dataclass
class ModelConfig:
    name_or_path: str = "google/gemma-3-1b-it"
    # A config.json to build the model from with random weights (tests and benchmarks).
    config: str | None = None
    # Where the tokenizer comes from when it differs from name_or_path.
    tokenizer: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = "sdpa"
    # Training/inference dtype: auto = bf16 on a GPU that supports it, fp32 on CPU.
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # Fuse RMSNorm, GeGLU and RoPE with liger-kernel's Triton kernels (Gemma 3, CUDA only).
    liger_kernel: bool = False
    # The keys the YAML (or --set) gave (not a YAML key): training's execution keeps these as written.
    explicit: list[str] = field(default_factory=list, metadata={"internal": True})


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class QuantSettings:
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    # The report states bf16 precision; its code set fp16, which under a bf16 model makes bitsandbytes copy
    # every layer input to fp16 and back (+35 MiB at the 2048-token peak on the H200; same loss curve).
    compute_dtype: Literal["float16", "bfloat16", "float32"] = "bfloat16"


@dataclass
class GaloreSettings:
    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: Literal["std", "reverse_std", "right", "left", "full"] = "std"
    # Substrings of module names whose 2-D weights get low-rank projected gradients.
    targets: list[str] = field(default_factory=lambda: ["attn", "mlp"])
    variant: Literal["adamw", "adamw8bit", "layerwise"] = "adamw"
    # `projected`: each gradient is projected as backward makes it and summed at rank r, so no full
    # gradient set is held (methods/galore_projected.py); `full`: galore-torch's accumulation.
    accumulate: Literal["full", "projected"] = "full"
    # How the rank-r basis is computed on refresh: `gram` = eigenvectors of the smaller Gram matrix in
    # fp64 (the same subspace, 5.8x faster on the H200; methods/galore_basis.py); `svd` = galore-torch's
    # torch.linalg.svd call for call.
    projection: Literal["gram", "svd"] = "gram"


@dataclass
class StageConfig:
    """One step of a sequential method: another method's recipe, or `merge`."""

    method: str
    epochs: float | None = None
    max_steps: int | None = None


@dataclass
class MethodConfig:
    kind: MethodKind
    epochs: float = 3.0
    # > 0 caps the number of optimizer steps (overrides epochs).
    max_steps: int = -1
    batch_size: int = 4
    grad_accum: int = 4
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    max_grad_norm: float = 1.0
    # Execution settings (how a step runs, never what is learned): `peftlab.train.execution` chooses
    # each one for the device unless the YAML sets it; these defaults are what a key left out means on CPU.
    gradient_checkpointing: bool = True
    loss_on: Literal["assistant", "all"] = "assistant"
    seed: int = 42
    # Seed repeats: train the method once per seed. The first seed's run keeps the method's name (and
    # replaces `seed`); each further seed S trains as `<method>@S` (train/<method>@S/, eval/<method>@S/).
    seeds: list[int] = field(default_factory=list)
    # Any transformers `optim` name; `auto` = paged_adamw_8bit for qlora on GPU (adamw_8bit on CPU), adamw_torch otherwise.
    optimizer: str = "auto"
    # Batches of similar-length rows (less padding); `random` keeps the study's plain shuffle.
    sampling: Literal["random", "group_by_length", "sequential"] = "random"
    # Vocabulary logits are computed this many target tokens at a time (memory: tokens x vocab x ~10 bytes).
    loss_chunk_tokens: int = 256
    # Set: each batch runs forward/backward in slices of at most this many padded tokens (rows x
    # their longest), so the whole batch feeds one optimizer step at the memory of a slice.
    micro_batch_tokens: int | None = None
    # Compile each decoder layer (torch.compile, dynamic shapes): fused element-wise kernels and far
    # fewer launches per step; the first steps pay the compilation.
    torch_compile: bool = False
    # Each micro-batch's rows run as one concatenated sequence (no padding), positions restarting per
    # row, attention kept inside each row (and its sliding window): same loss, no work on padding.
    padding_free: bool = True
    # GiB the training may use on the GPU: the execution then fits it (token-budget slices, activation
    # checkpointing, small loss chunks: the bench's `lowmem` levers); null = the whole card.
    memory_budget_gib: float | None = None
    # Attention kernel for training: `auto` = model.attn_implementation when the YAML sets it, else the
    # fastest exact kernel for the device (padding-free: `varlen` = torch's variable-length flash
    # attention, `flex_attention` = a FlexAttention block mask, `sdpa`/`eager` = a block-diagonal mask).
    attention: Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "varlen"] = "auto"
    # Padding-free only: pad each forward's token count up to a multiple of this (a dummy row outside
    # the loss), so a compiled step sees few shapes; null = no padding.
    pad_tokens_to_multiple_of: int | None = None
    # QLoRA only: keep a bf16 (compute dtype) copy of each frozen NF4 weight, dequantized once, instead
    # of dequantizing before every matmul (the same numbers; costs 2 bytes per base weight).
    dequantized_base: bool = False
    # Padding-free only: run each batch's rows as bins of exactly this many tokens (first fit, the rest
    # padding rows outside the loss), one shape per forward; null = the rows as they come (the GPU's
    # fast execution picks a size). At least data.max_seq_length.
    graph_tokens: int | None = None
    # With graph_tokens on CUDA in one process: capture one bin's forward + backward as a CUDA graph
    # and replay it for every later bin (one launch instead of thousands; the same kernels).
    cuda_graphs: bool = True
    # Keep device-to-host syncs out of each micro-batch: tokens counted on the host from the collator,
    # and no per-micro-batch NaN check of the loss (a NaN loss is then logged as it is).
    avoid_host_syncs: bool = True
    logging_steps: int = 1
    save_steps: int = 200
    save_total_limit: int = 2
    # Checkpoints exist to resume an interrupted run: removed once final/ is written unless this is true.
    keep_checkpoints: bool = False
    # transformers' experiment trackers (TrainingArguments.report_to): tensorboard, wandb, ...; none by default.
    report_to: list[str] | str = field(default_factory=list)
    lora: LoraSettings = field(default_factory=LoraSettings)
    quant: QuantSettings = field(default_factory=QuantSettings)
    galore: GaloreSettings = field(default_factory=GaloreSettings)
    stages: list[StageConfig] = field(default_factory=list)
    # The keys the YAML (train: + methods.<name>:, or --set) gave (not a YAML key): the execution
    # (`peftlab.train.execution`) keeps these as written and chooses the others for the device.
    explicit: list[str] = field(default_factory=list, metadata={"internal": True})


@dataclass
class EnsembleConfig:
    members: list[str] = field(default_factory=list)
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    # Metric maximised on the validation split to choose alpha.
    select_by: Literal["bleu4", "rougeL"] = "rougeL"
    validation_limit: int | None = None


@dataclass
class EvaluateConfig:
    max_new_tokens: int = 1024
    # Rows per batch at most; max_batch_tokens is what bounds memory. Large batches decode faster: on the H200
    # the static decoder ran 9,334 tokens/s with 64-row batches and 12,999 with up to 320 (bench, 1B shape).
    batch_size: int = 256
    # `static`: our static-KV-cache decoder, each step one CUDA graph on a GPU (evaluate/static_decode.py),
    # for single models and the ensemble's log-probability mix; `generate`: plain `model.generate` (and the
    # ensemble's plain KV-cached loop). Both greedy.
    decoder: Literal["static", "generate"] = "static"
    # Padded tokens per batch, rows x (longest prompt + max_new_tokens): long prompts get smaller batches.
    # (The static ensemble holds one KV cache per member: twice the cache memory of one model.)
    max_batch_tokens: int | None = 131072
    # `static` decoder: batches decoded at once, each on its own CUDA stream, so one batch's small kernels fill
    # the GPU while another's wait (1B on an H200: 9,418 -> 13,820 tokens/s from 1 to 3). Memory: this many
    # batches' KV caches; lower it (or max_batch_tokens) on a small card.
    concurrent_batches: int = 3
    # `static` decoder: prefill each batch's prompts in slices of about this many padded tokens (rows x slice),
    # so the prefill's activations stay small (same tokens; not yet measured on a GPU); null: one forward.
    prefill_chunk_tokens: int | None = None
    # `static` decoder: torch.compile each decoder layer first (fused kernels inside the graphs; compile time first).
    torch_compile: bool = False
    limit: int | None = None
    bootstrap_samples: int = 1000
    # The metrics that lead the report, first = the one the recommendation ranks by; each gets pairwise
    # significance tests. Every model is scored on all of them (exact_match_norm: SQuAD-normalised).
    metrics: list[MetricName] = field(default_factory=lambda: ["rougeL", "bleu4", "exact_match_norm"])
    # Models evaluated by `peftlab study`; empty = base, every method, and the ensemble if configured.
    models: list[str] = field(default_factory=list)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)


@dataclass
class StudyConfig:
    name: str = "study"
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    methods: dict[str, MethodConfig] = field(default_factory=dict)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    # Where the YAML came from (not a YAML key).
    source_file: str | None = field(default=None, metadata={"internal": True})

    def method(self, name: str) -> MethodConfig:
        """The method `name`, or for a seed repeat `<method>@<seed>` that method with that seed."""
        base, at, seed = name.partition("@")
        if base not in self.methods:
            known = ", ".join(self.methods) or "none"
            raise UserError(f"unknown method '{base}' (configured methods: {known})")
        method = self.methods[base]
        if not at:
            return method
        extra = method_seeds(method)[1:]
        if not seed.isdigit() or int(seed) not in extra:
            repeats = ", ".join(f"{base}@{s}" for s in extra) or "none: train.seeds has one seed"
            raise UserError(f"unknown seed repeat '{name}' (the first seed's run is '{base}'; repeats: {repeats})")
        return dataclasses.replace(method, seed=int(seed))


# ---------------------------------------------------------------------------------------------
# Loading


def resolve_config_path(path: str | None) -> Path:
    """A config argument: a file path, or the name of a shipped config (`demo`, `smoke`, `examples/lowmem`, ...)."""
    if path is None:
        path = "demo"
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    shipped = (BUILTIN_CONFIG_DIR / f"{path.removesuffix('.yaml')}.yaml").resolve()
    if shipped.is_file() and shipped.is_relative_to(BUILTIN_CONFIG_DIR.resolve()):
        return shipped
    if candidate.exists():
        raise UserError(f"config {path}: not a file")
    names = ", ".join(sorted(p.relative_to(BUILTIN_CONFIG_DIR).with_suffix("").as_posix()
                             for p in BUILTIN_CONFIG_DIR.rglob("*.yaml")))
    raise UserError(f"config {path}: file not found (shipped configs: {names})")


def load_config(path: str | None, overrides: list[str] | None = None) -> StudyConfig:
    config_path = resolve_config_path(path)
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"config {config_path}:{where} invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"config {config_path}: the top level must be a mapping of sections")
    for item in overrides or []:
        apply_override(raw, item)
    config = config_from_dict(raw, source=str(config_path))
    config.source_file = shipped_name(config_path) or str(config_path)
    return config


def shipped_name(path: Path) -> str | None:
    """A shipped config's name (`samples`, `examples/lowmem`) for its file, else None: what a run records
    as its config (an install path means nothing on another machine)."""
    try:
        return path.resolve().relative_to(BUILTIN_CONFIG_DIR.resolve()).with_suffix("").as_posix()
    except ValueError:
        return None


def config_from_dict(raw: dict[str, Any], source: str = "config") -> StudyConfig:
    raw = dict(raw)
    shared_train = raw.pop("train", None) or {}
    if not isinstance(shared_train, dict):
        raise UserError(f"{source}: 'train' must be a mapping of defaults shared by every method")
    methods_raw = raw.get("methods") or {}
    if not isinstance(methods_raw, dict):
        raise UserError(f"{source}: 'methods' must be a mapping of method name -> settings")
    raw["methods"] = {name: _merge(shared_train, body or {}) for name, body in methods_raw.items()}
    try:
        config = _build(StudyConfig, raw, "")
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None
    for name, method in config.methods.items():
        method.explicit = _given_keys(raw["methods"][name])
    config.model.explicit = _given_keys(raw.get("model") or {})
    try:
        validate(config)
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None
    return config


def _given_keys(section: dict[str, Any]) -> list[str]:
    """The keys a YAML section gave, nested ones dotted one level deep (`galore.accumulate`)."""
    keys = set(section)
    for key, value in section.items():
        if isinstance(value, dict):
            keys.update(f"{key}.{inner}" for inner in value)
    return sorted(keys)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `key.path=value` override (value parsed as YAML) to the raw config mapping."""
    if "=" not in item:
        raise UserError(f"--set {item}: expected KEY=VALUE, e.g. --set data.seed=7")
    key, _, text = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise UserError(f"--set {item}: empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        node = _descend(node, part, ".".join(parts[: depth + 1]), item)
    last = parts[-1]
    if isinstance(node, list):
        index = _list_index(node, last, key, item)
        node[index] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise UserError(f"--set {item}: '{'.'.join(parts[:-1])}' is not a section")


def _descend(node: Any, part: str, where: str, item: str) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, where, item)]
    if not isinstance(node, dict):
        raise UserError(f"--set {item}: '{where}' is not a section")
    if node.get(part) is None:
        node[part] = {}
    return node[part]


def _list_index(node: list[Any], part: str, where: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise UserError(f"--set {item}: '{where}' needs a list index below {len(node)}")
    return int(part)


# ---------------------------------------------------------------------------------------------
# Typed conversion: unknown keys and wrong types are errors naming the key path.

_SIMPLE = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _build(cls: type, raw: Any, path: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"{path or 'config'}: expected a mapping, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = str(unknown[0])
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(fields)})"
        raise UserError(f"unknown key '{_join(path, key)}'{hint}")
    values = {}
    for name, spec in fields.items():
        if name in raw:
            values[name] = _convert(hints[name], raw[name], _join(path, name))
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise UserError(f"missing required key '{_join(path, name)}'")
    return cls(**values)


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner[:-1]:  # the first type the value converts to (`list[str] | str`)
            try:
                return _convert(option, value, path)
            except UserError:
                continue
        return _convert(inner[-1], value, path)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise UserError(f"{path}: {_show(value)} is not one of {choices}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{path}: expected a list, got {_show(value)}")
        return [_convert(args[0], v, f"{path}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{path}: expected a mapping, got {_show(value)}")
        return {str(k): _convert(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    return _convert_scalar(hint, value, path)


def _convert_scalar(hint: Any, value: Any, path: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        number = _number(value)
        if number is not None:
            if not math.isfinite(number):
                raise UserError(f"{path}: expected a finite number, got {_show(value)}")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif hint is Any:
        return value
    raise UserError(f"{path}: expected {_SIMPLE.get(hint, hint)}, got {_show(value)}")


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------------
# Value checks that types cannot express.


def validate(config: StudyConfig) -> None:
    if not PLAIN_NAME.fullmatch(config.name):
        raise UserError(f"name: {config.name!r} is not a plain folder name (letters, digits, '.', '-', '_';"
                        " not starting with '.'): the run goes to runs/<name>; use --out for another place")
    data = config.data
    for key in ("train_per_source", "max_seq_length"):
        if getattr(data, key) < 1:
            raise UserError(f"data.{key} must be at least 1, got {getattr(data, key)}")
    for key in ("test_per_source", "train_buffer", "test_buffer"):
        if getattr(data, key) < 0:
            raise UserError(f"data.{key} must not be negative, got {getattr(data, key)}")
    needed_train = data.train_per_source + config.prepare.validation_per_source
    if data.train_buffer < needed_train:
        raise UserError(
            f"data.train_buffer ({data.train_buffer}) must be at least data.train_per_source"
            f" + prepare.validation_per_source ({needed_train})"
        )
    if data.test_buffer < data.test_per_source:
        raise UserError(
            f"data.test_buffer ({data.test_buffer}) must be at least data.test_per_source ({data.test_per_source})"
        )
    if not data.sources:
        raise UserError("data.sources: at least one source is needed")
    names = [s.name for s in data.sources]
    for i, source in enumerate(data.sources):
        if not source.name or not source.name.replace("_", "").replace("-", "").isalnum():
            raise UserError(f"data.sources.{i}.name: use letters, digits, '-' and '_' only, got {source.name!r}")
        if names.count(source.name) > 1:
            raise UserError(f"data.sources.{i}.name: duplicate source name '{source.name}'")
    if data.seed < 0:
        raise UserError(f"data.seed must not be negative, got {data.seed}")
    if config.prepare.validation_per_source < 0:
        raise UserError("prepare.validation_per_source must not be negative")
    reserved = {"base", "ensemble", "merge"}
    for name, method in config.methods.items():
        where = f"methods.{name}"
        if name in reserved or not name.replace("_", "").replace("-", "").isalnum():
            raise UserError(f"{where}: '{name}' cannot name a method (reserved or not letters/digits/-/_)")
        _validate_method(config, name, method, where)
    _validate_evaluate(config)


def _validate_method(config: StudyConfig, name: str, method: MethodConfig, where: str) -> None:
    positive = {"batch_size": method.batch_size, "grad_accum": method.grad_accum, "logging_steps": method.logging_steps,
                "loss_chunk_tokens": method.loss_chunk_tokens,
                "save_steps": method.save_steps, "lora.r": method.lora.r, "galore.rank": method.galore.rank,
                "galore.update_proj_gap": method.galore.update_proj_gap}
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"{where}.{key} must be at least 1, got {value}")
    if method.memory_budget_gib is not None and method.memory_budget_gib <= 0:
        raise UserError(f"{where}.memory_budget_gib must be positive (or left out), got {method.memory_budget_gib}")
    if method.pad_tokens_to_multiple_of is not None and method.pad_tokens_to_multiple_of < 1:
        raise UserError(f"{where}.pad_tokens_to_multiple_of must be at least 1 (or left out),"
                        f" got {method.pad_tokens_to_multiple_of}")
    if method.micro_batch_tokens is not None and method.micro_batch_tokens < 1:
        raise UserError(f"{where}.micro_batch_tokens must be at least 1 (or left out), got {method.micro_batch_tokens}")
    if method.graph_tokens is not None and method.graph_tokens < config.data.max_seq_length:
        raise UserError(f"{where}.graph_tokens must hold the longest row: at least data.max_seq_length"
                        f" ({config.data.max_seq_length}), got {method.graph_tokens}")
    if method.graph_tokens is not None and method.kind in ("galore", "hybrid") and (
            method.galore.accumulate == "projected" or method.galore.variant == "layerwise"):
        raise UserError(f"{where}.graph_tokens: not with galore.accumulate projected or variant layerwise (their"
                        " hooks own the gradients); leave graph_tokens out")
    if method.seed < 0:
        raise UserError(f"{where}.seed must not be negative, got {method.seed}")
    if any(seed < 0 for seed in method.seeds) or len(set(method.seeds)) != len(method.seeds):
        raise UserError(f"{where}.seeds must be different non-negative integers, got {method.seeds}")
    if method.seeds:
        method.seed = method.seeds[0]  # the plain run is the first seed's
    if not method.lora.target_modules:
        raise UserError(f"{where}.lora.target_modules: name at least one module, e.g. q_proj")
    if not method.galore.targets:
        raise UserError(f"{where}.galore.targets: name at least one module-name substring, e.g. attn")
    if method.galore.accumulate == "projected" and (method.galore.variant == "layerwise"
                                                    or method.galore.proj_type != "std"):
        raise UserError(f"{where}.galore.accumulate: projected works with variant adamw or adamw8bit and"
                        " proj_type std")
    if method.kind == "galore" and method.galore.variant == "layerwise" and method.grad_accum != 1:
        raise UserError(f"{where}.grad_accum: galore.variant layerwise updates inside backward; set grad_accum: 1")
    _validate_optimizer(method.optimizer, f"{where}.optimizer")
    _validate_report_to(method.report_to, f"{where}.report_to")
    if method.lr <= 0:
        raise UserError(f"{where}.lr must be positive, got {method.lr}")
    if method.epochs <= 0 and method.max_steps <= 0:
        raise UserError(f"{where}: set epochs > 0 or max_steps > 0")
    if not 0 <= method.lora.dropout < 1:
        raise UserError(f"{where}.lora.dropout must be in [0, 1), got {method.lora.dropout}")
    if method.max_grad_norm < 0 or method.weight_decay < 0 or method.warmup_steps < 0:
        raise UserError(f"{where}: max_grad_norm, weight_decay and warmup_steps must not be negative")
    if method.torch_compile and config.model.liger_kernel:
        raise UserError(f"{where}.torch_compile: not with model.liger_kernel (liger's Triton kernels are not"
                        " known to compile); set one of them to false")
    if method.kind == "hybrid":
        _validate_stages(config, name, method, where)
    elif method.stages:
        raise UserError(f"{where}.stages: only methods of kind 'hybrid' have stages")


def validate_fsdp(config: StudyConfig, name: str) -> None:
    """The config-only rules of sharded training (`--fsdp`): which methods and settings FSDP can run."""
    method = config.method(name)
    if method.kind in ("galore", "hybrid"):
        raise UserError(f"method '{name}' ({method.kind}): GaLore projects whole weight matrices, which FSDP"
                        " splits across processes; train it with DDP (drop --fsdp)")
    if method.micro_batch_tokens is not None:
        raise UserError(f"method '{name}': micro_batch_tokens runs a different number of forwards per process,"
                        " which FSDP's collective weight gathering cannot do; drop it or use DDP (drop --fsdp)")
    if method.torch_compile:
        raise UserError(f"method '{name}': torch_compile is not supported with --fsdp yet; drop one of them")
    if any(key in method.optimizer for key in ("8bit", "paged", "bnb")):
        raise UserError(f"method '{name}': optimizer {method.optimizer} (bitsandbytes) cannot step FSDP's sharded"
                        " parameters; use adamw_torch or leave optimizer: auto")


def single_process_only(config: StudyConfig, name: str) -> str | None:
    """Why `name` (a hybrid: any of its stages) must train in one process, or None: fixed-size bins
    (`graph_tokens`), or a GaLore whose hooks own the gradients (projected accumulation, layer-wise
    updates inside backward)."""
    method = config.method(name)
    trained = [config.method(s.method) for s in method.stages if s.method != "merge"] \
        if method.kind == "hybrid" else [method]
    for stage in trained:
        if stage.graph_tokens is not None:
            return (f"method '{name}': graph_tokens (fixed-size bins, CUDA graphs) runs in one process;"
                    " leave it out with --gpus")
        if stage.kind == "galore" and (stage.galore.accumulate == "projected" or stage.galore.variant == "layerwise"):
            return (f"method '{name}': galore with accumulate projected or variant layerwise is single-GPU"
                    " (it updates from inside backward); use accumulate full and variant adamw with --gpus")
    return None


def _validate_optimizer(name: str, where: str) -> None:
    if name == "auto":
        return
    from transformers.training_args import OptimizerNames

    known = [o.value for o in OptimizerNames]
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else " (auto, or a transformers optim name: adamw_torch, ...)"
        raise UserError(f"{where}: unknown optimizer '{name}'{hint}")


def _validate_report_to(value: list[str] | str, where: str) -> None:
    names = [value] if isinstance(value, str) else value
    if not names:
        return
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK  # seconds: only when set

    known = [*INTEGRATION_TO_CALLBACK, "all", "none"]
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"
            raise UserError(f"{where}: unknown integration '{name}'{hint}")


def _validate_stages(config: StudyConfig, name: str, method: MethodConfig, where: str) -> None:
    if not method.stages:
        raise UserError(f"{where}.stages: a hybrid needs a list of stages, e.g. qlora, merge, galore")
    trains_adapters = False
    for i, stage in enumerate(method.stages):
        at = f"{where}.stages.{i}"
        if (stage.epochs is not None and stage.epochs <= 0) or (stage.max_steps is not None and stage.max_steps < 1):
            raise UserError(f"{at}: epochs must be > 0 and max_steps >= 1 when given")
        if stage.method == "merge":
            if not trains_adapters:
                raise UserError(f"{at}: 'merge' must follow a qlora or lora stage")
            trains_adapters = False
            continue
        if stage.method not in config.methods:
            raise UserError(f"{at}.method: unknown method '{stage.method}' (configure it under methods:)")
        kind = config.methods[stage.method].kind
        if kind == "hybrid":
            raise UserError(f"{at}.method: a hybrid stage cannot itself be a hybrid ('{stage.method}')")
        if trains_adapters:
            raise UserError(f"{at}: add a 'merge' stage after the adapter stage before '{stage.method}'")
        if i > 0 and kind == "qlora":
            raise UserError(f"{at}: qlora re-quantises the model, so it can only be the first stage")
        trains_adapters = kind in ("qlora", "lora")
    if trains_adapters:
        raise UserError(f"{where}.stages: end with 'merge' or a full-weight stage so the result is one model")


def _validate_evaluate(config: StudyConfig) -> None:
    ev = config.evaluate
    if ev.max_new_tokens < 1 or ev.batch_size < 1:
        raise UserError("evaluate.max_new_tokens and evaluate.batch_size must be at least 1")
    if ev.bootstrap_samples < 1:
        raise UserError(f"evaluate.bootstrap_samples must be at least 1, got {ev.bootstrap_samples}")
    if ev.prefill_chunk_tokens is not None and ev.prefill_chunk_tokens < 1:
        raise UserError(f"evaluate.prefill_chunk_tokens must be at least 1 (or null), got {ev.prefill_chunk_tokens}")
    if ev.concurrent_batches < 1:
        raise UserError(f"evaluate.concurrent_batches must be at least 1, got {ev.concurrent_batches}")
    if ev.max_batch_tokens is not None and ev.max_batch_tokens < 1:
        raise UserError(f"evaluate.max_batch_tokens must be at least 1 (or null for no limit), got {ev.max_batch_tokens}")
    if ev.ensemble.validation_limit is not None and ev.ensemble.validation_limit < 1:
        raise UserError("evaluate.ensemble.validation_limit must be at least 1 (or null for all rows)")
    if ev.limit is not None and ev.limit < 1:
        raise UserError(f"evaluate.limit must be at least 1 (or null for all rows), got {ev.limit}")
    if not ev.metrics or len(set(ev.metrics)) != len(ev.metrics):
        raise UserError(f"evaluate.metrics: name each metric once, at least one (got {ev.metrics})")
    known = {"base", *config.methods}
    if ev.ensemble.members:
        for member in ev.ensemble.members:
            if member not in known:
                raise UserError(f"evaluate.ensemble.members: unknown model '{member}'")
        if len(ev.ensemble.members) != 2:
            raise UserError("evaluate.ensemble.members: name exactly two models")
        if not ev.ensemble.alphas or any(not 0 <= a <= 1 for a in ev.ensemble.alphas):
            raise UserError("evaluate.ensemble.alphas: a non-empty list of values in [0, 1]")
        if config.prepare.validation_per_source < 1:
            raise UserError("evaluate.ensemble needs prepare.validation_per_source >= 1 to choose alpha")
        known.add("ensemble")
    for model in ev.models:
        if model not in known:
            raise UserError(f"evaluate.models: unknown model '{model}' (known: {', '.join(sorted(known))})")


# ---------------------------------------------------------------------------------------------
# Serialisation


def config_to_dict(config: StudyConfig) -> dict[str, Any]:
    raw = dataclasses.asdict(config)
    raw.pop("source_file", None)
    raw["model"].pop("explicit", None)
    for method in raw["methods"].values():
        method.pop("explicit", None)
    return raw


def dump_config(config: StudyConfig) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True)


def method_seeds(method: MethodConfig) -> list[int]:
    """The training seeds of a method: `seeds`, else its one `seed`."""
    return list(method.seeds) or [method.seed]


def seed_runs(config: StudyConfig, name: str) -> list[str]:
    """The runs of model `name`: itself (a method's first seed) then `<name>@<seed>` for each further
    seed of `train.seeds`; base and the ensemble are one run."""
    if name not in config.methods:
        return [name]
    return [name, *(f"{name}@{seed}" for seed in method_seeds(config.methods[name])[1:])]


def evaluated_models(config: StudyConfig) -> list[str]:
    """The models a study evaluates (each method by its plain name; `seed_runs` gives its repeats)."""
    if config.evaluate.models:
        return list(config.evaluate.models)
    models = ["base", *config.methods]
    if config.evaluate.ensemble.members:
        models.append("ensemble")
    return models


def expand_path(path: str) -> str:
    return os.path.expandvars(os.path.expanduser(path))
