"""Conversations in the tokenizer's own chat template, and their tokens with an assistant-token mask.

`ChatTemplate(tokenizer)` owns everything peftlab does with a chat template:

- **Training text**: `tokenizer.apply_chat_template(messages)`, tokenised without adding special
  tokens (the template writes the ones it wants: Gemma 3's one `<bos>`, Llama 3's `<|begin_of_text|>`,
  none for ChatML).
- **Evaluation prompt**: the conversation before the last assistant turn with the template's
  generation prompt.
- **Assistant spans** (the loss targets): the template's `{% generation %}` blocks where it has them;
  otherwise each assistant turn runs from the end of the template's generation prompt for it (which
  must be a prefix of the whole text and a token prefix of its ids) through the first control token
  the template writes after the answer (its turn end: `<end_of_turn>`, `<|im_end|>`, `<|eot_id|>`),
  which is also a stop token for generation. For Gemma 3 that is exactly the answer and its
  `<end_of_turn>`, as before.
- **Content is text**: each message's content is located in the rendered text (the template is
  rendered once more with placeholder contents); control tokens are taken only where the template
  wrote them, so `<end_of_turn>` typed in a user's message cannot forge a turn and an answer quoting
  it does not teach the model to stop mid-answer.
- **System prompts**: a leading system message is kept where the template has a system turn, folded
  into the first user message (`system + "\\n\\n" + user`, how peftlab always stored it) where the
  template renders it exactly so (Gemma 3), and refused with the row named where the template
  rejects it.

Anything the template cannot do is one `UserError` line: no template, a conversation it rejects, a
content it rewrites, an assistant turn it gives no end or no generation prompt for.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

from peftlab.errors import UserError

Message = dict[str, str]

# Placeholder contents (private-use characters): a template renders them verbatim and no data holds them.
_PLACEHOLDER = "\ue000peftlab-{}\ue001"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_HELP = "see docs/own-model.md"


@dataclass
class Rendered:
    text: str
    # Character spans [start, end) of each assistant turn's loss targets (the answer and its turn end).
    assistant_spans: list[tuple[int, int]]
    # Character spans [start, end) of every message's content: always tokenised as plain text.
    content_spans: list[tuple[int, int]] = field(default_factory=list)
    # Length of the text before each assistant turn's answer (its generation prompt), for the prefix check.
    prompt_lengths: list[int] = field(default_factory=list)


@dataclass
class Tokenized:
    input_ids: list[int]
    # Token spans [start, end) that are assistant tokens (the loss targets by default).
    assistant_spans: list[list[int]]
    truncated: bool = False

    @property
    def num_assistant_tokens(self) -> int:
        return sum(end - start for start, end in self.assistant_spans)


class ChatTemplate:
    """A tokenizer's chat template, checked once: its turn end, its system role, its control tokens."""

    def __init__(self, tokenizer, source: str = "the tokenizer") -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise UserError(f"{source}: the tokenizer must be a fast (Rust) tokenizer: character offsets are needed")
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{source} has no chat template: peftlab renders every conversation with the tokenizer's"
                            " own template; use an instruction-tuned model's tokenizer (model.tokenizer), "
                            + _HELP)
        self.tokenizer = tokenizer
        self.source = source
        self.template: str = tokenizer.get_chat_template()
        self.has_generation_markers = bool(_GENERATION_TAG.search(self.template))
        self.control_ids = frozenset(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
        self.turn_end, self.turn_end_id = self._find_turn_end()
        self.system = self._probe_system()

    # -- what the template does ------------------------------------------------------------------

    def _apply(self, messages: Sequence[Message], where: str, *, generation_prompt: bool = False) -> str:
        try:
            text = self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja's TemplateError from raise_exception, or any error inside the template
            roles = "/".join(m["role"] for m in messages)
            raise UserError(f"{where}: the chat template of {self.source} rejects this conversation ({roles}):"
                            f" {_first_line(exc)}") from None
        if not isinstance(text, str):
            raise UserError(f"{where}: the chat template of {self.source} did not render text")
        return text

    def _find_turn_end(self) -> tuple[str, int]:
        """The first control token the template writes after an assistant's answer."""
        probe = _placeholders([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}])
        text = self._apply(probe, f"{self.source} (probing a user/assistant exchange)")
        answer = probe[-1]["content"]
        if answer not in text:
            raise UserError(f"the chat template of {self.source} does not render an assistant's answer verbatim (it"
                            " drops or rewrites it); peftlab cannot place the assistant tokens")
        after = text[text.index(answer) + len(answer):]
        encoding = self.tokenizer(after, add_special_tokens=False, return_offsets_mapping=True)
        for token_id, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True):
            if token_id in self.control_ids:
                return after[start:end], token_id
        raise UserError(f"the chat template of {self.source} writes no control token after an assistant's answer"
                        f" (it writes {after!r}): peftlab cannot place the end of an assistant turn, which the"
                        " model must learn to stop at; " + _HELP)

    def _probe_system(self) -> str:
        """`turn` (a system turn of its own), `fold` (rendered as `system\\n\\nuser`) or `rejected: <why>`."""
        system, user, answer = (_PLACEHOLDER.format(f"s{i}") for i in range(3))
        with_system = [{"role": "system", "content": system}, {"role": "user", "content": user},
                       {"role": "assistant", "content": answer}]
        try:
            text = self.tokenizer.apply_chat_template(with_system, tokenize=False)
        except Exception as exc:
            return f"rejected: {_first_line(exc)}"
        folded = self._apply([{"role": "user", "content": f"{system}\n\n{user}"},
                              {"role": "assistant", "content": answer}], f"{self.source} (probing)")
        if text == folded:
            return "fold"
        if system not in text:
            return "rejected: the template drops the system message"
        return "turn"

    @property
    def stop_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id, self.turn_end_id}
        return sorted(i for i in ids if i is not None)

    # -- conversations ---------------------------------------------------------------------------

    def conversation(self, messages: Sequence[Message], where: str) -> list[Message]:
        """The messages as this template takes them: a leading system message kept, folded, or refused."""
        messages = [dict(m) for m in messages]
        if not messages or messages[0]["role"] != "system":
            return messages
        if self.system == "fold":
            system, first, *rest = messages
            return [{"role": first["role"], "content": f"{system['content']}\n\n{first['content']}"}, *rest]
        if self.system.startswith("rejected"):
            why = self.system.removeprefix("rejected: ")
            raise UserError(f"{where}: this row has a system prompt ({_preview(messages[0]['content'])}) but the chat"
                            f" template of {self.source} has no system role ({why}); remove the system prompts"
                            " from the data or use a tokenizer whose template has one")
        return messages

    def render(self, messages: Sequence[Message], where: str = "conversation") -> Rendered:
        """The whole conversation (ending with an assistant turn) and where its assistant tokens are."""
        text = self._apply(messages, where)
        contents = self._content_spans(messages, text, where)
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.has_generation_markers:
            return Rendered(text, self._marked_spans(messages, text, where), contents)
        spans, prompt_lengths = [], []
        for index in assistant:
            prompt = self._apply(messages[:index], where, generation_prompt=True)
            start, end = contents[index]
            if not text.startswith(prompt) or len(prompt) > start:
                raise UserError(
                    f"{where}: the chat template of {self.source} renders assistant turn {index} differently from"
                    f" its generation prompt (prompt ends {prompt[-40:]!r}, the conversation has"
                    f" {text[max(0, len(prompt) - 40):len(prompt)]!r}); peftlab cannot place the assistant tokens")
            following = contents[index + 1][0] if index + 1 < len(contents) else len(text)
            turn_end = text.find(self.turn_end, end, following)
            if turn_end < 0:
                raise UserError(f"{where}: the chat template of {self.source} ends assistant turn {index} without"
                                f" {self.turn_end}; peftlab cannot place the end of the assistant turn")
            spans.append((len(prompt), turn_end + len(self.turn_end)))
            prompt_lengths.append(len(prompt))
        return Rendered(text, spans, contents, prompt_lengths)

    def render_prompt(self, messages: Sequence[Message], where: str = "conversation") -> Rendered:
        """The conversation before its last assistant turn, ending with the template's generation prompt."""
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("a prompt is built from a conversation that ends with an assistant turn")
        before = list(messages[:-1])
        text = self._apply(before, where, generation_prompt=True)
        return Rendered(text, [], self._content_spans(before, text, where, generation_prompt=True))

    def _content_spans(self, messages: Sequence[Message], text: str, where: str, *,
                       generation_prompt: bool = False) -> list[tuple[int, int]]:
        """Where each message's content is in `text`: the template rendered with placeholder contents
        must give `text` back when the placeholders are replaced by the contents."""
        skeleton = self._apply(_placeholders(messages), where, generation_prompt=generation_prompt)
        spans, rebuilt, cursor = [], [], 0
        for index, message in enumerate(messages):
            placeholder = _PLACEHOLDER.format(index)
            found = skeleton.find(placeholder, cursor)
            if found < 0:
                raise UserError(f"{where}: the chat template of {self.source} drops message {index}"
                                f" ({message['role']}); peftlab trains only on conversations it renders whole")
            rebuilt.append(skeleton[cursor:found])
            start = sum(map(len, rebuilt))
            rebuilt.append(message["content"])
            spans.append((start, start + len(message["content"])))
            cursor = found + len(placeholder)
        rebuilt.append(skeleton[cursor:])
        if "".join(rebuilt) != text:
            raise UserError(f"{where}: the chat template of {self.source} changes the text of a message (e.g. trims"
                            " or escapes it); peftlab needs each content verbatim to tokenise it as text")
        return spans

    def _marked_spans(self, messages: Sequence[Message], text: str, where: str) -> list[tuple[int, int]]:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, indices = render_jinja_template(
            conversations=[list(messages)], chat_template=self.template, return_assistant_tokens_mask=True,
            **self.tokenizer.special_tokens_map)
        spans = [(int(start), int(end)) for start, end in indices[0]]
        if rendered[0] != text or not spans:
            raise UserError(f"{where}: the {{% generation %}} blocks of the chat template of {self.source} mark no"
                            " assistant text; peftlab cannot place the assistant tokens")
        return spans

    # -- tokens ----------------------------------------------------------------------------------

    def tokenize(self, rendered: Rendered, max_length: int | None = None, where: str = "conversation") -> Tokenized:
        """Ids of the whole text (content as text), assistant token spans; each generation prompt must
        tokenise as a prefix of the whole, else evaluation would see other tokens than training did."""
        ids, offsets = self.encode(rendered.text, rendered.content_spans)
        for number, length in enumerate(rendered.prompt_lengths):
            prompt_ids, _ = self.encode(rendered.text[:length], [s for s in rendered.content_spans if s[1] <= length])
            if ids[:len(prompt_ids)] != prompt_ids:
                raise UserError(f"{where}: the generation prompt before assistant turn {number + 1} is not a token"
                                f" prefix of the conversation under {self.source} (its last token merges with the"
                                " answer); peftlab cannot train and evaluate on the same tokens")
        mask = [_inside(start, end, rendered.assistant_spans) for start, end in offsets]
        truncated = max_length is not None and len(ids) > max_length
        if truncated:
            ids, mask = ids[:max_length], mask[:max_length]
        return Tokenized(ids, _runs(mask), truncated)

    def encode_prompt(self, messages: Sequence[Message], where: str = "conversation") -> list[int]:
        rendered = self.render_prompt(messages, where)
        return self.encode(rendered.text, rendered.content_spans)[0]

    def encode(self, text: str, content_spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and character offsets of `text`, control tokens only where the template wrote them.

        The plain tokenisation is kept unless a control token falls inside a content; then the text is
        cut at the template's own control tokens and each piece between is tokenised with control-token
        text read as text (`split_special_tokens`)."""
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]]
        if not any(i in self.control_ids and _overlaps(o, content_spans) for i, o in zip(ids, offsets, strict=True)):
            return ids, offsets
        return self.encode_segmented(text, content_spans)

    def encode_segmented(self, text: str, content_spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode` for a text whose contents hold control-token text (the same ids as the plain call otherwise)."""
        controls = self._template_controls(text, content_spans)
        ids, offsets, cursor = [], [], 0
        for start, end, token_id in [*controls, (len(text), len(text), None)]:
            if start > cursor:
                piece = self.tokenizer(text[cursor:start], add_special_tokens=False, return_offsets_mapping=True,
                                       split_special_tokens=True)
                ids += piece["input_ids"]
                offsets += [(a + cursor, b + cursor) for a, b in piece["offset_mapping"]]
            if token_id is not None:
                ids.append(token_id)
                offsets.append((start, end))
            cursor = end
        return ids, offsets

    def _template_controls(self, text: str, content_spans: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """(start, end, id) of each control token inside the template's own text (outside every content)."""
        controls = []
        bounds = [0, *(x for span in sorted(content_spans) for x in span), len(text)]
        for start, end in zip(bounds[::2], bounds[1::2], strict=True):
            if end <= start:
                continue
            piece = self.tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True)
            controls += [(start + a, start + b, i) for i, (a, b) in zip(piece["input_ids"], piece["offset_mapping"],
                                                                        strict=True) if i in self.control_ids]
        return controls


_TEMPLATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def chat_template(tokenizer, source: str | None = None) -> ChatTemplate:
    """The (checked, cached) `ChatTemplate` of a tokenizer."""
    cached = _TEMPLATES.get(tokenizer)
    if cached is None:
        name = source or f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}"
        cached = _TEMPLATES[tokenizer] = ChatTemplate(tokenizer, name)
    return cached


def fit_exchanges(messages: Sequence[Message], chat: ChatTemplate, max_length: int,
                  where: str = "conversation") -> list[Message] | None:
    """The longest start of a conversation that ends in an assistant turn answering a user turn and
    renders within `max_length` tokens, or None when even the first exchange is longer.

    An evaluation row is its prompt (every turn before the last answer) and that answer as the
    reference: cutting the conversation at a turn boundary keeps both whole and within the length
    training sees, where cutting tokens would score an answer that training never reached."""
    for end in range(len(messages), 1, -1):
        if messages[end - 1]["role"] != "assistant" or messages[end - 2]["role"] != "user":
            continue
        kept = list(messages[:end])
        if len(chat.tokenize(chat.render(kept, where), None, where).input_ids) <= max_length:
            return kept
    return None


def render_prompt(messages: Sequence[Message], tokenizer) -> str:
    """The evaluation prompt's text (the conversation before its last answer + the generation prompt)."""
    return chat_template(tokenizer).render_prompt(messages).text


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and the template's turn end; EOS alone for a tokenizer without a chat template."""
    if getattr(tokenizer, "chat_template", None):
        return chat_template(tokenizer).stop_token_ids
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _placeholders(messages: Sequence[Message]) -> list[Message]:
    return [{**m, "content": _PLACEHOLDER.format(i)} for i, m in enumerate(messages)]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:200] if text else type(exc).__name__)


def _preview(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _overlaps(offset: tuple[int, int], spans: Sequence[tuple[int, int]]) -> bool:
    start, end = offset
    return any(start < hi and lo < end for lo, hi in spans)


def _inside(start: int, end: int, spans: Sequence[tuple[int, int]]) -> bool:
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
