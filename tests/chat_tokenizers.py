"""Small offline tokenizers with the chat templates of three model families, for tests.

Each is a byte-level BPE (`tokenizers`) trained in well under a second on the built-in demo data,
wrapped in `PreTrainedTokenizerFast` with its family's control tokens as special tokens and its chat
template, and saved to a folder that `model.tokenizer: <folder>` loads:

- `gemma3`: Gemma 3's template (the builtin's), `<bos>` written by the template, `<end_of_turn>`;
- `chatml`: Qwen 2.5's ChatML template (a default system prompt when the data has none), `<|im_end|>`;
- `llama3`: Llama 3's template, `<|begin_of_text|>` written by the template, `<|eot_id|>`;
- `chatml-generation`: ChatML whose assistant turns sit in `{% generation %}` blocks.
"""

from __future__ import annotations

from pathlib import Path

try:  # the lead is moving builtin_gemma.py to peftlab/models/builtin.py
    from peftlab.models.builtin import GEMMA3_CHAT_TEMPLATE
except ImportError:
    from peftlab.builtin_gemma import GEMMA3_CHAT_TEMPLATE

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CHATML_GENERATION_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Meta-Llama-3-8B-Instruct's template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

FAMILIES = {
    "gemma3": {"specials": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
               "tokens": {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
               "template": GEMMA3_CHAT_TEMPLATE},
    "chatml": {"specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
               "tokens": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
               "template": CHATML_TEMPLATE},
    "chatml-generation": {"specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                          "tokens": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
                          "template": CHATML_GENERATION_TEMPLATE},
    "llama3": {"specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>"],
               "tokens": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
               "template": LLAMA3_TEMPLATE},
}


def _corpus() -> list[str]:
    from peftlab.data.demo import generate_rows

    texts = ["system user assistant model You are a helpful assistant.", QWEN_SYSTEM]
    for schema in ("alpaca", "tulu", "ultrachat"):
        for row in generate_rows(schema, 150, seed=7):
            if "instruction" in row:
                texts += [row["instruction"], row.get("input") or "", row["output"]]
            else:
                texts += [m["content"] for m in row["messages"]]
    return texts


def build_tokenizer(family: str, vocab_size: int = 700):
    """A `PreTrainedTokenizerFast` of `family` (see FAMILIES)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["specials"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **spec["tokens"])
    tokenizer.chat_template = spec["template"]
    return tokenizer


def save_tokenizer(family: str, folder: Path) -> Path:
    """The tokenizer of `family` saved in `folder` (tokenizer.json, tokenizer_config.json, chat template)."""
    build_tokenizer(family).save_pretrained(folder)
    return folder
