"""End to end: `peftlab study smoke` writes every file of the run directory; a rerun skips all stages."""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import pytest

from peftlab.cli import main


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, gemma_tokenizer):
    """The smoke study, with what it printed on stderr and the warnings it raised."""
    out = tmp_path_factory.mktemp("study") / "smoke"
    console = io.StringIO()
    with contextlib.redirect_stderr(console), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["study", "smoke", "--out", str(out)]) == 0
    return out, console.getvalue(), caught


@pytest.fixture(scope="module")
def study(study_run):
    return study_run[0]


def test_every_file_is_written(study):
    for path in ("config.resolved.yaml", "env.json", "data/train.jsonl", "data/test.jsonl", "data/stats.json",
                 "data/validation.jsonl", "results.json", "report.md", "report.html",
                 "plots/quality.png", "plots/loss.png"):
        assert (study / path).exists(), path
    for method in ("qlora", "galore", "hybrid"):
        assert (study / "train" / method / "metrics.json").exists()
        assert (study / "train" / method / "loss.csv").exists()
    for model in ("base", "qlora", "galore", "hybrid", "ensemble"):
        assert (study / "eval" / model / "predictions.jsonl").exists()
    assert not list(study.rglob(".*.tmp-*"))


def test_results_contract(study):
    results = json.loads((study / "results.json").read_text())
    assert set(results["models"]) == {"base", "qlora", "galore", "hybrid", "ensemble"}
    for block in results["models"].values():
        assert {"bleu4", "rougeL", "n", "per_source", "exact_match", "exact_match_norm"} <= set(block)
        assert set(block["per_source"]) == {"alpaca", "tulu", "ultrachat"}
        assert "exact_match_norm_ci" in block["per_source"]["tulu"]
        assert block["n"] == 12
    for method in ("qlora", "galore", "hybrid"):
        training = results["training"][method]
        assert {"peak_gpu_alloc_gib", "peak_gpu_reserved_gib", "train_time_s", "tokens_per_s",
                "trainable_params", "total_params"} <= set(training)
    assert results["config"]["name"] == "smoke" and "torch" in results["versions"]
    pairs = {(c["a"], c["b"], c["metric"]) for c in results["comparisons"]}
    assert ("base", "qlora", "bleu4") in pairs
    assert all(0.0 <= c["p_value"] <= c["p_holm"] <= 1.0 for c in results["comparisons"])
    report = (study / "report.md").read_text(encoding="utf-8")
    assert report.split("\n## ")[1].startswith("Recommendation") and "Recommendation: " in report
    assert 0.0 <= results["ensemble"]["alpha"] <= 1.0 and len(results["ensemble"]["validation"]) == 3


def test_env_records_versions_and_data_hashes(study):
    env = json.loads((study / "env.json").read_text())
    assert "transformers" in env["versions"] and env["data_hashes"]["train.jsonl"].startswith("sha256:")


def test_predictions_never_contain_the_prompt(study):
    for line in (study / "eval" / "base" / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert "<start_of_turn>" not in row["prediction"]
        assert not row["prediction"].startswith("user")
        assert row["prompt"].endswith("<start_of_turn>model\n")


def test_rerun_skips_finished_stages(study, capsys):
    assert main(["study", "smoke", "--out", str(study)]) == 0
    err = capsys.readouterr().err
    assert err.count("(done, skipped)") == 9


def test_a_different_config_is_refused(study, capsys):
    assert main(["study", "smoke", "--out", str(study), "--set", "data.seed=1"]) == 2
    assert "different config" in capsys.readouterr().err


def test_the_console_shows_our_bars_a_summary_and_no_library_noise(study_run):
    out, err, caught = study_run
    for noise in ("Loading weights", "Writing model shards", "{'loss'", "{'train_runtime'", "Traceback"):
        assert noise not in err, noise
    assert "  train qlora: 6/6 steps  loss " in err and "  train galore: " in err
    assert "[10/10] report" in err
    summary = err[err.index("\nmodel "):]
    for model in ("base", "qlora", "galore", "hybrid", "ensemble"):
        assert f"\n{model} " in summary
    assert f"report: {out / 'report.html'}" in summary and "MiB on disk" in summary
    deprecations = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
                    if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))]
    assert deprecations == []


def test_no_checkpoint_is_left_after_a_study(study):
    assert not list(study.rglob("checkpoint-*"))
    assert all((study / "train" / m / "final").is_dir() for m in ("qlora", "galore", "hybrid"))


def test_seed_repeats_train_and_evaluate_each_seed_and_results_aggregate_them(tmp_path, gemma_tokenizer):
    """`train.seeds`: one run per (method, seed), the first seed under the plain name; results.json holds
    each seed's scores under "seeds" and their mean and SD; the report lists the method once."""
    import yaml

    from peftlab.config import BUILTIN_CONFIG_DIR

    raw = yaml.safe_load((BUILTIN_CONFIG_DIR / "smoke.yaml").read_text())
    raw["name"] = "seeds"
    raw["train"].update(seeds=[42, 43], max_steps=1)
    raw["methods"] = {"qlora": raw["methods"]["qlora"]}
    raw["evaluate"].update(limit=2, ensemble={})
    config = tmp_path / "seeds.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    assert main(["study", str(config), "--out", str(out)]) == 0
    for run in ("qlora", "qlora@43"):
        assert (out / "train" / run / "final" / "adapter_model.safetensors").exists()
        assert (out / "eval" / run / "predictions.jsonl").exists()
    seeds = [json.loads((out / "train" / run / "metrics.json").read_text())["method_config"]["seed"]
             for run in ("qlora", "qlora@43")]
    assert seeds == [42, 43]
    from safetensors.torch import load_file

    first, second = (load_file(out / "train" / run / "final" / "adapter_model.safetensors") for run in ("qlora", "qlora@43"))
    assert any(not (first[k] == second[k]).all() for k in first)  # another seed, other adapters
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"base", "qlora"}
    qlora = results["models"]["qlora"]
    assert set(qlora["seeds"]) == {"42", "43"} and qlora["n_seeds"] == 2
    per_seed = [json.loads((out / "eval" / run / "metrics.json").read_text())["rougeL"] for run in ("qlora", "qlora@43")]
    assert qlora["rougeL"] == pytest.approx(sum(per_seed) / 2) and "rougeL_sd" in qlora
    assert set(results["training"]["qlora"]["seeds"]) == {"42", "43"}
    report = (out / "report.md").read_text()
    assert "qlora@43" not in report
    assert main(["train", str(config), "--method", "qlora@44", "--out", str(out)]) == 2  # not a configured seed
