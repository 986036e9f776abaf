"""`peftlab bench` on a tiny CPU shape: one fresh process per run, the JSON report's contract."""

from __future__ import annotations

import json

import pytest

from peftlab.bench.train import format_table
from peftlab.bench.workload import flops_per_token
from peftlab.cli import main
from peftlab.errors import UserError


def test_bench_writes_the_report(tmp_path, gemma_tokenizer, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "train", "--shape", "builtin:tiny-gemma3", "--methods", "lora", "--profiles", "default,lowmem",
                 "--rows-per-source", "8", "--max-steps", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["gpu"] == "cpu" and "torch" in report["versions"] and report["command"].startswith("peftlab")
    assert [(r["method"], r["profile"]) for r in report["runs"]] == [("lora", "default"), ("lora", "lowmem")]
    for run in report["runs"]:
        assert run["tokens_per_s"] > 0 and run["rows"] == 24 and run["optimizer_steps"] == 1
        assert run["mfu"] is None and run["peak_alloc_gib"] is None  # no GPU: n/a, never 0
        assert run["step_s_median"] > 0
    assert [r["max_seq_length"] for r in report["runs"]] == [2048, 2048]
    assert "lora          default" in capsys.readouterr().err
    # The default profile is the seed's recipe through `peftlab train`'s own execution choice.
    default = report["runs"][0]
    assert (default["settings"]["lr"], default["settings"]["batch_size"], default["settings"]["grad_accum"]) == (
        2e-4, 4, 4)
    assert default["execution"]["mode"] == "as_written" and default["execution"]["padding_free"]  # CPU
    assert report["runs"][1]["settings"]["micro_batch_tokens"] == 2048
    assert out.with_suffix(".loss.png").stat().st_size > 1000  # the loss curves of every profile
    assert out.with_suffix(".png").stat().st_size > 1000  # tokens/s (and, on a GPU, peaks) per run

    # --resume keeps finished runs (a fast one is marked to prove it is not re-run) and runs the rest.
    report["runs"] = [{**report["runs"][0], "kept": True}]
    out.write_text(json.dumps(report))
    args = ["bench", "train", "--shape", "builtin:tiny-gemma3", "--methods", "lora", "--profiles", "default,lowmem",
            "--rows-per-source", "8", "--max-steps", "1", "--out", str(out), "--resume"]
    assert main(args) == 0
    resumed = json.loads(out.read_text())
    assert [(r["method"], r["profile"], r.get("kept")) for r in resumed["runs"]] == [
        ("lora", "default", True), ("lora", "lowmem", None)]
    assert "lora / default: kept from" in capsys.readouterr().err
    assert resumed["kept_runs"] == [["lora", "default"]]
    assert len(resumed["commands"]) == 2 and resumed["commands"][0] == report["command"]  # both invocations
    assert resumed["runs"][1]["settings"]["lora"]["dropout"] == 0.05  # what the run trained with
    # A kept run whose profile's settings changed since is run again, not mixed in.
    changed = {**resumed, "runs": [{**resumed["runs"][0], "settings": {**resumed["runs"][0]["settings"], "lr": 1.0}},
                                   resumed["runs"][1]]}
    out.write_text(json.dumps(changed))
    assert main(args) == 0
    rerun = json.loads(out.read_text())
    assert "lora / default: its settings changed since" in capsys.readouterr().err
    assert [(r["method"], r["profile"], r.get("kept")) for r in rerun["runs"]] == [
        ("lora", "default", None), ("lora", "lowmem", None)]
    assert rerun["kept_runs"] == [["lora", "lowmem"]]
    # A report of another workload is refused, not mixed in.
    assert main([*args[:-5], "--max-steps", "2", "--out", str(out), "--resume"]) == 2
    assert "another workload" in capsys.readouterr().err
    out.write_text("[]")
    assert main(args) == 2
    assert "is not a bench report" in capsys.readouterr().err


def test_bench_times_each_hybrid_stage(tmp_path, gemma_tokenizer, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "train", "--shape", "builtin:tiny-gemma3", "--methods", "hybrid", "--profiles", "fast",
                 "--reference", "--rows-per-source", "8", "--max-steps", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    # No reference recipe for the hybrid; one row per trained stage, the merge's time on the stage after it.
    assert [(r["method"], r["profile"]) for r in report["runs"]] == [("hybrid:qlora", "fast"), ("hybrid:galore", "fast")]
    qlora, galore = report["runs"]
    assert qlora["trainable_params"] < galore["trainable_params"] == galore["total_params"]  # adapters, then all
    assert galore["merge_before_s"] > 0 and "merge_before_s" not in qlora
    assert all(r["tokens_per_s"] > 0 and r["optimizer_steps"] == 1 for r in report["runs"])
    assert all([p["step"] for p in r["loss_curve"]] == [1] for r in report["runs"])  # each stage's own curve
    settings = report["runs"][0]["settings"]  # what the stages trained with, so --resume sees profile changes
    assert settings["hybrid"]["kind"] == "hybrid" and settings["qlora"]["batch_size"] == 16
    assert settings["galore"]["loss_chunk_tokens"] == 1024  # the fast profile's, not a default
    assert "hybrid:galore" in capsys.readouterr().err
    # --resume keeps both stage rows when nothing changed, and re-runs both when a stage's settings did.
    args = ["bench", "train", "--shape", "builtin:tiny-gemma3", "--methods", "hybrid", "--profiles", "fast",
            "--rows-per-source", "8", "--max-steps", "1", "--out", str(out), "--resume"]
    assert main(args) == 0
    assert "hybrid / fast: kept from" in capsys.readouterr().err
    assert json.loads(out.read_text())["kept_runs"] == [["hybrid:qlora", "fast"], ["hybrid:galore", "fast"]]
    changed = json.loads(out.read_text())
    changed["runs"][1]["settings"]["galore"]["lr"] = 1.0
    out.write_text(json.dumps(changed))
    assert main(args) == 0
    assert "hybrid / fast: its settings changed since" in capsys.readouterr().err
    rerun = json.loads(out.read_text())
    assert [r["method"] for r in rerun["runs"]] == ["hybrid:qlora", "hybrid:galore"] and rerun["kept_runs"] == []


def test_unknown_method_is_a_user_error(capsys):
    assert main(["bench", "train", "--methods", "dora"]) == 2
    assert "unknown method 'dora'" in capsys.readouterr().err
    assert main(["bench", "train", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err
    assert main(["bench", "generate", "--plain-batches", "64,x"]) == 2
    assert "--plain-batches: expected comma-separated integers" in capsys.readouterr().err
    assert main(["bench", "generate", "--extra", "131072:x"]) == 2
    assert "--extra: expected TOKENS:CONCURRENT[:ROWS] settings" in capsys.readouterr().err
    assert main(["bench", "generate", "--extra", "131072:3:64:1"]) == 2
    assert "--extra: expected TOKENS:CONCURRENT[:ROWS]" in capsys.readouterr().err
    assert main(["bench", "generate", "--extra", "131072:3:0"]) == 2
    assert "rows must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --resume belongs to `bench train` only
        main(["bench", "generate", "--resume", "--out", "gen.json"])


def test_flops_formula():
    shape = {"num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 8}
    assert flops_per_token(shape, 1000, True, 10) == 6 * 1000 + 12 * 2 * 4 * 8 * 10
    assert flops_per_token(shape, 1000, False, 10) == 4 * 1000 + 12 * 2 * 4 * 8 * 10
    assert "n/a" in format_table([{"method": "lora", "profile": "fast", "tokens_per_s": 1.0, "mfu": None,
                                   "peak_alloc_gib": None, "peak_reserved_gib": None, "step_s_median": 1.0}])


def test_steady_rate_is_tokens_per_step_over_the_median_step():
    from peftlab.bench.train import steady_tokens_per_s

    run = {"tokens_trained": 16_000, "optimizer_steps": 16, "step_s_median": 0.5}
    assert steady_tokens_per_s(run) == 2_000.0
    assert steady_tokens_per_s({**run, "step_s_median": None}) is None


def test_generation_bench_compares_with_plain_generate(tmp_path, gemma_tokenizer, capsys):
    out = tmp_path / "gen.json"
    assert main(["bench", "generate", "--shape", "builtin:tiny-gemma3", "--rows-per-source", "8",
                 "--prompts", "10", "--max-new-tokens", "6", "--batch", "4", "--static-cache", "--plain-batches", "64,3",
                 "--extra", "40:2,40:2:4,131072:3,1000:1:2", "--concurrent", "3", "--prefill-chunk-tokens", "8",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    # 40:2 and 40:2:4 are one setting at --batch 4; 131072:3 is the main run's: each timed once.
    assert "131072:3:4 is the main run's setting" in capsys.readouterr().err
    assert report["prompts"] == 10 and "partial" not in report  # the final report replaced the partial ones
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # tokens/s per run
    assert [r["run"] for r in report["runs"]] == ["plain", "plain-b3", "ours", "ours-generate", "ours-static",
                                                  "ours-t40-c2", "ours-t1000-c1-r2", "ours-p8"]
    plain, plain3, ours, ours_generate, static, budget, two_rows, chunked = report["runs"]
    assert chunked["identical_rows"] == 10 and chunked["decoder"]["batches"] == 3  # chunked prefill: same tokens
    assert two_rows["batch"] == 2 and two_rows["decoder"]["batches"] == 5 and two_rows["identical_rows"] == 10
    assert budget["identical_rows"] == 10 and budget["generated_tokens"] == ours["generated_tokens"]
    assert budget["max_batch_tokens"] == 40 and budget["concurrent"] == 2 and budget["decoder"]["batches"] >= 3
    assert plain["batch"] == 64 and plain3["batch"] == 3 and ours["batch"] == 4
    # fp32 on CPU: batching, padding and the static-cache decoder must not change a greedy token.
    assert all(r["identical_rows"] == 10 for r in (plain3, ours, ours_generate, static))
    assert ours["decoder"]["batches"] == 3 and ours["decoder"]["decode_steps"] == 3 * 5
    assert ours["decoder"]["graph_steps"] == 0  # no CUDA graphs on a CPU
    assert all(r["generated_tokens"] > 0 and r["tokens_per_s"] > 0 for r in report["runs"])
    assert report["differing_rows_fp32"] == []


def test_near_tie_gaps_scores_the_first_difference():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftlab.bench.generate import near_tie_gaps
    from peftlab.models import read_model_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**read_model_config("builtin:tiny-gemma3")))
    prompt = [[2, 10, 11]]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt[0] + [5]])).logits[0, -1]
    gaps = near_tie_gaps(model, None, prompt, [[5, 7, 8]], [[5, 9, 8]], "cpu")
    assert len(gaps) == 1 and gaps[0]["position"] == 1
    assert abs(gaps[0]["plain_minus_ours"] - float(logits[7] - logits[9])) < 1e-4
    assert near_tie_gaps(model, None, prompt, [[5]], [[5]], "cpu") == []


def test_profiles_keep_the_effective_batch_and_set_their_levers():
    from peftlab.bench.workload import BenchSpec, default_sources, workload_config

    def method(kind: str, profile: str):
        config = workload_config(BenchSpec(kind, profile, sources=default_sources(None)))
        return config.methods[kind], config.data.max_seq_length

    for kind in ("qlora", "galore", "lora"):
        for profile in ("default", "fast", "fast-liger", "lowmem"):
            settings, _ = method(kind, profile)
            assert settings.batch_size * settings.grad_accum == 16  # the study's effective batch
    default, default_len = method("qlora", "default")
    assert default_len == 2048 and (default.batch_size, default.grad_accum) == (4, 4)  # the seed's, as written
    assert not {"gradient_checkpointing", "micro_batch_tokens", "loss_chunk_tokens"} & set(default.explicit)
    assert (default.lr, default.max_grad_norm, default.optimizer) == (2e-4, 0.3, "paged_adamw_8bit")  # seed.yaml
    fast, fast_len = method("qlora", "fast")
    low, low_len = method("qlora", "lowmem")
    assert (fast_len, low_len) == (1024, 2048)
    assert fast.quant.compute_dtype == low.quant.compute_dtype == "bfloat16"  # no fp16 copies of layer inputs
    overridden = workload_config(BenchSpec("qlora", "lowmem", sources=default_sources(None),
                                           overrides=["quant.compute_dtype=float16", "lora.dropout=0.0"]))
    assert overridden.methods["qlora"].quant.compute_dtype == "float16"
    assert overridden.methods["qlora"].lora.dropout == 0.0 and low.lora.dropout == 0.05
    with pytest.raises(UserError, match="'lr' is not a section"):
        workload_config(BenchSpec("qlora", "lowmem", sources=default_sources(None), overrides=["lr.x=1"]))
    assert not fast.gradient_checkpointing and low.gradient_checkpointing
    assert low.loss_chunk_tokens < fast.loss_chunk_tokens
    assert low.micro_batch_tokens == low_len and fast.micro_batch_tokens is None  # one full row's memory
    lowmem_galore = method("galore", "lowmem")[0].galore
    assert lowmem_galore.variant == "adamw8bit" and lowmem_galore.accumulate == "projected"
    assert "embed_tokens" in lowmem_galore.targets
    assert method("galore", "fast")[0].galore.variant == "adamw"
    liger = workload_config(BenchSpec("lora", "fast-liger", sources=default_sources(None)))
    plain = workload_config(BenchSpec("lora", "fast", sources=default_sources(None)))
    assert liger.model.liger_kernel and not plain.model.liger_kernel


def test_near_tie_gaps_rescore_the_first_difference_in_fp32():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftlab.bench.generate import near_tie_gaps
    from peftlab.models import read_model_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**read_model_config("builtin:tiny-gemma3")))
    encoded, plain, ours = [[2, 5, 6], [2, 7]], [[7, 8, 3], [4]], [[7, 9, 3], [4]]
    gaps = near_tie_gaps(model, None, encoded, plain, ours, "cpu")
    assert len(gaps) == 1 and gaps[0]["row"] == 0 and gaps[0]["position"] == 1
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([[2, 5, 6, 7]])).logits[0, -1]
    assert gaps[0]["plain_minus_ours"] == pytest.approx(float(logits[8] - logits[9]), abs=1e-5)
    assert (gaps[0]["plain_token"], gaps[0]["ours_token"], gaps[0]["prompt_tokens"]) == (8, 9, 3)
    assert gaps[0]["fp32_argmax_token"] == int(logits.argmax()) and gaps[0]["generated_prefix_tail"] == [7]


def test_generation_bench_reports_progress_after_every_run(tmp_path, gemma_tokenizer):
    from peftlab.bench.generate import run_generation_bench

    seen = []
    report = run_generation_bench(shape="builtin:tiny-gemma3", model_name="builtin:gemma-3-270m",
                                  tokenizer="builtin:gemma-3-270m", data_dir=None, rows_per_source=8, prompts=4,
                                  max_new_tokens=3, batch=2, static=False, work=tmp_path,
                                  progress=lambda partial: seen.append(([r["run"] for r in partial["runs"]],
                                                                        partial.get("partial"),
                                                                        partial["differing_rows_fp32"])))
    # After each run, then once more when the fp32 gaps are scored (None until then: not computed).
    assert seen == [(["plain"], True, None), (["plain", "ours"], True, None),
                    (["plain", "ours", "ours-generate"], True, None), (["plain", "ours", "ours-generate"], True, [])]
    assert "partial" not in report and [r["run"] for r in report["runs"]] == ["plain", "ours", "ours-generate"]


def test_generation_prompts_are_rendered_up_to_the_model_turn(gemma_tokenizer):
    from peftlab.bench.generate import generation_prompts

    _, texts = generation_prompts(None, "builtin:gemma-3-270m", 3, rows_per_source=8, shape="builtin:tiny-gemma3")
    assert len(texts) == 3
    assert all(t.startswith("<bos>") and t.endswith("<start_of_turn>model\n") for t in texts)
