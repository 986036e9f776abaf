"""The reference recipe the bench compares with: the original study's TRL `SFTTrainer` run with a
plain `TrainingArguments` (micro-batches of 4 x 4 accumulation, activation checkpointing, eager
attention, fp16 QLoRA compute), on the same workload rows as our profiles."""

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
        output_dir=str(Path(spec.work_dir) / "ref"), per_device_train_batch_size=4, gradient_accumulation_steps=4,
        num_train_epochs=1, max_steps=spec.max_steps, weight_decay=0.01, warmup_steps=100,
        lr_scheduler_type="cosine", bf16=True, gradient_checkpointing=True, seed=42, learning_rate=method.lr,
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

    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    if kind == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float16)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                     attn_implementation="eager", device_map={"": 0})
        model = get_peft_model(prepare_model_for_kbit_training(model), lora)
        return model, (None, None), "paged_adamw_8bit"
    if kind == "lora":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
        model.enable_input_require_grads()
        return get_peft_model(model, lora), (None, None), "adamw_torch"
    if kind == "galore":
        from galore_torch import GaLoreAdamW

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager").cuda()
        plain = ("bias", "norm", "ln")
        projected = [p for n, p in model.named_parameters() if not any(k in n for k in plain)]
        rest = [p for n, p in model.named_parameters() if any(k in n for k in plain)]
        groups = [{"params": projected, "rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std",
                   "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}]
        return model, (GaLoreAdamW(groups, lr=method.lr, no_deprecation_warning=True), None), "adamw_torch"
    raise UserError(f"no reference recipe for method '{kind}' (qlora, lora, galore)")
