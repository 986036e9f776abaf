"""Tests for peftlab.report on a synthetic run directory (no training, no model weights)."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from peftlab.cli import main
from peftlab.config import dump_config, load_config
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
        "exact_match": round(bleu * 100) / n,
        "exact_match_ci": [0.0, 0.5],
        "exact_match_count": round(bleu * 100),
        "exact_match_norm": round(rouge * 40) / n,
        "exact_match_norm_ci": [0.0, 0.9],
        "exact_match_norm_count": round(rouge * 40),
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
    # without "metrics" in results.json, ROUGE-L leads: its delta vs base, absolute and relative
    assert "+0.0777 (+47.6%)" in rows["QLoRA"]
    assert "[0.0392, 0.0642]" in rows["Base"]  # CI
    # exact match and normalised exact match for every model, with the matching rows
    assert "0.4167 (5/12)" in rows["Base"] and "0.5833 (7/12)" in rows["Base"]
    assert quality.index("| ROUGE-L | BLEU-4 |") < quality.index("| Exact match | Normalised EM |")


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


def test_findings_and_pairwise_significance(built: tuple[Path, dict[str, Path]]) -> None:
    markdown = (built[0] / "report.md").read_text(encoding="utf-8")
    findings = _section(markdown, "Headline findings")
    assert "Every fine-tuned model beats Base on ROUGE-L and BLEU-4" in findings
    assert "Lowest peak GPU memory: QLoRA, 3.10 GiB" in findings
    assert "Fastest training: QLoRA" in findings
    assert " vs " not in findings.replace("(vs ", "")  # the pairwise tests have their own section
    pairwise = _section(markdown, "Pairwise significance")
    assert "Paired bootstrap, 1,000 resamples" in pairwise
    # this results.json predates Holm: the raw p-values are shown and said to be uncorrected
    assert "not corrected for multiple comparisons" in pairwise and "Holm p" not in pairwise
    assert "| QLoRA | GaLore | 0.0934 | 0.0871 | +0.0063 [−0.0037, 0.0163] | 0.31 | no |" in pairwise
    assert "| QLoRA | Hybrid | 0.0934 | 0.1012 | −0.0078 [−0.0178, 0.0022] | 0.048 | **yes** |" in pairwise


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
    assert 5 <= examples.count("<summary><b>Example") <= 10
    assert examples.count("<details open>") == 1 and examples.count("</details>") == examples.count("<details")
    assert {s for s in SOURCES if f"· {s} ·" in examples} == set(SOURCES)
    # collapsible and capped in height in the HTML page
    assert html.count('<details class="example"') == examples.count("<details") and "max-height:15em" in html


def test_cpu_run_says_gpu_memory_is_na(tmp_path: Path) -> None:
    run = make_run(tmp_path, gpu=False)
    written = build_report(run)
    markdown = (run / "report.md").read_text(encoding="utf-8")
    assert "peak GPU memory is n/a" in _section(markdown, "Headline findings")
    assert "plots/memory_vs_quality.png" in written
    resources = _section(markdown, "Resources")
    assert "No GPU in this run" in resources and "Generation speed (CPU)" in resources
    for gpu_only in ("Graph replays", "Out of GPU memory", "GPU alloc", "n/a (CPU)"):
        assert gpu_only not in resources
    assert "RSS memory budget" in _section(markdown, "Recommendation")


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
    with pytest.raises(UserError, match=r"no results\.json; `peftlab report .*` rebuilds it"):
        build_report(tmp_path)
    assert not (tmp_path / "report.md").exists()


def test_without_comparisons_claims_no_significance(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    results = json.loads((run / "results.json").read_text())
    results["comparisons"] = []
    (run / "results.json").write_text(json.dumps(results))
    build_report(run)
    findings = _section((run / "report.md").read_text(encoding="utf-8"), "Headline findings")
    assert "beats Base on ROUGE-L and BLEU-4 (no significance tests against Base" in findings
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


# ------------------------------------------------------------------------------ recommendation (no plots)


def _run_data(quality: dict[str, float], peaks: dict[str, float], p_holm: dict[tuple[str, str], float],
              seeds: dict[str, list[float]] | None = None) -> Any:
    """A RunData built straight from a synthetic results dict (ROUGE-L only)."""
    from peftlab.report.load import RunData

    models = {}
    for name, value in quality.items():
        entry: dict[str, Any] = {"n": 100, "rougeL": value, "rougeL_ci": [value - 0.02, value + 0.02]}
        if seeds and name in seeds:
            values = seeds[name]
            mean = sum(values) / len(values)
            sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
            entry = {"n": 100, "rougeL": mean, "rougeL_sd": sd, "n_seeds": len(values),
                     "seeds": {str(42 + i): {"n": 100, "rougeL": v} for i, v in enumerate(values)}}
        models[name] = entry
    comparisons = [
        {"a": a, "b": b, "metric": "rougeL", "diff": quality[a] - quality[b], "p_value": p / 2, "p_holm": p,
         "ci": [0.0, 0.0]}
        for (a, b), p in p_holm.items()
    ]
    results = {"metrics": ["rougeL"], "models": models, "comparisons": comparisons,
               "training": {m: {"peak_gpu_alloc_gib": v, "gpu_name": "H100", "device": "cuda"} for m, v in peaks.items()}}
    run = RunData(Path("run"), results, models, results["training"], {}, {}, None, {})
    run.names = list(models)
    return run


def test_recommendation_picks_the_best_method_under_each_budget() -> None:
    from peftlab.report.recommend import budget_table, recommendation_sentence, verdict

    run = _run_data(
        {"base": 0.10, "qlora": 0.20, "galore": 0.23, "hybrid": 0.21},
        {"qlora": 1.45, "galore": 3.45, "hybrid": 3.76},
        {("galore", "qlora"): 0.01, ("galore", "hybrid"): 0.40, ("hybrid", "qlora"): 0.60,
         ("qlora", "base"): 0.001, ("galore", "base"): 0.001, ("hybrid", "base"): 0.001},
    )
    peaks = {"qlora": 1.45, "galore": 3.45, "hybrid": 3.76}
    rows = budget_table(run, peaks, "rougeL", {}).rows
    assert [(r[0], r[2].text) for r in rows] == [("≤ 1.45 GiB", "QLoRA"), ("≤ 3.45 GiB", "GaLore"),
                                                 ("≤ 3.76 GiB", "GaLore")]
    assert rows[0][5] == "only QLoRA fits"
    assert rows[1][5].startswith("GaLore scores significantly higher than QLoRA on ROUGE-L (+0.0300")
    assert "Holm-adjusted p=0.010" in rows[1][5]
    assert rows[2][5].startswith("GaLore and Hybrid do not differ significantly on ROUGE-L (+0.0200, p=0.20")
    # GaLore is significantly better than the cheaper QLoRA and no worse than anything: it is the pick
    assert recommendation_sentence(run, peaks, "rougeL").startswith("Recommendation: GaLore, the highest ROUGE-L")
    # when QLoRA's deficit is not significant, the cheapest method within noise of the best is recommended
    run.results["comparisons"][0]["p_holm"] = 0.2
    assert recommendation_sentence(run, peaks, "rougeL").startswith(
        "Recommendation: QLoRA (1.45 GiB GPU peak, ROUGE-L 0.2000): GaLore scores higher (0.2300) but not significantly")
    assert verdict(run, "qlora", "galore", "rougeL").better == "galore"


def test_seed_spread_decides_when_several_seeds() -> None:
    from peftlab.report.recommend import verdict

    run = _run_data({"qlora": 0.20, "galore": 0.22, "hybrid": 0.30}, {"qlora": 1.0, "galore": 2.0, "hybrid": 3.0},
                    {("galore", "qlora"): 0.001},
                    seeds={"qlora": [0.19, 0.20, 0.23], "galore": [0.21, 0.22, 0.25], "hybrid": [0.29, 0.30, 0.31]})
    within = verdict(run, "galore", "qlora", "rougeL")
    assert within.significant is False  # the bootstrap says p=0.001, but the seed ranges overlap
    assert "seed ranges 0.2100–0.2500 and 0.1900–0.2300 overlap" in within.text
    beyond = verdict(run, "hybrid", "galore", "rougeL")
    assert beyond.significant is True and "exceeds the spread between seeds" in beyond.text


def test_seed_repeats_section(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    results = json.loads((run / "results.json").read_text())
    for name, values in {"qlora": [0.23, 0.24, 0.25], "galore": [0.20, 0.21, 0.26]}.items():
        entry = results["models"][name]
        entry["seeds"] = {str(42 + i): {**entry, "rougeL": v} for i, v in enumerate(values)}
        entry.update(rougeL=sum(values) / 3, rougeL_sd=0.01, n_seeds=3)
    results["metrics"] = ["rougeL", "bleu4"]
    (run / "results.json").write_text(json.dumps(results))
    build_report(run)
    markdown = (run / "report.md").read_text(encoding="utf-8")
    seeds = _section(markdown, "Seed repeats")
    assert "| QLoRA | 3 | 0.2400 | 0.0100 | 0.2300–0.2500 | 0.2300, 0.2400, 0.2500 |" in seeds
    assert "| QLoRA | GaLore | +0.0167 | no |" in seeds
    assert "0.2400 ± 0.0100 SD, 3 seeds" in _section(markdown, "Quality")


def test_hybrid_recipe_row_shows_each_stage(built: tuple[Path, dict[str, Path]]) -> None:
    reproduce = _section((built[0] / "report.md").read_text(encoding="utf-8"), "Reproduce")
    row = next(line for line in reproduce.splitlines() if line.startswith("| Hybrid |"))
    assert "QLoRA 1 epoch + GaLore 40 steps" in row and "QLoRA 0.0002, GaLore 1e-05" in row
    assert "3 epochs" not in row and "QLoRA → merge → GaLore" in row


def test_budget_flags_and_training_time_with_merge(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    hybrid = json.loads((run / "train" / "hybrid" / "metrics.json").read_text())
    hybrid["train_time_s"] -= 12.5  # as the hybrid records it: its training stages only
    hybrid["optimizer_steps"] = 9
    hybrid["stages"][0]["optimizer_steps"], hybrid["stages"][2]["optimizer_steps"] = 4, 5
    (run / "train" / "hybrid" / "metrics.json").write_text(json.dumps(hybrid))
    build_report(run)
    markdown = (run / "report.md").read_text(encoding="utf-8")
    assert "Unequal training budgets" in _section(markdown, "Recommendation")
    assert "optimizer steps QLoRA 40, GaLore 40, Hybrid 9 (4 + 5)" in _section(markdown, "Recommendation")
    assert "the times are for unequal budgets" in _section(markdown, "Headline findings")
    resources = _section(markdown, "Resources")
    hybrid_row = next(line for line in resources.splitlines() if line.startswith("| Hybrid | hybrid"))
    assert "1,686 s (28.1 min)" in hybrid_row  # 620 + 12.5 merge + 1,054


def test_reproduce_gives_the_exact_command(tmp_path: Path) -> None:
    from peftlab.config import BUILTIN_CONFIG_DIR

    run = make_run(tmp_path)
    (run / "env.json").write_text(json.dumps({
        "config_file": str(BUILTIN_CONFIG_DIR / "samples.yaml"),
        "command": "__main__.py study configs/samples.yaml --out /tmp/study --set data.seed=7 "
                   "--set evaluate.batch_size=128",
    }))
    build_report(run)
    code = _section((run / "report.md").read_text(encoding="utf-8"), "Reproduce")
    assert ("peftlab study samples \\\n  --set data.seed=7 \\\n  --set evaluate.batch_size=128 \\\n"
            "  --out /tmp/study\npeftlab report /tmp/study") in code


# ------------------------------------------------------------------ peftlab report DIR: rebuild results.json


def test_report_rebuilds_results_json_from_the_stage_outputs(tmp_path: Path, capsys) -> None:
    run = make_run(tmp_path)
    ensemble = json.loads((run / "results.json").read_text())["ensemble"]
    (run / "results.json").unlink()
    path = run / "eval" / "ensemble" / "metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "ensemble": ensemble}))  # as evaluate writes it
    (run / "config.resolved.yaml").write_text(dump_config(load_config("smoke")), encoding="utf-8")
    # an evaluation from before exact match: scored from its predictions instead
    path = run / "eval" / "galore" / "metrics.json"
    metrics = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("exact_match")}
    path.write_text(json.dumps(metrics))

    assert main(["report", str(run)]) == 0
    assert "rebuilt" in capsys.readouterr().err
    results = json.loads((run / "results.json").read_text())
    assert results["schema"] == 2 and results["metrics"] == ["rougeL", "bleu4", "exact_match_norm"]
    assert set(results["models"]) == {"base", "qlora", "galore", "hybrid", "ensemble"}
    galore = results["models"]["galore"]
    # galore's answers are the reference's first 8-10 words: never an exact match, by either rule
    assert galore["exact_match"] == 0.0 and galore["exact_match_norm_count"] == 0
    assert galore["per_source"]["tulu"]["exact_match_norm"] == 0.0
    # 5 models -> 10 pairs per metric, each family Holm-corrected on its own
    assert results["multiple_comparisons"]["tests"] == {"rougeL": 10, "bleu4": 10, "exact_match_norm": 10}
    assert all(c["p_holm"] >= c["p_value"] for c in results["comparisons"])
    assert results["ensemble"]["alpha"] == 0.5 and results["training"]["hybrid"]["merge_time_s"] == 12.5
    assert (run / "report.md").read_text(encoding="utf-8").split("\n## ")[1].startswith("Recommendation")


def test_report_without_results_or_config_says_what_to_run(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"no results.json and no config.resolved.yaml to rebuild it from; run `peftlab study CONFIG --out {tmp_path}`" in err
    (tmp_path / "config.resolved.yaml").write_text(dump_config(load_config("smoke")), encoding="utf-8")
    assert main(["report", str(tmp_path)]) == 2
    assert "no evaluated model; run `peftlab evaluate CONFIG --model base" in capsys.readouterr().err


def test_report_upgrades_an_older_results_json_without_predictions(tmp_path: Path, capsys) -> None:
    run = make_run(tmp_path)
    for path in (run / "eval").glob("*/predictions.jsonl"):
        path.unlink()
    env_path = run / "env.json"  # what an older peftlab left beside its results (it wrote no .peftlab-run)
    env = json.loads(env_path.read_text()) if env_path.exists() else {}
    env_path.write_text(json.dumps({"versions": {}, "command": "peftlab study", **env}))
    assert main(["report", str(run)]) == 0
    assert "Holm-adjusted p-values added" in capsys.readouterr().err
    results = json.loads((run / "results.json").read_text())
    assert results["schema"] == 2 and results["metrics"] == ["rougeL", "bleu4"]
    # per metric: 4 pairs with Base at p=0.002, then 0.0021, 0.048, three at 0.2 and 0.31 (Holm by hand)
    p_holm = {(c["a"], c["b"], c["metric"]): c["p_holm"] for c in results["comparisons"]}
    assert p_holm[("ensemble", "base", "bleu4")] == pytest.approx(0.02)
    assert p_holm[("ensemble", "galore", "rougeL")] == pytest.approx(0.02)  # 6 x 0.0021 < 0.02: monotone
    assert p_holm[("hybrid", "qlora", "bleu4")] == pytest.approx(0.24)
    assert p_holm[("galore", "qlora", "bleu4")] == pytest.approx(0.8)
    pairwise = (run / "report.md").read_text(encoding="utf-8").split("## Pairwise significance")[1]
    assert "Holm's step-down correction within each metric" in pairwise
    assert "| QLoRA | Hybrid | 0.0934 | 0.1012 | −0.0078 [−0.0178, 0.0022] | 0.048 | 0.24 | no |" in pairwise


def test_aggregate_seeds_shape() -> None:
    from peftlab.results import aggregate_seeds

    def entry(rouge: float, peak: float) -> dict[str, Any]:
        return {"n": 12, "rougeL": rouge, "rougeL_ci": [rouge - 0.1, rouge + 0.1], "peak_gpu_alloc_gib": peak,
                "generation": {"tokens_per_s": 10.0}, "per_source": {"a": {"n": 6, "rougeL": rouge / 2}}}

    one = entry(0.2, 1.0)
    assert aggregate_seeds({42: one}) == one  # one seed: nothing changes
    merged = aggregate_seeds({42: entry(0.2, 1.0), 43: entry(0.3, 1.5), 44: entry(0.4, 1.2)})
    assert merged["n_seeds"] == 3 and list(merged["seeds"]) == ["42", "43", "44"]
    assert merged["rougeL"] == pytest.approx(0.3) and merged["rougeL_sd"] == pytest.approx(0.1)
    assert "rougeL_ci" not in merged and merged["n"] == 12 and merged["peak_gpu_alloc_gib"] == 1.5
    assert merged["per_source"]["a"]["rougeL"] == pytest.approx(0.15)
    assert merged["per_source"]["a"]["rougeL_sd"] == pytest.approx(0.05)
    assert merged["seeds"]["43"]["rougeL_ci"] == pytest.approx([0.2, 0.4])


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


def test_the_execution_cell_names_the_levers_that_ran():
    from peftlab.report.sections.resources import _execution_cell

    fast = {"execution": {"mode": "fast", "padding_free": True, "attention": "peftlab_varlen", "graph_tokens": 4096,
                          "graphs": {"captured": True}, "liger_kernel": True, "gradient_checkpointing": False}}
    assert _execution_cell(fast) == "fast · padding-free · peftlab_varlen · CUDA graphs · liger"
    eager = {"execution": {"mode": "as_written", "padding_free": True, "attention": "sdpa", "graph_tokens": 256,
                           "graphs": {"captured": False}, "gradient_checkpointing": True}}
    assert _execution_cell(eager) == "as written · padding-free · sdpa · bins · checkpointing"
    llama = {"execution": {"mode": "fast", "padding_free": True, "attention": "peftlab_varlen", "graph_tokens": 4096,
                           "graphs": {"captured": True, "fused_lora_layers": 224}, "liger_kernel": False,
                           "liger_cross_entropy": True}}
    assert _execution_cell(llama) == "fast · padding-free · peftlab_varlen · CUDA graphs · liger loss · fused LoRA adds"
    hybrid = {"stages": [fast, {"kind": "merge"}, fast]}
    assert _execution_cell(hybrid) == "fast · padding-free · peftlab_varlen · CUDA graphs · liger"
