"""The Gemma 3 chat format, and tokenisation with an assistant-token mask.

Rendering (what `tokenizer.apply_chat_template` gives for Gemma 3, with exactly one `<bos>`):

    <bos><start_of_turn>user\\n{user}<end_of_turn>\\n<start_of_turn>model\\n{assistant}<end_of_turn>\\n

The text already holds `<bos>`, so it is tokenised with `add_special_tokens=False`: the original
study let the tokenizer add a second one. Assistant tokens (each answer and its `<end_of_turn>`)
are found from the tokenizer's character offsets, so the ids are exactly those of the whole text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from peftlab.errors import UserError

BOS = "<bos>"
START = "<start_of_turn>"
END = "<end_of_turn>"
ROLE_TAGS = {"user": "user", "assistant": "model"}


@dataclass
class Rendered:
    text: str
    # Character spans [start, end) of each assistant answer including its <end_of_turn>.
    assistant_spans: list[tuple[int, int]]


@dataclass
class Tokenized:
    input_ids: list[int]
    # Token spans [start, end) that are assistant tokens (the loss targets by default).
    assistant_spans: list[list[int]]
    truncated: bool = False

    @property
    def num_assistant_tokens(self) -> int:
        return sum(end - start for start, end in self.assistant_spans)


def render(messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = False) -> Rendered:
    parts = [BOS]
    spans: list[tuple[int, int]] = []
    offset = len(BOS)
    for message in messages:
        header = f"{START}{ROLE_TAGS[message['role']]}\n"
        body = f"{message['content']}{END}"
        if message["role"] == "assistant":
            spans.append((offset + len(header), offset + len(header) + len(body)))
        chunk = f"{header}{body}\n"
        parts.append(chunk)
        offset += len(chunk)
    if add_generation_prompt:
        parts.append(f"{START}model\n")
    return Rendered("".join(parts), spans)


def render_prompt(messages: Sequence[dict[str, str]]) -> str:
    """The conversation up to (not including) the last assistant turn, ending with the model header."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a prompt is built from a conversation that ends with an assistant turn")
    return render(messages[:-1], add_generation_prompt=True).text


def tokenize(rendered: Rendered, tokenizer, max_length: int | None = None) -> Tokenized:
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("the tokenizer must be a fast (Rust) tokenizer: character offsets are needed")
    encoding = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoding["input_ids"])
    offsets = encoding["offset_mapping"]
    mask = [_inside(start, end, rendered.assistant_spans) for start, end in offsets]
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, mask = ids[:max_length], mask[:max_length]
    return Tokenized(ids, _runs(mask), truncated)


def fit_exchanges(messages: Sequence[dict[str, str]], tokenizer, max_length: int) -> list[dict[str, str]] | None:
    """The longest start of a conversation that ends in an assistant turn answering a user turn and
    renders within `max_length` tokens, or None when even the first exchange is longer.

    An evaluation row is its prompt (every turn before the last answer) and that answer as the
    reference: cutting the conversation at a turn boundary keeps both whole and within the length
    training sees, where cutting tokens would score an answer that training never reached."""
    for end in range(len(messages), 1, -1):
        if messages[end - 1]["role"] != "assistant" or messages[end - 2]["role"] != "user":
            continue
        kept = list(messages[:end])
        if len(tokenize(render(kept), tokenizer).input_ids) <= max_length:
            return kept
    return None


def _inside(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    return end > start and any(lo <= start and end <= hi for lo, hi in spans)


def _runs(mask: list[bool]) -> list[list[int]]:
    runs: list[list[int]] = []
    for index, flag in enumerate(mask):
        if not flag:
            continue
        if runs and runs[-1][1] == index:
            runs[-1][1] = index + 1
        else:
            runs.append([index, index + 1])
    return runs


def spans_to_mask(length: int, spans: Sequence[Sequence[int]]) -> list[int]:
    mask = [0] * length
    for start, end in spans:
        mask[start:end] = [1] * (end - start)
    return mask
