"""Tests for the synthetic demo data generator (peftlab.data.demo).

The answer checks recompute each answer from the prompt text alone (independent regexes, not the
generator's templates), so a wrong answer or an unparseable prompt fails the test.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from peftlab.data.demo import FILE_NAMES, SCHEMAS, generate_rows, write_demo_files

N = 400

KEYS = {
    "alpaca": {"instruction", "input", "output"},
    "tulu": {"dataset", "id", "messages"},
    "ultrachat": {"prompt", "prompt_id", "messages"},
}


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict[str, Any]]]:
    return {schema: generate_rows(schema, N, seed=0) for schema in SCHEMAS}


def first_turns(rows: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str]]:
    """(prompt, answer) of the first exchange of every row of every schema."""
    pairs = [(f"{r['instruction']} {r['input']}".strip(), r["output"]) for r in rows["alpaca"]]
    for schema in ("tulu", "ultrachat"):
        for row in rows[schema]:
            turns = [m for m in row["messages"] if m["role"] != "system"]
            pairs.append((turns[0]["content"], turns[1]["content"]))
    return pairs


def exchanges(rows: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str, str]]:
    """(previous answer, follow-up question, answer) for every follow-up turn of tulu and ultrachat."""
    out = []
    for schema in ("tulu", "ultrachat"):
        for row in rows[schema]:
            turns = [m["content"] for m in row["messages"] if m["role"] != "system"]
            out += [(turns[i - 1], turns[i], turns[i + 1]) for i in range(2, len(turns), 2)]
    return out


# --- schema --------------------------------------------------------------------------------------


def test_every_row_has_exactly_the_schema_keys(rows: dict[str, list[dict[str, Any]]]) -> None:
    for schema in SCHEMAS:
        assert len(rows[schema]) == N
        for row in rows[schema]:
            assert set(row) == KEYS[schema], (schema, row)
            for key, value in row.items():
                if key != "messages":
                    assert isinstance(value, str), (schema, key, value)
        for row in rows[schema] if schema != "alpaca" else []:
            for message in row["messages"]:
                assert set(message) == {"role", "content"}
                assert isinstance(message["content"], str) and message["content"]


def test_alpaca_has_empty_input_about_half_the_time(rows: dict[str, list[dict[str, Any]]]) -> None:
    empty = sum(r["input"] == "" for r in rows["alpaca"])
    assert 0.35 * N < empty < 0.65 * N
    assert all(r["instruction"] and r["output"] for r in rows["alpaca"])


def test_tulu_has_system_messages_and_follow_ups(rows: dict[str, list[dict[str, Any]]]) -> None:
    with_system = follow_ups = 0
    for i, row in enumerate(rows["tulu"]):
        assert row["id"] == f"demo_tulu_{i:06d}"
        roles = [m["role"] for m in row["messages"]]
        if roles[0] == "system":
            with_system += 1
            roles = roles[1:]
        assert "system" not in roles
        assert roles in (["user", "assistant"], ["user", "assistant", "user", "assistant"]), roles
        follow_ups += len(roles) == 4
    assert 0.15 * N < with_system < 0.45 * N
    assert 0.15 * N < follow_ups < 0.45 * N


def test_ultrachat_alternates_and_ends_with_assistant(rows: dict[str, list[dict[str, Any]]]) -> None:
    multi_turn = 0
    for i, row in enumerate(rows["ultrachat"]):
        assert row["prompt_id"] == f"demo_ultrachat_{i:06d}"
        roles = [m["role"] for m in row["messages"]]
        assert len(roles) % 2 == 0 and 2 <= len(roles) <= 6
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert row["prompt"] == row["messages"][0]["content"]
        multi_turn += len(roles) >= 4
    assert multi_turn > 0.7 * N


# --- determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize("schema", SCHEMAS)
def test_same_seed_is_identical_and_other_seed_differs(schema: str) -> None:
    a = json.dumps(generate_rows(schema, 200, seed=3))  # type: ignore[arg-type]
    b = json.dumps(generate_rows(schema, 200, seed=3))  # type: ignore[arg-type]
    c = json.dumps(generate_rows(schema, 200, seed=4))  # type: ignore[arg-type]
    assert a == b
    assert a != c


@pytest.mark.parametrize("schema", SCHEMAS)
def test_rows_are_prefix_stable(schema: str) -> None:
    assert generate_rows(schema, 50) == generate_rows(schema, 120)[:50]  # type: ignore[arg-type]


def test_schemas_use_different_phrasings(rows: dict[str, list[dict[str, Any]]]) -> None:
    def openings(schema: str) -> set[str]:
        pairs = first_turns({s: rows[s] if s == schema else [] for s in SCHEMAS})
        return {" ".join(prompt.split()[:2]) for prompt, _ in pairs}

    assert openings("tulu") != openings("ultrachat")
    assert openings("alpaca") != openings("tulu")


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError):
        generate_rows("sharegpt", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        generate_rows("tulu", -1)
    assert generate_rows("tulu", 0) == []


def test_generation_is_fast() -> None:
    start = time.perf_counter()
    for schema in SCHEMAS:
        generate_rows(schema, 1000)
    assert time.perf_counter() - start < 2.0  # about 0.05 s in practice; generous for slow CI


# --- answers recomputed from the prompts ---------------------------------------------------------

ARITHMETIC = [
    (r"subtract (\d+) from (\d+)", lambda x, y: y - x),
    (r"take (\d+) away from (\d+)", lambda x, y: y - x),
    (r"subtract the second number from the first\W+(\d+) and (\d+)", lambda x, y: x - y),
    (r"(\d+) (?:minus|-) (\d+)", lambda x, y: x - y),
    (r"(\d+) (?:plus|\+) (\d+)", lambda x, y: x + y),
    (r"add (?:the following two numbers\W+)?(\d+) (?:and|to) (\d+)", lambda x, y: x + y),
    (r"(\d+) (?:times|\*|x|multiplied by) (\d+)", lambda x, y: x * y),
    (r"multiply (?:the following two numbers\W+)?(\d+) (?:and|by) (\d+)", lambda x, y: x * y),
]


def solve_arithmetic(prompt: str) -> int | None:
    for pattern, op in ARITHMETIC:
        m = re.search(pattern, prompt, flags=re.IGNORECASE)
        if m:
            return op(int(m.group(1)), int(m.group(2)))
    return None


def test_arithmetic_answers_are_correct(rows: dict[str, list[dict[str, Any]]]) -> None:
    checked = 0
    for prompt, answer in first_turns(rows):
        m = re.fullmatch(r"The answer is (-?\d+)\.", answer)
        if m is None:
            continue
        expected = solve_arithmetic(prompt)
        assert expected is not None, f"unrecognised arithmetic prompt: {prompt!r}"
        assert int(m.group(1)) == expected, (prompt, answer)
        checked += 1
    assert checked >= 100


def test_sort_answers_are_correct(rows: dict[str, list[dict[str, Any]]]) -> None:
    checked = 0
    for prompt, answer in first_turns(rows):
        lower = prompt.lower()
        if not re.search(r"\b(sort|order)\b", lower):
            continue
        descending = "descending" in lower or "largest to smallest" in lower
        assert descending or "ascending" in lower or "smallest to largest" in lower, prompt
        numbers = [int(x) for x in re.search(r"\d+(?:, \d+)+", prompt).group(0).split(", ")]  # type: ignore[union-attr]
        assert answer == ", ".join(map(str, sorted(numbers, reverse=descending))), (prompt, answer)
        checked += 1
    assert checked >= 40


def test_reverse_word_answers_are_correct(rows: dict[str, list[dict[str, Any]]]) -> None:
    checked = 0
    for prompt, answer in first_turns(rows):
        if not re.search(r"revers|backwards", prompt, flags=re.IGNORECASE):
            continue
        quoted = re.search(r'"([a-z]+)"', prompt)
        word = quoted.group(1) if quoted else prompt.split()[-1]
        assert answer == f"The reversed word is {word[::-1]}.", (prompt, answer)
        checked += 1
    assert checked >= 20


def test_min_max_and_dedup_answers_are_correct(rows: dict[str, list[dict[str, Any]]]) -> None:
    checked = 0
    for prompt, answer in first_turns(rows):
        found = re.search(r"\d+(?:, \d+)+", prompt)
        if found is None:
            continue
        numbers = [int(x) for x in found.group(0).split(", ")]
        if answer.startswith("The largest number is"):
            assert answer == f"The largest number is {max(numbers)}.", prompt
        elif answer.startswith("The smallest number is"):
            assert answer == f"The smallest number is {min(numbers)}.", prompt
        elif re.search(r"duplicate|repeat", prompt):
            assert answer == ", ".join(map(str, dict.fromkeys(numbers))), (prompt, answer)
        else:
            continue
        checked += 1
    assert checked >= 40


FOLLOW_UPS = [
    (r"add (\d+) to (?:the result|that)", lambda prev, k: prev + k),
    (r"subtract (\d+) from (?:the result|that)", lambda prev, k: prev - k),
    (r"multiply (?:the result|that) by (\d+)", lambda prev, k: prev * k),
    (r"double (?:that number|it)", lambda prev, k: prev * 2),
]


def test_follow_ups_operate_on_the_previous_answer(rows: dict[str, list[dict[str, Any]]]) -> None:
    arithmetic = lists = 0
    for previous, question, answer in exchanges(rows):
        for pattern, op in FOLLOW_UPS:
            m = re.search(pattern, question, flags=re.IGNORECASE)
            if m:
                (prev_text,) = re.findall(r"-?\d+", previous)  # e.g. "The word has 5 letters."
                prev = int(prev_text)
                k = int(m.group(1)) if m.groups() else 0
                assert answer == f"The answer is {op(prev, k)}.", (previous, question, answer)
                arithmetic += 1
        if re.search(r"reverse (?:that list|the order of that list)", question, flags=re.IGNORECASE):
            assert answer.split(", ") == previous.split(", ")[::-1], (previous, question, answer)
            lists += 1
        if question == "What is the sum of those numbers?":
            assert answer == f"The answer is {sum(int(x) for x in previous.split(', '))}."
            lists += 1
    assert arithmetic >= 40
    assert lists >= 10


# --- files ---------------------------------------------------------------------------------------


def test_write_demo_files_writes_parseable_files(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    paths = write_demo_files(out, n_per_schema=25, seed=1)
    assert set(paths) == set(SCHEMAS)
    assert {p.name for p in paths.values()} == set(FILE_NAMES.values())
    assert sorted(p.name for p in out.iterdir()) == sorted(FILE_NAMES.values())  # no temp files left

    alpaca = json.loads(paths["alpaca"].read_text(encoding="utf-8"))
    assert isinstance(alpaca, list)
    assert alpaca == generate_rows("alpaca", 25, seed=1)
    for schema in ("tulu", "ultrachat"):
        lines = paths[schema].read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == generate_rows(schema, 25, seed=1)  # type: ignore[arg-type]

    first = {s: p.read_bytes() for s, p in paths.items()}
    write_demo_files(out, n_per_schema=25, seed=1)
    assert {s: p.read_bytes() for s, p in paths.items()} == first
