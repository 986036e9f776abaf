"""`peftlab export`: one trained model of a run as a standalone Hugging Face folder.

The folder holds the weights in the training dtype (adapters merged into the unquantised base, loaded
fresh, as the hybrid's merge stage does; full-weight methods copied), the tokenizer with its chat
template, and a model card (README.md) with the study's numbers for that model. Plain
`transformers.AutoModelForCausalLM.from_pretrained(folder)` loads it; no file in it names a path of
the run directory or of the user's caches. The folder appears whole or not at all (`atomic_dir`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from peftlab.config import StudyConfig
from peftlab.console import disk_usage, human_bytes, say
from peftlab.errors import UserError
from peftlab.rundir import atomic_dir, read_json, read_run_config

# Tokenizer files in a trained full model's final/: written afresh from the study's tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "tokenizer.model", "added_tokens.json")
# Scores the card shows when the evaluation has them.
_CARD_METRICS = {"bleu4": "BLEU-4", "rougeL": "ROUGE-L", "exact_match_norm": "exact match (normalised)"}
# JSON keys in which transformers records where a model or tokenizer was loaded from.
_PATH_KEYS = ("_name_or_path", "name_or_path", "base_model_name_or_path")


def export_model(run_dir: Path, name: str, out: Path) -> Path:
    """Write `out` for the trained model `name` of `run_dir`; returns `out`."""
    config = read_run_config(run_dir)
    train_dir = _trained_dir(config, run_dir, name)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not empty; choose a new folder")
    metrics = read_json(train_dir / "metrics.json")
    with atomic_dir(out) as folder:
        if metrics.get("saves") == "adapter":
            _write_merged(config, train_dir / "final", folder, metrics.get("dtype"))
        else:
            _copy_full(train_dir / "final", folder)
        _write_tokenizer(config, folder)
        forbidden = _private_paths(run_dir)
        _scrub_paths(folder)
        (folder / "README.md").write_text(model_card(config, run_dir, name, metrics, out.name), encoding="utf-8")
        leaked = _files_naming(folder, forbidden)
        if leaked:
            raise UserError(f"export {name}: {', '.join(leaked)} would name a local path; nothing was written")
        for item in folder.iterdir():  # some writers create private (0600) files: a shared model is readable
            item.chmod(0o644)
    say(f"wrote {out} ({human_bytes(disk_usage(out))}): load it with"
        f" AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return out


def _trained_dir(config: StudyConfig, run_dir: Path, name: str) -> Path:
    if name == "ensemble":
        members = " and ".join(config.evaluate.ensemble.members) or "its members"
        raise UserError("--model ensemble: the ensemble mixes two models' next-token probabilities at every step;"
                        f" it is not one set of weights and cannot be exported (export {members} instead)")
    if name == "base":
        raise UserError("--model base: the base model is the one the study started from (model.name_or_path);"
                        " export a trained method")
    config.method(name)  # unknown name: one line naming the configured methods
    train_dir = run_dir / "train" / name
    if not (train_dir / "metrics.json").is_file() or not (train_dir / "final").is_dir():
        raise UserError(f"{train_dir}: not trained yet; run `peftlab train --method {name} --out {run_dir}` first")
    return train_dir


def _write_merged(config: StudyConfig, adapter_dir: Path, folder: Path, dtype_name: str | None) -> None:
    """The adapters merged into the unquantised base loaded fresh in the training dtype, saved."""
    import torch

    from peftlab.hybrid import merged_model
    from peftlab.models import device_name

    device = device_name()
    dtype = getattr(torch, dtype_name) if dtype_name else torch.float32
    merged = merged_model(config, adapter_dir, None, device=device, dtype=dtype)
    merged.save_pretrained(folder, safe_serialization=True)


def _copy_full(final: Path, folder: Path) -> None:
    for item in final.iterdir():
        if item.is_file() and item.name not in _TOKENIZER_FILES:
            shutil.copy2(item, folder / item.name)


def _write_tokenizer(config: StudyConfig, folder: Path) -> None:
    from peftlab.models import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"tokenizer {config.model.tokenizer or config.model.name_or_path}: no chat template to"
                        " export with the model")
    tokenizer.save_pretrained(folder)


def _private_paths(run_dir: Path) -> list[str]:
    """Paths that must not appear in an exported folder: the run directory and the caches models come from."""
    import os

    from huggingface_hub import constants

    from peftlab.models.builtin import peftlab_cache_dir

    paths = {run_dir.resolve(), Path(peftlab_cache_dir()).resolve(), Path(constants.HF_HUB_CACHE).resolve(),
             Path(constants.HF_HOME).resolve()}
    home = os.path.expanduser("~")
    found = {str(p) for p in paths} | ({str(run_dir)} if len(run_dir.parts) > 1 else set())
    found |= {str(p).replace(home, "~", 1) for p in paths if str(p).startswith(home + os.sep)}
    return sorted(found, key=len, reverse=True)


def _scrub_paths(folder: Path) -> None:
    """Where transformers recorded the load path (`_name_or_path`, ...), a local path is blanked: a hub id
    stays (it names the base model), a path would point into the run directory or a cache."""
    for path in folder.glob("*.json"):
        if path.name == "tokenizer.json":  # the vocabulary (33 MB for Gemma): no load path in it
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        if _scrub(data):
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _is_hub_id(value: str) -> bool:
    return (value.count("/") == 1 and not value.startswith((".", "/", "~")) and ":" not in value
            and not Path(value).exists())


def _scrub(node: Any) -> bool:
    changed = False
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _PATH_KEYS and isinstance(value, str) and value and not _is_hub_id(value):
                node[key] = ""
                changed = True
            else:
                changed |= _scrub(value)
    elif isinstance(node, list):
        for value in node:
            changed |= _scrub(value)
    return changed


def _files_naming(folder: Path, forbidden: list[str]) -> list[str]:
    """Text files of `folder` that contain one of the `forbidden` paths."""
    leaked = []
    for path in sorted(folder.iterdir()):
        if path.suffix in (".json", ".md", ".jinja", ".txt", ".yaml"):
            text = path.read_text(encoding="utf-8", errors="replace")
            if any(p in text for p in forbidden):
                leaked.append(path.name)
    return leaked


# --------------------------------------------------------------------------------------------- model card


def _base_description(config: StudyConfig) -> tuple[str, str | None]:
    """(how the card names the base model, its hub id for the card's metadata or None). Local paths
    are named by their last part only."""
    from peftlab.models import resolve_source

    model = config.model
    if model.config:
        return f"random weights of the shape `{Path(model.config).name}` (a test model)", None
    name = model.name_or_path
    if name.startswith("builtin:"):
        return f"`{name}` (peftlab's built-in Gemma 3 270M)", None
    if name.endswith(".gguf") or name.startswith((".", "/", "~")) or Path(name).exists():
        return f"`{Path(name).name}` (a local model)", None
    try:
        _, extra = resolve_source(name)
    except UserError:
        return f"`{Path(name).name}`", None
    return (f"[`{name}`](https://huggingface.co/{name})", name) if extra.get("hub") else (f"`{name}`", None)


def _score(block: dict[str, Any], key: str) -> str:
    value = block.get(key)
    if value is None:
        return "-"
    ci = block.get(f"{key}_ci")
    sd = block.get(f"{key}_sd")
    text = f"{value:.4f}"
    if ci:
        text += f" [{ci[0]:.4f}, {ci[1]:.4f}]"
    elif sd is not None:
        text += f" ± {sd:.4f} (SD over {block.get('n_seeds')} seeds)"
    return text


def _eval_block(run_dir: Path, name: str) -> dict[str, Any] | None:
    path = run_dir / "eval" / name / "metrics.json"
    return read_json(path) if path.is_file() else None


def model_card(config: StudyConfig, run_dir: Path, name: str, training: dict[str, Any], folder_name: str) -> str:
    """README.md: what the model is, its scores on the study's test split (with the base model's),
    how it was trained (time, peak memory, the method's settings) and how to load it."""
    import yaml

    base_text, hub_id = _base_description(config)
    method = config.method(name)
    evaluated = _eval_block(run_dir, name)
    base_eval = _eval_block(run_dir, "base")
    front = {"library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["peftlab", method.kind, "text-generation"]}
    if hub_id:
        front["base_model"] = hub_id
    weights = ("the LoRA adapters merged into the unquantised base weights" if training.get("saves") == "adapter"
               else "all weights")
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {config.name}: {name}", "",
             f"Fine-tuned from {base_text} with **{name}**{'' if name == method.kind else f' ({method.kind})'} by"
             f" peftlab, in a study comparing"
             f" {', '.join(config.methods)}. Saved: {weights}, in {training.get('dtype')}.", ""]
    lines += ["## Results on the study's test split", ""]
    if evaluated is None:
        lines += [f"Not evaluated in this run (`peftlab evaluate --model {name}` scores it).", ""]
    else:
        metrics = [m for m in _CARD_METRICS if evaluated.get(m) is not None]
        labels = " | ".join(_CARD_METRICS[m] for m in metrics)

        def cells(block: dict[str, Any]) -> str:
            return " | ".join(_score(block, m) for m in metrics)

        lines += ["Scores are fractions in [0, 1]; 95% bootstrap intervals in brackets"
                  + ("; exact match after normalising case, punctuation, articles and spaces."
                     if "exact_match_norm" in metrics else "."), "",
                  f"| model | {labels} |", "|---" * (len(metrics) + 1) + "|", f"| {name} | {cells(evaluated)} |"]
        if base_eval is not None and base_eval.get("n") == evaluated.get("n"):
            lines.append(f"| base (before fine-tuning) | {cells(base_eval)} |")
        lines += _seed_spread(config, run_dir, name, metrics)
        generation = evaluated.get("generation") or {}
        lines += ["", f"{evaluated.get('n')} test rows, greedy decoding, at most"
                  f" {generation.get('max_new_tokens', config.evaluate.max_new_tokens)} new tokens.", ""]
        per_source = evaluated.get("per_source") or {}
        if per_source:
            lines += [f"| source | rows | {labels} |", "|---" * (len(metrics) + 2) + "|"]
            lines += [f"| {source} | {block.get('n')} | {cells(block)} |" for source, block in per_source.items()]
            lines.append("")
    lines += ["## Training", "", "| | |", "|---|---|"]
    seconds = training.get("train_time_s")
    if seconds is not None:
        merge = training.get("merge_time_s") or 0.0
        lines.append(f"| training time | {seconds + merge:.1f} s" + (f" (merge {merge:.1f} s)" if merge else "") + " |")
    if training.get("peak_gpu_alloc_gib") is not None:
        lines.append(f"| peak GPU memory (allocated) | {training['peak_gpu_alloc_gib']:.2f} GiB |")
        if training.get("gpu_name"):
            lines.append(f"| GPU | {training['gpu_name']} |")
    elif training.get("peak_rss_gib") is not None:
        lines.append(f"| peak process memory (CPU run) | {training['peak_rss_gib']:.2f} GiB |")
    for key, label in (("optimizer_steps", "optimizer steps"), ("tokens_trained", "tokens trained"),
                       ("optimizer", "optimizer"), ("trainable_params", "trainable parameters"),
                       ("final_loss", "final training loss")):
        value = training.get(key)
        if value is not None:
            lines.append(f"| {label} | {value:.4f} |" if isinstance(value, float) else f"| {label} | {value:,} |"
                         if isinstance(value, int) else f"| {label} | {value} |")
    lines += ["", "Method settings (the study's config):", "", "```yaml",
              yaml.safe_dump(_settings(config, name), sort_keys=False).strip(), "```", ""]
    lines += ["Data: " + ", ".join(f"{s.name} ({s.format})" for s in config.data.sources)
              + f"; {config.data.train_per_source} training rows per source, sequences of at most"
              f" {config.data.max_seq_length} tokens.", ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'tokenizer = AutoTokenizer.from_pretrained("{folder_name}")',
              f'model = AutoModelForCausalLM.from_pretrained("{folder_name}")',
              'messages = [{"role": "user", "content": "Give three tips for staying healthy."}]',
              "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\","
              " return_dict=True)",
              "out = model.generate(**ids, max_new_tokens=256, do_sample=False)",
              'print(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))', "```", ""]
    versions = training.get("versions") or {}
    shown = ", ".join(f"{k} {versions[k]}" for k in ("peftlab", "torch", "transformers", "peft") if k in versions)
    if shown:
        lines += [f"Trained with {shown}.", ""]
    return "\n".join(lines)


def _seed_spread(config: StudyConfig, run_dir: Path, name: str, metrics: list[str]) -> list[str]:
    """A line with the method's mean and SD over its training seeds (results.json), when it has several."""
    results_path = run_dir / "results.json"
    method_name = name.partition("@")[0]
    if not results_path.is_file():
        return []
    entry = (read_json(results_path).get("models") or {}).get(method_name) or {}
    seeds = entry.get("seeds")
    if not isinstance(seeds, dict) or len(seeds) < 2:
        return []
    spread = ", ".join(f"{_CARD_METRICS[m]} {entry[m]:.4f} ± {entry[f'{m}_sd']:.4f}" for m in metrics
                       if entry.get(m) is not None and entry.get(f"{m}_sd") is not None)
    return ["", f"This folder holds the seed {config.method(name).seed} run of {method_name}. Over the study's"
            f" {len(seeds)} training seeds ({', '.join(seeds)}), mean ± SD: {spread}."]


def _settings(config: StudyConfig, name: str) -> dict[str, Any]:
    """The settings that shaped this model's training: the method's, or for a hybrid its stages and
    the recipe each stage trained with."""
    from peftlab.hybrid import stage_method

    method = config.method(name)
    if method.kind != "hybrid":
        return {name: _method_settings(method)}
    settings: dict[str, Any] = {name: {"kind": "hybrid", "seed": method.seed,
                                       "stages": [asdict(stage) for stage in method.stages]}}
    for index, stage in enumerate(method.stages):
        if stage.method != "merge":
            recipe = stage_method(config, stage.method, stage.epochs, stage.max_steps, seed=method.seed)
            settings[f"stage {index} ({stage.method})"] = _method_settings(recipe)
    return settings


def _method_settings(method) -> dict[str, Any]:
    """One method's settings (other kinds' sections and bookkeeping keys left out)."""
    drop = {"lora", "quant", "galore", "stages", "seeds", "keep_checkpoints", "report_to", "save_steps",
            "save_total_limit", "logging_steps"}
    if method.kind in ("qlora", "lora"):
        drop -= {"lora"} | ({"quant"} if method.kind == "qlora" else set())
    elif method.kind in ("galore", "full"):
        drop -= {"galore"} if method.kind == "galore" else set()
    return {k: v for k, v in asdict(method).items() if k not in drop}
