"""Other model families end to end on the CPU: `peftlab study` with a Llama-shaped random model and a
Llama 3 tokenizer, and a Qwen2-shaped one with a ChatML tokenizer (one LoRA step, a hybrid that merges,
two evaluated rows): the data, the prompts and the examples are in each tokenizer's own format."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from peftlab.cli import main
from peftlab.models import read_model_config

STUDY = """
name: {name}
data:
  seed: 1
  train_per_source: 4
  test_per_source: 1
  train_buffer: 6
  test_buffer: 2
  max_seq_length: 128
  sources:
    - {{name: alpaca, format: alpaca, path: "demo:alpaca:20"}}
    - {{name: ultrachat, format: ultrachat, path: "demo:ultrachat:20"}}
prepare: {{overlength: truncate}}
model: {{name_or_path: {tokenizer}, config: {shape}}}
train: {{epochs: 1, batch_size: 4, grad_accum: 1, warmup_steps: 0, gradient_checkpointing: false, save_steps: 100}}
methods:
  lora: {{kind: lora, lr: 1.0e-3, max_steps: 1, lora: {{r: 2, alpha: 4, dropout: 0.0}}}}
  hybrid: {{kind: hybrid, stages: [{{method: lora, max_steps: 1}}, {{method: merge}}]}}
evaluate: {{max_new_tokens: 4, batch_size: 2, bootstrap_samples: 10, models: [base, hybrid],
           ensemble: {{members: []}}}}
"""

FAMILIES = {
    "llama": ("llama3", "tiny-llama", "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    "qwen2": ("chatml", "tiny-qwen2", "<|im_start|>assistant\n", "<|im_end|>"),
}


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen2"])
def test_the_builtin_shapes_build_with_their_familys_vocabulary(shape):
    from transformers import AutoConfig

    config = AutoConfig.for_model(**read_model_config(f"builtin:{shape}"))
    assert config.model_type == shape.removeprefix("tiny-") and config.vocab_size in (128256, 151936)
    assert config.num_hidden_layers == 2 and config.hidden_size == 64


def test_a_random_shape_smaller_than_its_tokenizer_is_refused(chat_tokenizer_dir, tmp_path):
    from peftlab.config import ModelConfig
    from peftlab.errors import UserError
    from peftlab.models.loading import check_vocabulary

    small = tmp_path / "small.json"
    small.write_text(json.dumps({**read_model_config("builtin:tiny-llama"), "vocab_size": 100}))
    with pytest.raises(UserError, match="vocab_size 100 is smaller than the tokenizer's 700 ids"):
        check_vocabulary(ModelConfig(name_or_path=str(chat_tokenizer_dir("llama3")), config=str(small)))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_study_runs_in_the_tokenizers_own_format(family, tmp_path, chat_tokenizer_dir):
    tokenizer, shape, generation_prompt, turn_end = FAMILIES[family]
    # The builtin shape with the test tokenizer's vocabulary: the logits of a 150k vocabulary would be most of the time.
    small = tmp_path / f"{shape}.json"
    small.write_text(json.dumps({**read_model_config(f"builtin:{shape}"), "vocab_size": 768}))
    config = tmp_path / f"{family}.yaml"
    config.write_text(STUDY.format(name=family, tokenizer=chat_tokenizer_dir(tokenizer), shape=small))
    out = tmp_path / "run"
    assert main(["study", str(config), "--out", str(out)]) == 0

    for example in (out / "data" / "examples").glob("*_example.txt"):
        text = example.read_text()
        assert generation_prompt in text and turn_end in text and "<start_of_turn>" not in text
    stats = json.loads((out / "data" / "stats.json").read_text())
    assert stats["chat_template"]["turn_end"] == turn_end
    decode = AutoTokenizer.from_pretrained(str(chat_tokenizer_dir(tokenizer))).decode
    for line in (out / "data" / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        answers = [m["content"] + turn_end for m in row["messages"] if m["role"] == "assistant"]
        masked = [decode(row["input_ids"][a:b]) for a, b in row["assistant_spans"]]
        if row["truncated"]:  # the last span is cut where the row is
            assert masked[:-1] == answers[:len(masked) - 1] and answers[len(masked) - 1].startswith(masked[-1])
        else:
            assert masked == answers
    for model in ("base", "hybrid"):
        metrics = json.loads((out / "eval" / model / "metrics.json").read_text())
        assert metrics["n"] == 2 and metrics["generation"]["decoder_kind"] == "static"
        for line in (out / "eval" / model / "predictions.jsonl").read_text().splitlines():
            assert json.loads(line)["prompt"].endswith(generation_prompt)
    merged = json.loads((out / "train" / "hybrid" / "final" / "config.json").read_text())
    assert merged["model_type"] == family and not (out / "train" / "hybrid" / "final" / "adapter_config.json").exists()
    assert (out / "report.md").exists() and json.loads((out / "results.json").read_text())["models"]["hybrid"]

