"""Conversion of source rows (alpaca, tulu, ultrachat, messages, sharegpt) into one conversation shape.

The result is a list of `{"role": "user"|"assistant", "content": str}` turns that starts with the
user (after at most one leading `system` message), alternates, and ends with the assistant (report
section 4, done as the report intends):

- alpaca: `instruction` + "\\n\\nInput: " + `input` when input is non-empty; `output` is the answer.
- tulu / messages / ultrachat / sharegpt: roles normalised (human -> user, gpt -> assistant);
  system messages before the first user message become one leading `system` message (joined by
  "\\n\\n"; `chat.py` keeps, folds or refuses it as the tokenizer's template does); a system
  message later in the conversation is prepended to the next user message as `system + "\\n\\n" + user`.

A row that is well-formed but unusable (empty content, turns that do not alternate, a conversation
ending on a user turn) is *dropped* and counted by reason. A row that is malformed (a missing field,
a wrong type, an unknown role) is a user error: the input file is not what its `format` says.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from peftlab.errors import UserError

Message = dict[str, str]

ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
}

# Reasons a row is dropped; stats.json counts every one of them.
DROP_REASONS = (
    "empty_content",
    "not_starting_with_user",
    "not_alternating",
    "not_ending_with_assistant",
    "system_without_user",
    "empty_conversation",
)


class Dropped(Exception):
    """A row that is valid input but cannot be a training example; `reason` is one of DROP_REASONS."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def convert_row(row: dict[str, Any], fmt: str, where: str) -> list[Message]:
    """Convert one source row to user/assistant turns, or raise Dropped / UserError (naming `where`)."""
    converter = CONVERTERS.get(fmt)
    if converter is None:
        raise UserError(f"unknown format '{fmt}' (known: {', '.join(CONVERTERS)})")
    return converter(row, where)


def _field(row: dict[str, Any], key: str, where: str, *, required: bool = True) -> Any:
    if key not in row or row[key] is None:
        if required:
            raise UserError(f"{where}: missing field '{key}'")
        return None
    return row[key]


def _text(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value.strip()


def convert_alpaca(row: dict[str, Any], where: str) -> list[Message]:
    instruction = _text(_field(row, "instruction", where), where, "instruction")
    extra = _field(row, "input", where, required=False)
    input_text = _text(extra, where, "input") if extra is not None else ""
    output = _text(_field(row, "output", where), where, "output")
    user = f"{instruction}\n\nInput: {input_text}" if input_text else instruction
    return _validate([{"role": "user", "content": user}, {"role": "assistant", "content": output}])


def convert_messages(row: dict[str, Any], where: str) -> list[Message]:
    """tulu, ultrachat and generic `messages` rows: a list of {role, content}."""
    return _normalise(_turn_list(row, "messages", where), "role", "content", where)


def convert_sharegpt(row: dict[str, Any], where: str) -> list[Message]:
    return _normalise(_turn_list(row, "conversations", where), "from", "value", where)


def _turn_list(row: dict[str, Any], key: str, where: str) -> list[Any]:
    turns = _field(row, key, where)
    if not isinstance(turns, list):
        raise UserError(f"{where}: field '{key}' must be a list of turns, got {type(turns).__name__}")
    return turns


def _normalise(turns: list[Any], role_key: str, content_key: str, where: str) -> list[Message]:
    messages: list[Message] = []
    pending_system: list[str] = []
    for index, turn in enumerate(turns):
        at = f"{where}, turn {index}"
        if not isinstance(turn, dict):
            raise UserError(f"{at}: expected an object with '{role_key}' and '{content_key}'")
        raw_role = _field(turn, role_key, at)
        role = ROLE_ALIASES.get(str(raw_role).lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise UserError(f"{at}: unknown role {raw_role!r} (known: {', '.join(ROLE_ALIASES)})")
        content = _text(_field(turn, content_key, at), at, content_key)
        if role == "system":
            if content:
                pending_system.append(content)
            continue
        if role == "user" and pending_system:
            if messages:
                content = "\n\n".join([*pending_system, content])
            else:  # before the first turn: the conversation's system prompt
                messages.append({"role": "system", "content": "\n\n".join(pending_system)})
            pending_system = []
        messages.append({"role": role, "content": content})
    if pending_system:
        raise Dropped("system_without_user")
    return _validate(messages)


def _validate(messages: list[Message]) -> list[Message]:
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns:
        raise Dropped("empty_conversation")
    if any(not m["content"] for m in turns):
        raise Dropped("empty_content")
    if turns[0]["role"] != "user":
        raise Dropped("not_starting_with_user")
    for previous, current in itertools.pairwise(turns):
        if previous["role"] == current["role"]:
            raise Dropped("not_alternating")
    if turns[-1]["role"] != "assistant":
        raise Dropped("not_ending_with_assistant")
    return messages


CONVERTERS: dict[str, Callable[[dict[str, Any], str], list[Message]]] = {
    "alpaca": convert_alpaca,
    "tulu": convert_messages,
    "ultrachat": convert_messages,
    "messages": convert_messages,
    "sharegpt": convert_sharegpt,
}
