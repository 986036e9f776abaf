"""The study config: every shipped YAML loads; typos, wrong types and bad values name the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftlab.config import BUILTIN_CONFIG_DIR, apply_override, config_from_dict, load_config
from peftlab.errors import UserError

SHIPPED = sorted(BUILTIN_CONFIG_DIR.rglob("*.yaml"))


def test_the_shipped_configs_are_there():
    assert {p.stem for p in SHIPPED} >= {"seed", "samples", "demo", "smoke", "lowmem"}


def test_a_shipped_example_loads_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config("examples/lowmem")
    assert config.method("galore_lowmem").galore.accumulate == "projected"
    assert config.method("qlora_lowmem").micro_batch_tokens == 2048
    with pytest.raises(UserError, match=r"file not found \(shipped configs: .*examples/lowmem"):
        load_config("examples/../../config")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_yaml_loads(path: Path):
    config = load_config(str(path))
    assert config.data.sources and config.methods
    assert config.name == path.stem


def test_seed_config_is_the_study():
    config = load_config("seed")
    data = config.data
    assert (data.seed, data.train_per_source, data.test_per_source) == (42, 5000, 2000)
    assert (data.train_buffer, data.test_buffer, data.max_seq_length) == (5200, 2100, 2048)
    assert [s.path for s in data.sources] == [
        "tatsu-lab/alpaca", "allenai/tulu-v2-sft-mixture", "HuggingFaceH4/ultrachat_200k"]
    assert config.model.name_or_path == "google/gemma-3-1b-it"
    qlora, galore = config.method("qlora"), config.method("galore")
    assert (qlora.lr, qlora.max_grad_norm, qlora.optimizer, qlora.epochs) == (2e-4, 0.3, "paged_adamw_8bit", 3)
    assert (qlora.lora.r, qlora.lora.alpha, qlora.lora.dropout) == (16, 32, 0.05)
    assert qlora.quant.compute_dtype == "bfloat16" and qlora.quant.double_quant  # the report's BF16, not its code's fp16
    assert (galore.lr, galore.max_grad_norm, galore.galore.rank, galore.galore.update_proj_gap) == (1e-4, 1.0, 128, 200)
    assert galore.galore.targets == ["attn", "mlp"] and galore.galore.scale == 0.25
    for method in (qlora, galore):
        assert (method.batch_size, method.grad_accum, method.warmup_steps, method.weight_decay) == (4, 4, 100, 0.01)
        assert method.scheduler == "cosine" and method.seed == 42
        # How a step runs is the execution's choice (peftlab.train.execution), never pinned by the seed.
        assert not {"gradient_checkpointing", "micro_batch_tokens", "attention"} & set(method.explicit)
    assert "attn_implementation" not in config.model.explicit
    stages = [(s.method, s.epochs) for s in config.method("hybrid").stages]
    assert stages == [("qlora", 2), ("merge", None), ("galore", 1)]
    assert config.evaluate.max_new_tokens == 1024 and config.evaluate.limit is None


def test_set_overrides_any_key():
    config = load_config("seed", ["data.seed=7", "methods.qlora.lora.r=8", "data.sources.0.path=x.jsonl"])
    assert config.data.seed == 7
    assert config.method("qlora").lora.r == 8
    assert config.data.sources[0].path == "x.jsonl"


def _raw(**changes):
    raw = {
        "data": {"sources": [{"name": "a", "format": "alpaca", "path": "a.json"}], "train_per_source": 2,
                 "test_per_source": 1, "train_buffer": 2, "test_buffer": 1},
        "methods": {"lora": {"kind": "lora"}},
    }
    for key, value in changes.items():
        apply_override(raw, f"{key}={value}")
    return raw


@pytest.mark.parametrize(("override", "message"), [
    ({"data.sed": "1"}, "unknown key 'data.sed' (did you mean 'seed'?)"),
    ({"data.seed": "abc"}, "data.seed: expected an integer, got 'abc'"),
    ({"data.max_seq_length": "0"}, "data.max_seq_length must be at least 1"),
    ({"data.sources.0.format": "csv"}, "data.sources.0.format: 'csv' is not one of"),
    ({"methods.lora.kind": "dora"}, "methods.lora.kind: 'dora' is not one of"),
    ({"methods.lora.lr": "-1"}, "methods.lora.lr must be positive"),
    ({"methods.lora.lora.rr": "4"}, "unknown key 'methods.lora.lora.rr' (did you mean 'r'?)"),
    ({"data.train_buffer": "1"}, "data.train_buffer (1) must be at least"),
    ({"evaluate.models": "[qlora]"}, "evaluate.models: unknown model 'qlora'"),
    ({"methods.lora.galore.accumulate": "projectd"}, "methods.lora.galore.accumulate: 'projectd' is not one of"),
    ({"methods.lora.galore.accumulate": "projected", "methods.lora.galore.variant": "layerwise"},
     "galore.accumulate: projected works with variant adamw or adamw8bit"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(UserError) as error:
        config_from_dict(_raw(**override))
    assert message in str(error.value)


def test_hybrid_stages_are_validated():
    raw = _raw()
    raw["methods"]["hybrid"] = {"kind": "hybrid", "stages": [{"method": "lora"}, {"method": "lora"}]}
    with pytest.raises(UserError, match="add a 'merge' stage"):
        config_from_dict(raw)
    raw["methods"]["hybrid"]["stages"] = [{"method": "lora"}]
    with pytest.raises(UserError, match="end with 'merge'"):
        config_from_dict(raw)
    raw["methods"]["hybrid"]["stages"] = [{"method": "lora"}, {"method": "merge"}]
    assert config_from_dict(raw).method("hybrid").stages[1].method == "merge"


def test_shared_train_defaults_apply_to_methods_and_can_be_overridden():
    raw = _raw()
    raw["train"] = {"lr": 0.5, "batch_size": 3}
    raw["methods"]["full"] = {"kind": "full", "lr": 0.1}
    config = config_from_dict(raw)
    assert (config.method("lora").lr, config.method("lora").batch_size) == (0.5, 3)
    assert config.method("full").lr == 0.1


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(str(bad))
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_config("seed", ["data.seed"])


@pytest.mark.parametrize(("override", "message"), [
    ("data.seed=-1", "data.seed must not be negative"),
    ("methods.qlora.optimizer=adamw", "unknown optimizer 'adamw'"),
    ("methods.qlora.lora.target_modules=[]", "name at least one module"),
    ("evaluate.bootstrap_samples=0", "bootstrap_samples must be at least 1"),
    ("evaluate.metrics=[rougeL, em]", "evaluate.metrics.1: 'em' is not one of 'rougeL'"),
    ("evaluate.metrics=[bleu4, bleu4]", "evaluate.metrics: name each metric once"),
    ("evaluate.ensemble.validation_limit=0", "validation_limit must be at least 1"),
    ("evaluate.prefill_chunk_tokens=0", "prefill_chunk_tokens must be at least 1"),
    ("methods.qlora.lr.x=1", "'methods.qlora.lr' is not a section"),
    ("evaluate.concurrent_batches=0", "concurrent_batches must be at least 1"),
    ("methods.hybrid.stages.0.max_steps=0", "max_steps >= 1"),
    ("methods.qlora.graph_tokens=16", r"graph_tokens must hold the longest row: at least data.max_seq_length"),
])
def test_values_that_would_crash_later_are_rejected_up_front(override, message):
    with pytest.raises(UserError, match=message):
        load_config("smoke", [override])


def test_a_stage_with_epochs_ignores_the_methods_step_cap():
    from peftlab.hybrid import stage_method

    config = load_config("demo")
    assert config.method("qlora").max_steps == 12
    stage = stage_method(config, "qlora", 2.0, None)
    assert (stage.epochs, stage.max_steps) == (2.0, -1)


def test_bins_are_refused_where_hooks_own_the_gradients_or_processes_are_several():
    from peftlab.train.launch import check_launch

    with pytest.raises(UserError, match=r"graph_tokens: not with galore\.accumulate projected"):
        load_config("smoke", ["methods.galore.graph_tokens=4096", "methods.galore.galore.accumulate=projected"])
    config = load_config("smoke", ["methods.qlora.graph_tokens=4096"])
    with pytest.raises(UserError, match=r"graph_tokens .* runs in one process"):
        check_launch(config, "qlora", world=2, fsdp=False)
    check_launch(config, "qlora", world=1, fsdp=False)


def test_compile_and_liger_are_not_combined():
    with pytest.raises(UserError, match=r"methods\.qlora\.torch_compile: not with model\.liger_kernel"):
        load_config("smoke", ["methods.qlora.torch_compile=true", "model.liger_kernel=true"])
    assert load_config("smoke", ["methods.qlora.torch_compile=true"]).method("qlora").torch_compile is True


def test_seed_repeats_name_one_run_per_further_seed():
    from peftlab.config import evaluated_models, method_seeds, seed_runs
    from peftlab.hybrid import stage_method

    config = load_config("smoke", ["train.seeds=[7, 8, 9]"])
    qlora = config.method("qlora")
    assert method_seeds(qlora) == [7, 8, 9] and qlora.seed == 7  # the first seed is the plain run's
    assert seed_runs(config, "qlora") == ["qlora", "qlora@8", "qlora@9"]
    assert seed_runs(config, "base") == ["base"] and seed_runs(config, "ensemble") == ["ensemble"]
    assert evaluated_models(config) == ["base", "qlora", "galore", "hybrid", "ensemble"]  # results.json's names
    assert config.method("qlora@9").seed == 9 and config.method("qlora@9").lora == qlora.lora
    assert config.method("hybrid@8").seed == 8
    assert stage_method(config, "galore", None, 2, seed=8).seed == 8  # a repeat's stages train with its seed
    for name, message in (("qlora@7", "the first seed's run is 'qlora'"), ("qlora@5", "repeats: qlora@8, qlora@9"),
                          ("qlora@x", "unknown seed repeat"), ("dora@8", "unknown method 'dora'")):
        with pytest.raises(UserError, match=message):
            config.method(name)
    one = load_config("smoke")
    assert seed_runs(one, "qlora") == ["qlora"] and one.method("qlora").seed == 42
    with pytest.raises(UserError, match="repeats: none"):
        one.method("qlora@43")
    for bad in ("[1, 1]", "[-1]"):
        with pytest.raises(UserError, match="seeds must be different non-negative integers"):
            load_config("smoke", [f"train.seeds={bad}"])


def test_a_string_or_a_list_for_report_to_and_the_first_type_that_fits():
    assert load_config("smoke", ["train.report_to=tensorboard"]).method("qlora").report_to == "tensorboard"
    assert load_config("smoke", ["train.report_to=[tensorboard, wandb]"]).method("qlora").report_to == [
        "tensorboard", "wandb"]
    assert load_config("smoke").method("qlora").report_to == []
    with pytest.raises(UserError, match="report_to"):
        load_config("smoke", ["train.report_to={a: 1}"])


def test_a_shipped_config_is_recorded_by_name_and_a_file_by_its_path(tmp_path):
    assert load_config("samples").source_file == "samples"
    assert load_config("examples/lowmem").source_file == "examples/lowmem"
    own = tmp_path / "mine.yaml"
    own.write_text((BUILTIN_CONFIG_DIR / "smoke.yaml").read_text())
    assert load_config(str(own)).source_file == str(own)
