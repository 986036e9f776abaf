"""Greedy generation for evaluation, done right.

- The prompt is the whole conversation before the **last** assistant turn (multi-turn context kept),
  rendered by the tokenizer's chat template with its generation prompt (Gemma 3: ending with
  `<start_of_turn>model\\n`), its contents tokenised as text (`data/chat.py`); the reference is that turn.
- Batches are length-sorted and left-padded; decoding stops at the template's turn end or EOS.
- The prediction is the decoded **generated token ids only**: the original study string-replaced the
  prompt out of the decoded text, which never matched, so prompts leaked into predictions.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from peftlab.console import StageProgress
from peftlab.data.chat import chat_template, stop_token_ids
from peftlab.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class EvalExample:
    id: str
    source_dataset: str
    prompt: str
    reference: str
    # The prompt's token ids (contents as text: a literal control token in the data stays text).
    prompt_ids: list[int]
    last_user: str = ""
    user_turns: int = 0


def examples_from_rows(rows: Sequence[dict[str, Any]], tokenizer) -> list[EvalExample]:
    chat = chat_template(tokenizer)
    examples = []
    for row in rows:
        messages = row["messages"]
        prompt = chat.render_prompt(messages, f"row {row['id']}")
        users = [m["content"] for m in messages if m["role"] == "user"]
        examples.append(EvalExample(row["id"], row["source_dataset"], prompt.text, messages[-1]["content"],
                                    chat.encode(prompt.text, prompt.content_spans)[0], users[-1], len(users)))
    return examples


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Prompt texts as the template wrote them (Gemma 3: with its `<bos>`): no special tokens are added."""
    return [list(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]


def length_sorted_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None,
                          new_tokens: int = 0) -> list[list[int]]:
    """Longest first, at most `batch_size` rows per batch and, with `max_tokens`, at most that many
    padded tokens (rows x (longest prompt + `new_tokens`)) per batch: one long prompt then shares
    its batch with few rows instead of padding hundreds of short ones to its length."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for index in order:
        if batches and len(batches[-1]) < batch_size and (
                max_tokens is None or (len(batches[-1]) + 1) * (lengths[batches[-1][0]] + new_tokens) <= max_tokens):
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def left_pad(batch: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, tokens in enumerate(batch):
        ids[row, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        mask[row, width - len(tokens):] = 1
    return ids.to(device), mask.to(device)


def cut_at_stop(tokens: Sequence[int], stops: Sequence[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in stops:
            return list(tokens[:index])
    return list(tokens)


BatchDecoder = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def generate_token_ids(decode_batch: BatchDecoder, encoded: Sequence[Sequence[int]], pad_id: int,
                       stops: Sequence[int], batch_size: int, device, desc: str = "generate",
                       max_batch_tokens: int | None = None, new_tokens: int = 0,
                       show_progress: bool = True) -> list[list[int]]:
    """Run `decode_batch(ids, mask) -> new token ids` over length-sorted batches; tokens cut at a stop, in order.
    `show_progress`: a bar of rows done, labelled `desc`.

    Out of GPU memory, the rest of the run decodes one batch at a time, then with half the rows per batch,
    down to one row (then a UserError); each step down is kept for the batches after it and said once,
    so a card smaller than the defaults assume still finishes."""
    results: list[list[int]] = [[] for _ in encoded]
    pending = length_sorted_batches([len(ids) for ids in encoded], batch_size, max_batch_tokens, new_tokens)
    # A decoder with `decode_many` takes `concurrent` batches at a time (static_decode: parallel streams).
    decode_many = getattr(decode_batch, "decode_many", None)
    limits = _Limits(wave=getattr(decode_batch, "concurrent", 1) if decode_many is not None else 1)

    def run(group: list[list[int]]) -> list[torch.Tensor]:
        pairs = [left_pad([encoded[i] for i in batch], pad_id, device) for batch in group]
        return decode_many(pairs) if decode_many is not None else [decode_batch(*pair) for pair in pairs]

    with StageProgress(len(encoded), desc, "row", enabled=show_progress) as progress:
        while pending:
            group = pending[:limits.wave]
            outs = _or_none_when_out_of_memory(run, group)
            if outs is None:  # handled outside the except block, so the failed attempt's tensors are freed
                limits.step_down(group, encoded, new_tokens)
                stats = getattr(decode_batch, "stats", None)
                if stats is not None:
                    stats.out_of_memory_step_downs += 1
                pending = [part for batch in pending for part in _at_most(batch, limits.rows)]
                continue
            del pending[:len(group)]
            for batch, out in zip(group, outs, strict=True):
                for row, tokens in zip(batch, out.tolist(), strict=True):
                    results[row] = cut_at_stop(tokens, stops)
                progress.advance(len(batch))
    return results


def _or_none_when_out_of_memory(run, group):
    try:
        return run(group)
    except torch.cuda.OutOfMemoryError:
        return None


@dataclass
class _Limits:
    """How much one decode call may take after running out of memory: batches at once, rows per batch."""

    wave: int
    rows: int | None = None

    def step_down(self, group: list[list[int]], encoded: Sequence[Sequence[int]], new_tokens: int) -> None:
        if torch.cuda.is_available():  # let queued work finish before its memory is handed back
            torch.cuda.synchronize()
            gc.collect()
            torch.cuda.empty_cache()
        if len(group) > 1:
            self.wave = 1
            log.warning("GPU out of memory decoding %d batches at once: decoding one batch at a time from here"
                        " (lower evaluate.concurrent_batches or evaluate.max_batch_tokens to avoid it)", len(group))
            return
        (batch,) = group
        if len(batch) == 1:
            with_new = f" with max_new_tokens {new_tokens}" if new_tokens else ""
            raise UserError(f"evaluation ran out of GPU memory on one prompt of {len(encoded[batch[0]])} tokens"
                            f"{with_new}: lower evaluate.max_new_tokens or data.max_seq_length, or use a larger GPU")
        self.rows = (len(batch) + 1) // 2
        log.warning("GPU out of memory decoding %d rows of up to %d tokens: at most %d rows per batch from here"
                    " (lower evaluate.max_batch_tokens to avoid it)", len(batch), len(encoded[batch[0]]) + new_tokens,
                    self.rows)


def _at_most(batch: list[int], rows: int | None) -> list[list[int]]:
    if rows is None or len(batch) <= rows:
        return [batch]
    return [batch[start:start + rows] for start in range(0, len(batch), rows)]


def generate_all(decode_batch: BatchDecoder, tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]],
                 batch_size: int, device, desc: str = "generate", max_batch_tokens: int | None = None,
                 new_tokens: int = 0, show_progress: bool = True) -> list[tuple[str, int]]:
    """Generate for every prompt (text, or token ids); return (decoded text, generated token count) in order."""
    if not prompts:  # a process of a sharded run can get no rows
        return []
    encoded = encode_prompts(tokenizer, prompts) if isinstance(prompts[0], str) else [list(p) for p in prompts]
    tokens = generate_token_ids(decode_batch, encoded, tokenizer.pad_token_id,
                                stop_token_ids(tokenizer), batch_size, device, desc, max_batch_tokens, new_tokens,
                                show_progress)
    return [(tokenizer.decode(t, skip_special_tokens=True).strip(), len(t)) for t in tokens]


def hf_greedy(model, tokenizer, max_new_tokens: int, static_cache: bool = False) -> BatchDecoder:
    """Plain `model.generate`, greedy; returns only the tokens after the prompt. `static_cache` lets
    transformers compile the decoding step (worth it for long runs on a GPU)."""
    stops = stop_token_ids(tokenizer)
    extra = {"cache_implementation": "static"} if static_cache else {}

    @torch.inference_mode()
    def decode(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, top_p=None, top_k=None, temperature=None, **extra,
        )
        return out[:, ids.shape[1]:]

    return decode
