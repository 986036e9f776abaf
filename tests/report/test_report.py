"""Tests for peftlab.report on a synthetic run directory (no training, no model weights)."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from peftlab.errors import UserError
from peftlab.report import build_report

SOURCES = ("alpaca", "tulu", "ultrachat")
MODELS = ("base", "qlora", "galore", "hybrid", "ensemble")
ROWS_PER_SOURCE = 4
SCRIPT = "<script>alert('x')</script>"

QUALITY = {
    "base": (0.0512, 0.1634),
    "qlora": (0.0934, 0.2411),
    "galore": (0.0871, 0.2298),
    "hybrid": (0.1012, 0.2507),
    "ensemble": (0.0968, 0.2473),
}
P_VALUES = {("qlora", "galore"): 0.31, ("hybrid", "qlora"): 0.048, ("ensemble", "galore"): 0.0021}


# --------------------------------------------------------------------------------------------- fixture


def _write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def _prompt(turns: list[str]) -> str:
    text = "<bos>"
    for i, turn in enumerate(turns):
        text += f"<start_of_turn>user\n{turn}<end_of_turn>\n"
        if i < len(turns) - 1:
            text += f"<start_of_turn>model\nAnswer {i}.<end_of_turn>\n"
    return text + "<start_of_turn>model\n"


def _rows() -> list[dict[str, Any]]:
    rows = []
    for source, i in itertools.product(SOURCES, range(ROWS_PER_SOURCE)):
        turns = [f"Explain topic {i} of {source} in one sentence, please."]
        if source == "ultrachat":
            turns.append(f"Now give a follow-up detail about topic {i}.")
        reference = f"Topic {i} of {source} is about apples, oranges and careful measurement number {i}."
        rows.append(
            {
                "id": f"{source}-{i}",
                "source_dataset": source,
                "prompt": _prompt(turns),
                "reference": reference,
            }
        )
    return rows


def _prediction(model: str, row: dict[str, Any], index: int) -> str:
    if model == "base":
        return SCRIPT if index == 0 else f"I am not sure what {row['source_dataset']} means."
    words = row["reference"].split()
    keep = {"qlora": 9, "galore": 8, "hybrid": 11, "ensemble": 10}[model] + index % 3
    return " ".join(words[:keep]) + (" `code` | pipe" if model == "hybrid" and index == 1 else "")


def _summary(bleu: float, rouge: float, n: int) -> dict[str, Any]:
    return {
        "n": n,
        "bleu4": bleu,
        "bleu4_ci": [bleu - 0.012, bleu + 0.013],
        "rougeL": rouge,
        "rougeL_ci": [rouge - 0.021, rouge + 0.02],
        "rouge1": rouge + 0.03,
        "rouge2": rouge / 2,
    }


def _quality(model: str, quality: dict[str, tuple[float, float]], n: int) -> dict[str, Any]:
    bleu, rouge = quality[model]
    per_source = {
        source: _summary(bleu * (0.8 + 0.2 * k), rouge * (0.9 + 0.1 * k), ROWS_PER_SOURCE)
        for k, source in enumerate(SOURCES)
    }
    return {**_summary(bleu, rouge, n), "per_source": per_source}


def _comparisons(quality: dict[str, tuple[float, float]]) -> list[dict[str, Any]]:
    items = []
    for a, b in itertools.combinations(MODELS[::-1], 2):
        for k, metric in enumerate(("bleu4", "rougeL")):
            diff = quality[a][k] - quality[b][k]
            p = P_VALUES.get((a, b), P_VALUES.get((b, a), 0.002 if b == "base" else 0.2))
            items.append(
                {
                    "a": a,
                    "b": b,
                    "metric": metric,
                    "diff": diff,
                    "p_value": p,
                    "ci": [diff - 0.01, diff + 0.01],
                }
            )
    return items


def _training(method: str, kind: str, gpu: bool, scale: float) -> dict[str, Any]:
    return {
        "method": method,
        "kind": kind,
        "device": "cuda" if gpu else "cpu",
        "gpu_name": "NVIDIA H200" if gpu else None,
        "dtype": "bfloat16",
        "optimizer": "adamw_torch",
        "peak_gpu_alloc_gib": 3.1 * scale if gpu else None,
        "peak_gpu_reserved_gib": 3.6 * scale if gpu else None,
        "peak_rss_gib": 2.2 * scale,
        "model_load_s": 4.0,
        "data_load_s": 1.0,
        "train_time_s": 620.0 * scale,
        "tokens_trained": 1_200_000,
        "tokens_per_s": 1900.0 / scale,
        "optimizer_steps": 40,
        "trainable_params": int(1_490_000 * scale) if kind != "galore" else 268_098_176,
        "total_params": 268_098_176,
        "final_loss": 1.2 / scale,
    }


def _loss(n: int, start: float, stage: str | None = None) -> list[dict[str, Any]]:
    curve = [{"step": s, "loss": start * 0.97**s + 0.05 * (s % 3)} for s in range(1, n + 1)]
    return [{**p, "stage": stage} for p in curve] if stage else curve


def make_run(root: Path, *, worse: bool = False, gpu: bool = True) -> Path:
    """A complete synthetic run directory: data/, train/, eval/, results.json, env.json."""
    run = root / "run"
    quality = dict(QUALITY)
    if worse:
        quality["galore"] = (0.0400, 0.2298)
    rows = _rows()
    n = len(rows)
    for model in MODELS:
        preds = [
            {**row, "prediction": _prediction(model, row, i % ROWS_PER_SOURCE), "generated_tokens": 12}
            for i, row in enumerate(rows)
        ]
        (run / "eval" / model).mkdir(parents=True)
        (run / "eval" / model / "predictions.jsonl").write_text(
            "".join(json.dumps(p) + "\n" for p in preds), encoding="utf-8"
        )
        metrics = {
            "model": model,
            "limit": None,
            **_quality(model, quality, n),
            "generation": {
                "seconds": 10.0,
                "generated_tokens": 144,
                "tokens_per_s": 14.4,
                "max_new_tokens": 256,
                "batch_size": 8,
                # qlora as the static decoder records it; the others as plain `generate` did.
                **({"decoder_kind": "static", "decoder": {"batches": 2, "decode_steps": 30, "graph_steps": 26,
                                                          "cuda_graph_fallback": []}} if model == "qlora" else {}),
            },
        }
        _write(run / "eval" / model / "metrics.json", metrics)
    ensemble = {
        "members": ["qlora", "galore"],
        "alpha": 0.5,
        "mode": "logprob",
        "validation": [
            {"alpha": a, "bleu4": 0.08 + a / 50 - a * a / 40, "rougeL": 0.22 + a / 20 - a * a / 20}
            for a in (0.0, 0.25, 0.5, 0.75, 1.0)
        ],
    }
    training = {
        "qlora": _training("qlora", "qlora", gpu, 1.0),
        "galore": _training("galore", "galore", gpu, 1.7),
        "hybrid": _training("hybrid", "hybrid", gpu, 2.4),
    }
    training["qlora"]["loss_curve"] = _loss(40, 2.5)
    training["galore"]["loss_curve"] = _loss(40, 2.4)
    training["hybrid"]["loss_curve"] = _loss(20, 2.5, "qlora") + _loss(20, 1.6, "galore")
    training["hybrid"]["merge_time_s"] = 12.5
    training["hybrid"]["train_time_s"] = (
        training["qlora"]["train_time_s"] + 12.5 + training["galore"]["train_time_s"]
    )
    training["hybrid"]["stages"] = [
        {
            "stage": 0,
            "method": "qlora",
            **{
                k: training["qlora"][k]
                for k in (
                    "kind",
                    "train_time_s",
                    "peak_gpu_alloc_gib",
                    "peak_rss_gib",
                    "tokens_per_s",
                    "final_loss",
                )
            },
        },
        {"stage": 1, "method": "merge", "kind": "merge", "merge_time_s": 12.5},
        {
            "stage": 2,
            "method": "galore",
            **{
                k: training["galore"][k]
                for k in (
                    "kind",
                    "train_time_s",
                    "peak_gpu_alloc_gib",
                    "peak_rss_gib",
                    "tokens_per_s",
                    "final_loss",
                )
            },
        },
    ]
    for method, metrics in training.items():
        _write(run / "train" / method / "metrics.json", metrics)
        (run / "train" / method / "loss.csv").write_text("step,loss\n", encoding="utf-8")
    split_stats = {
        "rows": 300,
        "per_source": dict.fromkeys(SOURCES, 100),
        "tokens": 91_000,
        "mean_tokens": 303.3,
        "max_tokens": 2048,
    }
    _write(
        run / "data" / "stats.json",
        {
            "splits": {
                "train": split_stats,
                "test": {**split_stats, "rows": n, "per_source": dict.fromkeys(SOURCES, 4)},
            },
            "sources": {
                s: {
                    "train": {
                        "sampled": 110,
                        "dropped": {"empty": 3, "too_long": 7},
                        "truncated": 2,
                        "usable": 100,
                        "selected": 100,
                    },
                    "test": {"sampled": 5, "dropped": {}, "truncated": 0, "usable": 5, "selected": 4},
                }
                for s in SOURCES
            },
        },
    )
    summary_keys = (
        "peak_gpu_alloc_gib",
        "peak_gpu_reserved_gib",
        "train_time_s",
        "tokens_per_s",
        "trainable_params",
        "total_params",
        "peak_rss_gib",
        "final_loss",
    )
    _write(
        run / "results.json",
        {
            "models": {m: _quality(m, quality, n) for m in MODELS},
            "comparisons": _comparisons(quality),
            "training": {m: {k: t[k] for k in summary_keys} for m, t in training.items()},
            "ensemble": ensemble,
            "config": {
                "name": "fixture",
                "data": {"seed": 42},
                "model": {"name_or_path": "google/gemma-3-270m-it"},
                "methods": {
                    "qlora": {
                        "kind": "qlora",
                        "epochs": 1,
                        "lr": 2e-4,
                        "batch_size": 4,
                        "grad_accum": 4,
                        "lora": {"r": 16, "alpha": 32},
                    },
                    "galore": {
                        "kind": "galore",
                        "max_steps": 40,
                        "lr": 1e-5,
                        "batch_size": 4,
                        "grad_accum": 4,
                        "galore": {"rank": 128},
                    },
                    "hybrid": {
                        "kind": "hybrid",
                        "stages": [{"method": "qlora"}, {"method": "merge"}, {"method": "galore"}],
                    },
                },
                "evaluate": {"bootstrap_samples": 1000, "ensemble": {"select_by": "rougeL"}},
            },
            "versions": {"python": "3.11.2", "torch": "2.5.1", "transformers": "5.17.0"},
            "hardware": {"gpu": "NVIDIA H200" if gpu else None, "cpu_count": 16, "platform": "Linux-x86_64"},
        },
    )
    _write(
        run / "env.json",
        {"config_file": "configs/fixture.yaml", "command": "peftlab study configs/fixture.yaml"},
    )
    return run


def _section(markdown: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", markdown, flags=re.S | re.M)
    assert match, f"section {title!r} missing"
    return match.group(1)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    run = make_run(tmp_path_factory.mktemp("good"))
    return run, build_report(run)


# ----------------------------------------------------------------------------------------------- tests


def test_writes_all_files(built: tuple[Path, dict[str, Path]]) -> None:
    run, written = built
    expected = {
        "report.md",
        "report.html",
        "plots/quality.png",
        "plots/memory_vs_quality.png",
        "plots/loss.png",
        "plots/training_speed.png",
        "plots/per_source.png",
    }
    assert set(written) == expected
    for name in expected:
        path = run / name
        assert written[name] == path and path.is_file() and path.stat().st_size > 0
    assert (run / "plots" / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run.glob(".*tmp*")) and not list((run / "plots").glob(".*"))


def test_html_is_self_contained(built: tuple[Path, dict[str, Path]]) -> None:
    html = (built[0] / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in html
    assert html.count("<img ") == 5
    for external in ('src="http', "src='http", 'href="http', "<link", "@import", "url("):
        assert external not in html
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', html))


def test_quality_table_has_formatted_scores(built: tuple[Path, dict[str, Path]]) -> None:
    quality = _section((built[0] / "report.md").read_text(encoding="utf-8"), "Quality")
    rows = {
        line.split("|")[1].strip().strip("*"): line for line in quality.splitlines() if line.startswith("| ")
    }
    for model, label in (
        ("base", "Base"),
        ("qlora", "QLoRA"),
        ("galore", "GaLore"),
        ("hybrid", "Hybrid"),
        ("ensemble", "Ensemble"),
    ):
        assert f"{QUALITY[model][0]:.4f}" in rows[label]
    assert "+0.0422 (+82.4%)" in rows["QLoRA"]  # delta vs base, absolute and relative
    assert "[0.0392, 0.0642]" in rows["Base"]  # CI


def test_resources_show_generation_speed_and_decoder(built: tuple[Path, dict[str, Path]]) -> None:
    resources = _section((built[0] / "report.md").read_text(encoding="utf-8"), "Resources")
    assert "Graph replays / decoding steps" in resources
    rows = {line.split("|")[1].strip().strip("*"): line for line in resources.splitlines()
            if line.startswith("| ") and "14.4" in line}
    assert "static" in rows["QLoRA"] and "26 / 30" in rows["QLoRA"]
    assert "generate" in rows["Base"] and "| no" in rows["Base"]
    assert rows["QLoRA"].rstrip().endswith("| no |")  # no out-of-memory retries recorded


def test_generation_speed_without_training_and_with_odd_records(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    for path in (run_dir / "train").glob("*/metrics.json"):
        path.unlink()
    results = json.loads((run_dir / "results.json").read_text())
    results["training"] = {}
    (run_dir / "results.json").write_text(json.dumps(results))
    metrics_path = run_dir / "eval" / "qlora" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["generation"].update(decoder_kind=7, decoder={"graph_steps": 3, "decode_steps": 4,
                                                          "cuda_graph_fallback": "RuntimeError: capture",
                                                          "out_of_memory_step_downs": 2})
    metrics_path.write_text(json.dumps(metrics))
    build_report(run_dir)
    resources = _section((run_dir / "report.md").read_text(encoding="utf-8"), "Resources")
    assert "No training metrics found" in resources and "Graph replays / decoding steps" in resources
    assert "yes: RuntimeError: capture" in resources and "3 / 4" in resources
    assert "2 step-downs, 0 eager batches" in resources


def test_findings_mention_comparisons_with_p_values(built: tuple[Path, dict[str, Path]]) -> None:
    findings = _section((built[0] / "report.md").read_text(encoding="utf-8"), "Headline findings")
    assert "QLoRA vs GaLore: BLEU-4: +0.0063, p=0.31, not significant" in findings
    assert "QLoRA vs Hybrid: BLEU-4: −0.0078, p=0.048, significant" in findings
    assert "paired bootstrap, 1,000 resamples" in findings
    assert "Every fine-tuned model beats Base on BLEU-4 and ROUGE-L" in findings
    assert "Lowest peak GPU memory: QLoRA, 3.10 GiB" in findings
    assert "Fastest training: QLoRA" in findings


def test_beats_base_only_when_true(tmp_path: Path) -> None:
    run = make_run(tmp_path, worse=True)
    build_report(run)
    markdown = (run / "report.md").read_text(encoding="utf-8")
    assert "beats Base" not in markdown
    assert "GaLore does not beat Base on BLEU-4 (0.0400 vs 0.0512" in _section(markdown, "Headline findings")


def test_html_escapes_model_output(built: tuple[Path, dict[str, Path]]) -> None:
    html = (built[0] / "report.html").read_text(encoding="utf-8")
    assert "<script" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    markdown = (built[0] / "report.md").read_text(encoding="utf-8")
    assert SCRIPT in markdown  # inside a fenced block, where it is literal
    examples = _section(markdown, "Qualitative examples")
    assert 5 <= examples.count("### Example") <= 10
    assert {s for s in SOURCES if f"· {s} ·" in examples} == set(SOURCES)


def test_cpu_run_says_gpu_memory_is_na(tmp_path: Path) -> None:
    run = make_run(tmp_path, gpu=False)
    written = build_report(run)
    markdown = (run / "report.md").read_text(encoding="utf-8")
    assert "peak GPU memory is n/a" in _section(markdown, "Headline findings")
    assert "n/a (CPU)" in _section(markdown, "Resources")
    assert "plots/memory_vs_quality.png" in written


def test_partial_results(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    shutil.rmtree(run / "train" / "galore")
    shutil.rmtree(run / "eval" / "hybrid")
    (run / "data" / "stats.json").unlink()
    results = json.loads((run / "results.json").read_text())
    del results["models"]["hybrid"], results["training"]["galore"], results["ensemble"]
    results["comparisons"] = [c for c in results["comparisons"] if "hybrid" not in (c["a"], c["b"])]
    (run / "results.json").write_text(json.dumps(results))
    hybrid = json.loads((run / "train" / "hybrid" / "metrics.json").read_text())
    hybrid["loss_curve"] = []
    hybrid["peak_gpu_alloc_gib"] = None
    (run / "train" / "hybrid" / "metrics.json").write_text(json.dumps(hybrid))
    written = build_report(run)
    markdown = (run / "report.md").read_text(encoding="utf-8")
    assert "report.html" in written and "plots/loss.png" in written
    assert "No data/stats.json" in markdown
    assert "| Hybrid |" in _section(markdown, "Resources")


def test_missing_results_raises_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no results\.json; run `peftlab study`"):
        build_report(tmp_path)
    assert not (tmp_path / "report.md").exists()


def test_without_comparisons_claims_no_significance(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    results = json.loads((run / "results.json").read_text())
    results["comparisons"] = []
    (run / "results.json").write_text(json.dumps(results))
    build_report(run)
    findings = _section((run / "report.md").read_text(encoding="utf-8"), "Headline findings")
    assert "beats Base on BLEU-4 and ROUGE-L (no significance tests against Base" in findings
    assert " significant" not in findings.replace("no significance", "")
    assert "p=" not in findings


def test_report_is_deterministic(built: tuple[Path, dict[str, Path]]) -> None:
    run, _ = built
    first = (run / "report.md").read_text(encoding="utf-8")
    build_report(run)
    assert (run / "report.md").read_text(encoding="utf-8") == first


def test_helpers() -> None:
    from peftlab.report.examples import last_user_turn
    from peftlab.report.render_md import escape, fence

    assert last_user_turn(_prompt(["first", "second <b>"])) == ("second <b>", 2)
    assert last_user_turn("plain text") == ("plain text", 0)
    assert fence("a ```` b").startswith("`````text\n")
    assert (
        escape("a|b *c* <script> p < 0.05 snake_case _x") == r"a\|b \*c\* \<script> p < 0.05 snake_case \_x"
    )


def test_other_templates_and_the_decoder_fallback_are_reported(tmp_path: Path) -> None:
    """Predictions of a ChatML model: the examples show the recorded last user message (no Gemma
    parsing), and a model decoded with `generate` because the static decoder lacks its architecture
    says so in the generation table."""
    run_dir = make_run(tmp_path)
    for path in (run_dir / "eval").glob("*/predictions.jsonl"):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        for row in rows:
            row["prompt"] = f"<|im_start|>user\nChatML question {row['id']}<|im_end|>\n<|im_start|>assistant\n"
            row["last_user"], row["user_turns"] = f"ChatML question {row['id']}", 3
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    metrics_path = run_dir / "eval" / "galore" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["generation"].update(decoder_kind="generate",
                                 decoder_fallback="static decoder not checked for gpt2 (only llama): decoded with generate")
    metrics_path.write_text(json.dumps(metrics))
    build_report(run_dir)
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    resources = _section(report, "Resources")
    galore = next(line for line in resources.splitlines() if line.startswith("| ") and "GaLore" in line
                  and "14.4" in line)
    assert "generate (static decoder not checked for gpt2" in galore
    assert "ChatML question" in report and "last user turn of 3" in report and "<|im_start|>" not in report
