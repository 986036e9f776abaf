"""Conversion of each source format into user/assistant turns (report section 4, done as intended)."""

from __future__ import annotations

import pytest

from peftlab.data.formats import Dropped, convert_row
from peftlab.errors import UserError


def test_alpaca_joins_instruction_and_input():
    row = {"instruction": " Summarise ", "input": "Some text", "output": "Short."}
    assert convert_row(row, "alpaca", "f row 0") == [
        {"role": "user", "content": "Summarise\n\nInput: Some text"},
        {"role": "assistant", "content": "Short."},
    ]
    row["input"] = "  "
    assert convert_row(row, "alpaca", "f row 0")[0]["content"] == "Summarise"


def test_a_leading_system_prompt_stays_a_system_message_and_roles_are_normalised():
    row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Use English."},
        {"role": "human", "content": "Hi"},
        {"role": "gpt", "content": "Hello"},
    ]}
    assert convert_row(row, "tulu", "w") == [
        {"role": "system", "content": "Be brief.\n\nUse English."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]


def test_a_later_system_message_is_prepended_to_the_next_user_turn():
    row = {"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "system", "content": "Now be brief."},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Because."},
    ]}
    assert [m["content"] for m in convert_row(row, "tulu", "w")] == [
        "Hi", "Hello", "Now be brief.\n\nWhy?", "Because."]


def test_a_system_prompt_before_an_unanswered_user_turn_is_dropped():
    with pytest.raises(Dropped, match="not_ending_with_assistant"):
        convert_row({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}, "tulu", "w")


def test_sharegpt_uses_from_and_value():
    row = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    assert convert_row(row, "sharegpt", "w") == [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


@pytest.mark.parametrize(("messages", "reason"), [
    ([], "empty_conversation"),
    ([{"role": "user", "content": "q"}], "not_ending_with_assistant"),
    ([{"role": "assistant", "content": "a"}], "not_starting_with_user"),
    ([{"role": "user", "content": "q"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
     "not_alternating"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], "empty_content"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "system", "content": "s"}],
     "system_without_user"),
])
def test_unusable_conversations_are_dropped_with_a_reason(messages, reason):
    with pytest.raises(Dropped) as drop:
        convert_row({"messages": messages}, "ultrachat", "w")
    assert drop.value.reason == reason


def test_alpaca_empty_output_is_dropped():
    with pytest.raises(Dropped, match="empty_content"):
        convert_row({"instruction": "x", "input": "", "output": ""}, "alpaca", "w")


@pytest.mark.parametrize(("row", "fmt", "message"), [
    ({"instruction": "x"}, "alpaca", "f.json row 3: missing field 'output'"),
    ({"instruction": 1, "output": "y"}, "alpaca", "field 'instruction' must be a string"),
    ({"messages": "hi"}, "tulu", "field 'messages' must be a list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "tulu", "turn 0: unknown role 'robot'"),
    ({"messages": [{"role": "user"}]}, "ultrachat", "turn 0: missing field 'content'"),
    ({"text": "x"}, "csv", "unknown format 'csv'"),
])
def test_malformed_rows_are_user_errors_naming_the_row(row, fmt, message):
    with pytest.raises(UserError) as error:
        convert_row(row, fmt, "f.json row 3")
    assert message in str(error.value)
