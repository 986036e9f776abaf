"""Resources section of the report: training time, memory and execution per method (with the stage
breakdown of multi-stage recipes) and generation speed per evaluated model.
"""

from __future__ import annotations

from typing import Any

from peftlab.report import fmt
from peftlab.report.doc import Paragraph, Table
from peftlab.report.fmt import display, is_number
from peftlab.report.load import RunData, total_time
from peftlab.report.sections.cells import Colors, drop_empty_columns, model_cell

# ----------------------------------------------------------------------------------------- resources


def _gpu_cell(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    if is_number(value):
        return fmt.gib(value)
    return "n/a (CPU)" if str(metrics.get("device", "cpu")).startswith("cpu") else fmt.MISSING


def _execution_cell(metrics: dict[str, Any]) -> str:
    """A short account of the execution that ran (peftlab.train.execution), e.g. `fast · padding-free ·
    peftlab_varlen · CUDA graphs · liger · fused LoRA adds`; a hybrid: its stages'."""
    execution = metrics.get("execution")
    if not isinstance(execution, dict):
        stages = [s for s in metrics.get("stages") or [] if isinstance(s, dict) and isinstance(s.get("execution"), dict)]
        described = [_execution_cell(s) for s in stages]
        return " / ".join(dict.fromkeys(described)) if described else fmt.MISSING
    parts = [str(execution.get("mode", "?")).replace("_", " ")]
    if execution.get("padding_free"):
        parts.append("padding-free")
    parts.append(str(execution.get("attention", "?")))
    graphs = execution.get("graphs")
    if isinstance(graphs, dict) and graphs.get("captured"):
        parts.append("CUDA graphs")
    elif execution.get("graph_tokens"):
        parts.append("bins")
    if execution.get("liger_kernel"):
        parts.append("liger")
    elif execution.get("liger_cross_entropy"):
        parts.append("liger loss")  # a model without liger's modules: only the bins' cross-entropy
    if isinstance(graphs, dict) and graphs.get("fused_lora_layers"):
        parts.append("fused LoRA adds")
    if execution.get("gradient_checkpointing"):
        parts.append("checkpointing")
    return " · ".join(parts)


def resource_blocks(run: RunData, colors: Colors) -> list[Any]:
    speed = generation_speed_table(run, colors)
    if not run.trained:
        return [Paragraph("No training metrics found (train/<method>/metrics.json).", muted=True),
                *([speed] if speed is not None else [])]
    rows = []
    for method in run.trained:
        m = run.training[method]
        rows.append(
            [
                model_cell(method, colors),
                run.kind(method) or fmt.MISSING,
                _execution_cell(m),
                _gpu_cell(m, "peak_gpu_alloc_gib"),
                _gpu_cell(m, "peak_gpu_reserved_gib"),
                fmt.gib(m.get("peak_rss_gib")),
                fmt.duration(total_time(m)) + (" (resumed)" if m.get("resumed") else ""),
                fmt.rate(m.get("tokens_per_s")),
                fmt.count(m.get("trainable_params")),
                fmt.share(m.get("trainable_params"), m.get("total_params")),
                fmt.integer(m.get("optimizer_steps")),
                fmt.score(m.get("final_loss")),
            ]
        )
    headers = [
        "Model",
        "Kind",
        "Execution",
        "Peak GPU alloc (GiB)",
        "Peak GPU reserved (GiB)",
        "Peak RSS (GiB)",
        "Training time",
        "Tokens/s",
        "Trainable params",
        "% of total",
        "Steps",
        "Final loss",
    ]
    untrained = [display(m) for m in run.evaluated if m not in run.training]
    notes = ["GiB = 2³⁰ bytes. Peak GPU numbers are torch's allocator peaks; RSS is the training process."]
    staged = [display(m) for m in run.trained if run.training[m].get("stages")]
    if staged:
        notes.append(f"Training time of {fmt.join_names(staged)}: every stage, the merge included.")
    if untrained:
        notes.append(
            f"{fmt.join_names(untrained)}: no training run of {'their' if len(untrained) > 1 else 'its'} own."
        )
    notes.append("Execution: how peftlab ran each step (train/<method>/metrics.json `execution`); the recipe"
                 " (rows per step, learning rate, schedule, loss) is the config's.")
    table = Table(headers, rows, "lllrrrrrrrrr", notes=notes)
    if run.cpu_only:
        notes[0] = "GiB = 2³⁰ bytes. No GPU in this run: memory is the training process's peak RSS."
    blocks: list[Any] = [_without_gpu_columns(table) if run.cpu_only else table]
    for method in run.trained:
        stages = [s for s in run.training[method].get("stages") or [] if isinstance(s, dict)]
        if stages:
            stage_table = _stage_table(method, stages)
            blocks.append(_without_gpu_columns(stage_table) if run.cpu_only else stage_table)
    if speed is not None:
        blocks.append(speed)
    return blocks


def _without_gpu_columns(table: Table) -> Table:
    """The table less its GPU columns: on a run without a GPU they would only say so on every row."""
    keep = [i for i, h in enumerate(table.headers) if "GPU" not in h]
    return Table([table.headers[i] for i in keep], [[r[i] for i in keep] for r in table.rows],
                 "".join(table.align[i] for i in keep), caption=table.caption, notes=table.notes)


def generation_speed_table(run: RunData, colors: Colors) -> Table | None:
    """How fast each model's test predictions were generated, and by which decoder."""
    rows = []
    for model in run.evaluated:
        generation = run.eval_metrics.get(model, {}).get("generation")
        if not isinstance(generation, dict):
            continue
        decoder = generation.get("decoder") if isinstance(generation.get("decoder"), dict) else {}
        graphs = (f"{fmt.integer(decoder.get('graph_steps'))} / {fmt.integer(decoder.get('decode_steps'))}"
                  if decoder else fmt.MISSING)
        fallback = decoder.get("cuda_graph_fallback")
        fallback = [str(item) for item in fallback] if isinstance(fallback, list) else [str(fallback)] if fallback else []
        rows.append([
            model_cell(model, colors),
            _decoder_cell(generation, decoder),
            fmt.integer(generation.get("generated_tokens")),
            fmt.duration(generation.get("seconds")),
            fmt.rate(generation.get("tokens_per_s")),
            fmt.integer(generation.get("batch_size")),
            graphs,
            "yes: " + fmt.truncate(fallback[0], 60) if fallback else "no",
            _memory_retries(decoder),
        ])
    if not rows:
        return None
    headers = ["Model", "Decoder", "Generated tokens", "Time", "Tokens/s", "Rows per batch",
               "Graph replays / decoding steps", "Fell back to eager", "Out of GPU memory"]
    if run.cpu_only:  # CUDA graphs and GPU memory retries do not exist on a CPU
        return Table(headers[:6], [row[:6] for row in rows], "llrrrr", caption="Generation speed (CPU)",
                     notes=["Greedy decoding of the test split on the CPU. static: static KV cache, eager steps;"
                            " generate: plain model.generate."])
    notes = ["Greedy decoding of the test split. static: static KV cache, each step after a batch's first one "
             "CUDA graph replay on a GPU (eager on a CPU); generate: plain model.generate. Out of GPU memory: "
             "times decoding stepped down to fewer batches or rows, and batches decoded eagerly because their "
             "capture did not fit (lower evaluate.max_batch_tokens or concurrent_batches to avoid both)."]
    return Table(headers, rows, "llrrrrrll", caption="Generation speed and GPU decoder", notes=notes)


def _decoder_cell(generation: dict[str, Any], decoder: dict[str, Any]) -> str:
    """The decoder that ran, and why it is not the static one when evaluation fell back to `generate`."""
    kind = str(generation.get("decoder_kind") or ("static" if decoder else "generate"))
    fallback = generation.get("decoder_fallback")
    return f"{kind} ({fmt.truncate(str(fallback), 70)})" if fallback else kind


def _memory_retries(decoder: dict[str, Any]) -> str:
    step_downs, eager = decoder.get("out_of_memory_step_downs"), decoder.get("capture_out_of_memory")
    if not step_downs and not eager:
        return "no" if decoder else fmt.MISSING
    return f"{fmt.integer(step_downs or 0)} step-downs, {fmt.integer(eager or 0)} eager batches"


def _stage_table(method: str, stages: list[dict[str, Any]]) -> Table:
    rows = []
    for index, stage in enumerate(stages):
        merge = stage.get("kind") == "merge" or stage.get("method") == "merge"
        seconds = stage.get("merge_time_s") if merge else stage.get("train_time_s")
        rows.append(
            [
                str(stage.get("stage", index)),
                display(str(stage.get("method", ""))),
                str(stage.get("kind", "")),
                fmt.duration(seconds),
                _gpu_cell(stage, "peak_gpu_alloc_gib")
                if not merge
                else fmt.gib(stage.get("peak_gpu_alloc_gib")),
                fmt.gib(stage.get("peak_rss_gib")),
                fmt.rate(stage.get("tokens_per_s")),
                fmt.count(stage.get("trainable_params")),
                fmt.score(stage.get("final_loss")),
            ]
        )
    headers = [
        "Stage",
        "Method",
        "Kind",
        "Time",
        "Peak GPU alloc (GiB)",
        "Peak RSS (GiB)",
        "Tokens/s",
        "Trainable params",
        "Final loss",
    ]
    return drop_empty_columns(
        Table(headers, rows, "lllrrrrrr", caption=f"{display(method)}: stage breakdown")
    )
