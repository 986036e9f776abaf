"""The reference recipe the bench compares with: the original study's TRL `SFTTrainer` run with a
plain `TrainingArguments`, on the same workload rows as our profiles.

Its hyperparameters are configs/seed.yaml's (through the workload's method config: batch split,
learning rate, clipping, warmup, schedule, weight decay, seed, LoRA / quantisation / GaLore
settings); its execution is the study's code: the seed's micro-batches x accumulation as written,
activation checkpointing, eager attention (SDPA for plain LoRA), and fp16 QLoRA compute."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from peftlab.bench.workload import BenchSpec, prepare_workload
from peftlab.errors import UserError


def run_reference(spec: BenchSpec) -> dict[str, Any]:
    """The study's recipe: TRL SFTTrainer with a plain TrainingArguments."""
    try:
        import datasets
        from trl import SFTTrainer
    except ImportError:
        raise UserError("--reference needs trl and datasets: pip install 'peftlab[gpu]' datasets") from None
    from transformers import TrainingArguments

    from peftlab.data.prepare import read_split
    from peftlab.models import count_parameters, load_tokenizer, random_model_dir
    from peftlab.train.meter import StepTimes, measure

    config, run_dir = prepare_workload(spec)
    tokenizer = load_tokenizer(config.model)
    texts = [row["text"] for row in read_split(run_dir, "train")]
    dataset = datasets.Dataset.from_list([{"text": t} for t in texts]).shuffle(seed=42)
    path = str(random_model_dir(spec.shape, 0))
    method = config.methods[spec.method]
    model, optimizers, optim = _reference_model(spec.method, path, method)
    args = TrainingArguments(
        output_dir=str(Path(spec.work_dir) / "ref"), per_device_train_batch_size=method.batch_size,
        gradient_accumulation_steps=method.grad_accum, num_train_epochs=method.epochs, max_steps=spec.max_steps,
        weight_decay=method.weight_decay, warmup_steps=method.warmup_steps, lr_scheduler_type=method.scheduler,
        bf16=True, gradient_checkpointing=True, seed=method.seed, learning_rate=method.lr,
        max_grad_norm=method.max_grad_norm, optim=optim, report_to=[], save_strategy="no", logging_steps=1,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         optimizers=optimizers)
    counted = {"tokens": 0}
    collate = trainer.data_collator

    def counting_collator(batch):
        out = collate(batch)
        counted["tokens"] += int(out["attention_mask"].sum()) if "attention_mask" in out else int(out["input_ids"].numel())
        return out

    trainer.data_collator = counting_collator
    step_times = StepTimes()
    trainer.add_callback(step_times)
    with measure() as loop:
        trainer.train()
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    trainable, total = count_parameters(model)
    metrics = {
        "peak_gpu_alloc_gib": loop.peak_gpu_alloc_gib, "peak_gpu_reserved_gib": loop.peak_gpu_reserved_gib,
        "train_time_s": loop.seconds, "tokens_trained": counted["tokens"],
        "tokens_per_s": counted["tokens"] / loop.seconds, "optimizer_steps": trainer.state.global_step,
        "trainable_params": trainable, "total_params": total, **step_times.summary(),
        "loss_curve": [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e],
    }
    return {"metrics": metrics, "rows": len(texts), "mean_seq": statistics.fmean(lengths), "max_seq_length": 1024}


def _reference_model(kind: str, path: str, method):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    lora = LoraConfig(r=method.lora.r, lora_alpha=method.lora.alpha, lora_dropout=method.lora.dropout, bias="none",
                      task_type="CAUSAL_LM", target_modules=list(method.lora.target_modules))
    if kind == "qlora":
        # fp16 compute: the study's code (its report states bf16, which the seed and our profiles use).
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method.quant.quant_type,
                                   bnb_4bit_use_double_quant=method.quant.double_quant,
                                   bnb_4bit_compute_dtype=torch.float16)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                     attn_implementation="eager", device_map={"": 0})
        model = get_peft_model(prepare_model_for_kbit_training(model), lora)
        return model, (None, None), method.optimizer
    if kind == "lora":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
        model.enable_input_require_grads()
        return get_peft_model(model, lora), (None, None), method.optimizer
    if kind == "galore":
        from galore_torch import GaLoreAdamW

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager").cuda()
        plain = ("bias", "norm", "ln")
        projected = [p for n, p in model.named_parameters() if not any(k in n for k in plain)]
        rest = [p for n, p in model.named_parameters() if any(k in n for k in plain)]
        settings = method.galore
        groups = [{"params": projected, "rank": settings.rank, "update_proj_gap": settings.update_proj_gap,
                   "scale": settings.scale, "proj_type": settings.proj_type, "weight_decay": method.weight_decay},
                  {"params": rest, "weight_decay": 0.0}]
        return model, (GaLoreAdamW(groups, lr=method.lr, no_deprecation_warning=True), None), "adamw_torch"
    raise UserError(f"no reference recipe for method '{kind}' (qlora, lora, galore)")
