"""Synthetic, offline demo instruction data in the Alpaca, Tulu v2 SFT and UltraChat 200k schemas.

This module owns the generator behind the `demo:<schema>[:<rows>]` data sources and the files written
by `write_demo_files`. The rows mimic the real datasets' schemas exactly:

- alpaca: `{"instruction", "input", "output"}` (`input` is "" for about half the rows), single turn.
- tulu: `{"dataset", "id", "messages"}`; about 30% of rows open with a system message and about 30%
  are two-turn follow-ups (user, assistant, user, assistant).
- ultrachat: `{"prompt", "prompt_id", "messages"}`; mostly 2-3 user turns where each follow-up works
  on the previous answer ("Now reverse that list.", "Add 7 to the result.").

The tasks (string, list, arithmetic and formatting operations) have short, deterministic answers in
a fixed style per task ("The answer is 42.", "2, 5, 9", "The reversed word is olleh."), so a tiny
model fine-tuned for a few dozen steps measurably beats its untuned base on BLEU / ROUGE. The three
schemas use different phrasings and task mixes but share the answer styles.

Output is a pure function of (schema, n, seed): every schema draws from its own
`random.Random(seed + offset)` (never the global generator), and row `i` depends only on the draws
before it, so `generate_rows(s, 500)[:400] == generate_rows(s, 400)`.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Schema = Literal["alpaca", "tulu", "ultrachat"]
SCHEMAS: tuple[Schema, ...] = ("alpaca", "tulu", "ultrachat")
DEFAULT_N_PER_SCHEMA = 400
FILE_NAMES: dict[str, str] = {"alpaca": "alpaca.json", "tulu": "tulu.jsonl", "ultrachat": "ultrachat.jsonl"}

# Fixed per-schema offsets added to the user's seed, so the three schemas draw different streams.
_SEED_OFFSETS: dict[str, int] = {"alpaca": 1_000_003, "tulu": 2_000_003, "ultrachat": 3_000_003}

# Relative weight of each task family per schema (the "task mix"); tasks within a family are uniform.
_FAMILY_WEIGHTS: dict[str, dict[str, int]] = {
    "alpaca": {"string": 4, "list": 2, "arithmetic": 2, "formatting": 3},
    "tulu": {"string": 2, "list": 3, "arithmetic": 4, "formatting": 2},
    "ultrachat": {"string": 2, "list": 4, "arithmetic": 3, "formatting": 1},
}

TULU_SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a concise assistant. Answer with the result only.",
    "You are a helpful assistant. Keep your answers short and exact.",
    "You are a precise assistant that follows formatting instructions exactly.",
)
_TULU_SYSTEM_RATE = 0.3
_TULU_FOLLOW_UP_RATE = 0.3
_ALPACA_INPUT_RATE = 0.5
# Probability of 1, 2 and 3 user turns in an ultrachat row.
_ULTRACHAT_TURN_WEIGHTS: tuple[tuple[int, float], ...] = ((1, 0.15), (2, 0.5), (3, 0.35))

# fmt: off
WORDS: tuple[str, ...] = (
    "apple", "river", "stone", "garden", "planet", "window", "yellow", "silver", "forest", "candle",
    "bridge", "pencil", "orange", "basket", "castle", "dragon", "flower", "guitar", "hammer", "island",
    "jacket", "kitten", "ladder", "magnet", "number", "ocean", "pepper", "rabbit", "saddle", "tiger",
    "button", "violet", "wagon", "zebra", "anchor", "banana", "carpet", "desert", "engine", "falcon",
    "ginger", "harbor", "insect", "jungle", "kettle", "lemon", "meadow", "needle", "oyster", "parrot",
    "quiet", "rocket", "summer", "tunnel", "valley", "winter", "butter", "cactus", "dinner", "feather",
    "garlic", "helmet", "jigsaw", "lantern", "marble", "napkin", "orbit", "pillow", "ribbon", "shadow",
    "table", "chair", "house", "light", "water", "music", "paper", "green", "happy", "cloud",
    "bread", "chalk", "dream", "earth", "flame", "grape", "heart", "juice", "knife", "lucky",
    "money", "night", "olive", "piano", "queen", "radio", "sugar", "train", "uncle", "voice",
    "whale", "youth", "beach", "clock", "dance", "eagle", "field", "ghost", "horse", "ivory",
    "jelly", "koala", "lunar", "mango", "noble", "ozone", "pearl", "quilt", "robin", "sheep",
    "tulip", "unity", "vivid", "wheat", "yacht", "zesty", "amber", "blaze", "coral", "daisy",
    "ember", "frost", "glove", "honey", "index", "jewel", "karma", "lilac", "maple", "nectar",
    "cat", "dog", "sun", "moon", "star", "tree", "bird", "fish", "road", "book",
    "door", "lamp", "rain", "snow", "wind", "fire", "leaf", "rock", "sand", "milk",
    "cake", "rice", "corn", "bean", "salt", "ship", "boat", "car", "bus", "bike",
    "king", "frog", "duck", "bear", "wolf", "deer", "goat", "lion", "seal", "crab",
    "blue", "red", "pink", "gold", "gray", "warm", "cold", "soft", "fast", "slow",
    "kind", "bold", "calm", "wise", "tall", "small", "young", "early", "quick", "brave",
    "bright", "gentle", "simple", "strong", "sweet", "little", "silent", "clever", "golden", "hidden",
    "open", "close", "begin", "carry", "climb", "cook", "draw", "drink", "drive", "find",
    "fly", "grow", "help", "jump", "learn", "listen", "move", "paint", "play", "read",
    "run", "sing", "sleep", "smile", "speak", "swim", "teach", "think", "travel", "write",
    "market", "school", "office", "street", "village", "city", "country", "mountain", "lake", "cave",
    "kitchen", "bottle", "mirror", "blanket", "compass", "diamond", "festival", "harvest", "journey", "kingdom",
    "library", "machine", "morning", "evening", "picture", "pocket", "puzzle", "rainbow", "season", "spider",
    "sweater", "teacher", "thunder", "tomato", "tower", "unicorn", "vessel", "weather", "whistle", "wizard",
    "animal", "autumn", "balloon", "cabin", "circle", "cookie", "cotton", "crystal", "doctor", "family",
    "farmer", "friend", "garage", "hobby", "letter", "minute", "monkey", "motion", "nature", "orchard",
    "palace", "people", "pirate", "pumpkin", "reason", "record", "sailor", "secret", "signal", "spring",
    "square", "story", "stream", "thread", "ticket", "turtle", "velvet", "wonder", "yogurt", "zipper",
)
# fmt: on

_TEXT_KEYS: tuple[str, ...] = ("name", "city", "color", "animal", "fruit", "item")
_INT_KEYS: tuple[str, ...] = ("age", "year", "count", "size", "level", "score")


@dataclass(frozen=True)
class Result:
    """The assistant's answer to one turn plus the value a follow-up turn can operate on.

    kind: "int" (number), "ints" (numbers), "word" (words[0]), "words" (words joined by `sep`),
    or "final" (nothing to follow up on).
    """

    answer: str
    kind: str
    number: int = 0
    numbers: tuple[int, ...] = ()
    words: tuple[str, ...] = ()
    sep: str = " "


def _number(n: int, template: str = "The answer is {}.") -> Result:
    return Result(template.format(n), "int", number=n)


def _numbers(nums: list[int] | tuple[int, ...]) -> Result:
    return Result(", ".join(map(str, nums)), "ints", numbers=tuple(nums))


def _word(word: str, answer: str | None = None) -> Result:
    return Result(word if answer is None else answer, "word", words=(word,))


def _words(words: list[str] | tuple[str, ...], sep: str = " ") -> Result:
    return Result(sep.join(words), "words", words=tuple(words), sep=sep)


def _final(answer: str) -> Result:
    return Result(answer, "final")


# --- random inputs ---------------------------------------------------------------------------------

Slots = dict[str, str]


def _pick_words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def _pick_ints(rng: random.Random, lo: int, hi: int) -> list[int]:
    return rng.sample(range(1, 100), rng.randint(lo, hi))


def _join_ints(nums: list[int]) -> str:
    return ", ".join(map(str, nums))


# --- task makers: each returns the template slots and the result ----------------------------------


def _make_reverse_word(rng: random.Random) -> tuple[Slots, Result]:
    word = rng.choice(WORDS)
    return {"w": word}, _word(word[::-1], f"The reversed word is {word[::-1]}.")


def _make_uppercase(rng: random.Random) -> tuple[Slots, Result]:
    words = _pick_words(rng, 2, 4)
    return {"p": " ".join(words)}, _words([w.upper() for w in words])


def _make_lowercase(rng: random.Random) -> tuple[Slots, Result]:
    words = _pick_words(rng, 2, 4)
    shown = [w.upper() for w in words] if rng.random() < 0.5 else [w.title() for w in words]
    return {"p": " ".join(shown)}, _words(words)


def _make_title_case(rng: random.Random) -> tuple[Slots, Result]:
    words = _pick_words(rng, 2, 4)
    return {"p": " ".join(words)}, _words([w.title() for w in words])


def _make_count_letters(rng: random.Random) -> tuple[Slots, Result]:
    word = rng.choice(WORDS)
    return {"w": word}, _number(len(word), "The word has {} letters.")


def _make_count_words(rng: random.Random) -> tuple[Slots, Result]:
    words = _pick_words(rng, 3, 8)
    sentence = " ".join(words).capitalize() + "."
    return {"s": sentence}, _number(len(words), "The sentence has {} words.")


def _make_first_letter(rng: random.Random) -> tuple[Slots, Result]:
    word = rng.choice(WORDS)
    return {"w": word}, _final(f"The first letter is {word[0]}.")


def _make_last_letter(rng: random.Random) -> tuple[Slots, Result]:
    word = rng.choice(WORDS)
    return {"w": word}, _final(f"The last letter is {word[-1]}.")


def _make_join_dash(rng: random.Random) -> tuple[Slots, Result]:
    words = _pick_words(rng, 3, 5)
    return {"ws": " ".join(words)}, _words(words, "-")


def _make_sort_asc(rng: random.Random) -> tuple[Slots, Result]:
    nums = _pick_ints(rng, 4, 7)
    return {"ns": _join_ints(nums)}, _numbers(sorted(nums))


def _make_sort_desc(rng: random.Random) -> tuple[Slots, Result]:
    nums = _pick_ints(rng, 4, 7)
    return {"ns": _join_ints(nums)}, _numbers(sorted(nums, reverse=True))


def _make_max(rng: random.Random) -> tuple[Slots, Result]:
    nums = _pick_ints(rng, 4, 7)
    return {"ns": _join_ints(nums)}, _number(max(nums), "The largest number is {}.")


def _make_min(rng: random.Random) -> tuple[Slots, Result]:
    nums = _pick_ints(rng, 4, 7)
    return {"ns": _join_ints(nums)}, _number(min(nums), "The smallest number is {}.")


def _make_list_length(rng: random.Random) -> tuple[Slots, Result]:
    nums = [rng.randint(1, 99) for _ in range(rng.randint(3, 9))]
    return {"ns": _join_ints(nums)}, _number(len(nums), "The list has {} numbers.")


def _make_dedup(rng: random.Random) -> tuple[Slots, Result]:
    unique = _pick_ints(rng, 3, 5)
    nums = unique + [rng.choice(unique) for _ in range(rng.randint(1, 3))]
    rng.shuffle(nums)
    return {"ns": _join_ints(nums)}, _numbers(list(dict.fromkeys(nums)))


def _make_add(rng: random.Random) -> tuple[Slots, Result]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    return {"a": str(a), "b": str(b)}, _number(a + b)


def _make_subtract(rng: random.Random) -> tuple[Slots, Result]:
    b, a = sorted(rng.sample(range(2, 100), 2))
    return {"a": str(a), "b": str(b)}, _number(a - b)


def _make_multiply(rng: random.Random) -> tuple[Slots, Result]:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return {"a": str(a), "b": str(b)}, _number(a * b)


def _make_csv(rng: random.Random) -> tuple[Slots, Result]:
    words = _pick_words(rng, 3, 5)
    return {"ws": " ".join(words), "lines": "\n".join(words)}, _words(words, ", ")


def _make_json(rng: random.Random) -> tuple[Slots, Result]:
    keys = rng.sample(_TEXT_KEYS, rng.randint(1, 2)) + rng.sample(_INT_KEYS, rng.randint(1, 2))
    rng.shuffle(keys)
    obj: dict[str, Any] = {k: rng.randint(1, 99) if k in _INT_KEYS else rng.choice(WORDS) for k in keys}
    pairs = ", ".join(f"{k}={v}" for k, v in obj.items())
    return {"kv": pairs}, _final(json.dumps(obj))


@dataclass(frozen=True)
class _TaskSpec:
    """One task: its family, its input maker and its phrasings per schema.

    alpaca phrasings are (head, data) pairs: the row is either `instruction=head + "."` with
    `input=data`, or `instruction=head + ": " + data` with an empty input.
    """

    name: str
    family: str
    make: Callable[[random.Random], tuple[Slots, Result]]
    alpaca: tuple[tuple[str, str], ...]
    tulu: tuple[str, ...]
    ultrachat: tuple[str, ...]


_TASKS: tuple[_TaskSpec, ...] = (
    _TaskSpec(
        "reverse_word", "string", _make_reverse_word,
        (("Reverse the letters of the following word", "{w}"), ("Write the given word backwards", "{w}")),
        ('Reverse the word "{w}".', 'What is "{w}" spelled backwards?'),
        ('Can you spell the word "{w}" backwards for me?', 'I need the word "{w}" reversed, please.'),
    ),
    _TaskSpec(
        "uppercase", "string", _make_uppercase,
        (("Convert the following phrase to uppercase", "{p}"), ("Rewrite the text in capital letters", "{p}")),
        ('Convert "{p}" to uppercase.', 'Write "{p}" in all capital letters.'),
        ('Could you turn "{p}" into uppercase?', 'Please write "{p}" in capital letters.'),
    ),
    _TaskSpec(
        "lowercase", "string", _make_lowercase,
        (("Convert the following phrase to lowercase", "{p}"), ("Rewrite the text in small letters", "{p}")),
        ('Convert "{p}" to lowercase.', 'Write "{p}" in all lowercase letters.'),
        ('Could you turn "{p}" into lowercase?', 'Please write "{p}" in small letters.'),
    ),
    _TaskSpec(
        "count_letters", "string", _make_count_letters,
        (("Count the number of letters in the given word", "{w}"), ("Say how many letters this word has", "{w}")),
        ('How many letters are in the word "{w}"?', 'Count the letters in "{w}".'),
        ('Can you count the letters in "{w}" for me?', 'How many letters does the word "{w}" have?'),
    ),
    _TaskSpec(
        "count_words", "string", _make_count_words,
        (("Count the words in the following sentence", "{s}"), ("Say how many words this sentence has", "{s}")),
        ('How many words are in this sentence: "{s}"', 'Count the words in "{s}"'),
        ('Can you count the words in this sentence for me? "{s}"', 'How many words does "{s}" have?'),
    ),
    _TaskSpec(
        "first_letter", "string", _make_first_letter,
        (("Give the first letter of the following word", "{w}"), ("Name the first letter of this word", "{w}")),
        ('What is the first letter of "{w}"?', 'Which letter does the word "{w}" start with?'),
        ('What letter does "{w}" begin with?', 'Tell me the first letter of the word "{w}".'),
    ),
    _TaskSpec(
        "last_letter", "string", _make_last_letter,
        (("Give the last letter of the following word", "{w}"), ("Name the final letter of this word", "{w}")),
        ('What is the last letter of "{w}"?', 'Which letter does the word "{w}" end with?'),
        ('What letter does "{w}" end with?', 'Tell me the last letter of the word "{w}".'),
    ),
    _TaskSpec(
        "join_dash", "string", _make_join_dash,
        (("Join the following words with a dash", "{ws}"), ("Connect these words using dashes", "{ws}")),
        ("Join these words with a dash: {ws}", "Connect the words {ws} with dashes."),
        ("Can you join these words with a dash? {ws}", "Please put dashes between these words: {ws}"),
    ),
    _TaskSpec(
        "sort_ascending", "list", _make_sort_asc,
        (("Sort the following numbers in ascending order", "{ns}"), ("Order these numbers from smallest to largest", "{ns}")),
        ("Sort these numbers in ascending order: {ns}", "Sort from smallest to largest: {ns}"),
        ("Can you sort these numbers in ascending order? {ns}", "Please sort {ns} from smallest to largest."),
    ),
    _TaskSpec(
        "sort_descending", "list", _make_sort_desc,
        (("Sort the following numbers in descending order", "{ns}"), ("Order these numbers from largest to smallest", "{ns}")),
        ("Sort these numbers in descending order: {ns}", "Sort from largest to smallest: {ns}"),
        ("Can you sort these numbers in descending order? {ns}", "Please sort {ns} from largest to smallest."),
    ),
    _TaskSpec(
        "max", "list", _make_max,
        (("Find the largest number in the following list", "{ns}"), ("Give the maximum of these numbers", "{ns}")),
        ("What is the largest number in this list: {ns}?", "Find the maximum of {ns}."),
        ("Which is the biggest number here? {ns}", "Can you find the largest of these numbers? {ns}"),
    ),
    _TaskSpec(
        "min", "list", _make_min,
        (("Find the smallest number in the following list", "{ns}"), ("Give the minimum of these numbers", "{ns}")),
        ("What is the smallest number in this list: {ns}?", "Find the minimum of {ns}."),
        ("Which is the smallest number here? {ns}", "Can you find the smallest of these numbers? {ns}"),
    ),
    _TaskSpec(
        "list_length", "list", _make_list_length,
        (("Count how many numbers are in the following list", "{ns}"), ("Give the length of this list", "{ns}")),
        ("How many numbers are in this list: {ns}?", "What is the length of the list {ns}?"),
        ("How many numbers did I give you? {ns}", "Can you count the numbers in this list? {ns}"),
    ),
    _TaskSpec(
        "remove_duplicates", "list", _make_dedup,
        (("Remove the duplicates from the following list", "{ns}"), ("List these numbers without repeats", "{ns}")),
        ("Remove duplicates from this list: {ns}", "Drop the repeated numbers from {ns}."),
        ("Can you remove the duplicates from this list? {ns}", "Please list {ns} without the repeats."),
    ),
    _TaskSpec(
        "add", "arithmetic", _make_add,
        (("Add the following two numbers", "{a} and {b}"), ("Calculate the sum", "{a} + {b}")),
        ("What is {a} plus {b}?", "Compute {a} + {b}."),
        ("Can you add {a} and {b} for me?", "What do I get if I add {a} to {b}?"),
    ),
    _TaskSpec(
        "subtract", "arithmetic", _make_subtract,
        (("Subtract the second number from the first", "{a} and {b}"), ("Calculate the difference", "{a} - {b}")),
        ("What is {a} minus {b}?", "Compute {a} - {b}."),
        ("Can you subtract {b} from {a} for me?", "What do I get if I take {b} away from {a}?"),
    ),
    _TaskSpec(
        "multiply", "arithmetic", _make_multiply,
        (("Multiply the following two numbers", "{a} and {b}"), ("Calculate the product", "{a} x {b}")),
        ("What is {a} times {b}?", "Compute {a} * {b}."),
        ("Can you multiply {a} by {b} for me?", "What is {a} multiplied by {b}?"),
    ),
    _TaskSpec(
        "comma_list", "formatting", _make_csv,
        (("Make a comma-separated list from the following words", "{lines}"), ("Write these words as a comma-separated list", "{ws}")),
        ("Make a comma-separated list of these words: {ws}", "Put commas between these words: {ws}"),
        ("Can you turn these words into a comma-separated list? {ws}", "Please list {ws} separated by commas."),
    ),
    _TaskSpec(
        "key_value_json", "formatting", _make_json,
        (("Convert the following key=value pairs into a JSON object", "{kv}"), ("Write these key=value pairs as JSON", "{kv}")),
        ("Turn these key=value pairs into JSON: {kv}", "Convert {kv} to a JSON object."),
        ("Can you convert these key=value pairs to JSON? {kv}", "Please write {kv} as a JSON object."),
    ),
    _TaskSpec(
        "title_case", "formatting", _make_title_case,
        (("Convert the following phrase to title case", "{p}"), ("Capitalize every word of this phrase", "{p}")),
        ('Convert "{p}" to title case.', 'Capitalize each word in "{p}".'),
        ('Could you put "{p}" in title case?', 'Please capitalize every word of "{p}".'),
    ),
)  # fmt: skip

TASK_NAMES: tuple[str, ...] = tuple(t.name for t in _TASKS)


# --- follow-ups: each works on the previous turn's Result ----------------------------------------

FollowUp = Callable[[random.Random, Result], tuple[str, Result]]


def _fu_add(rng: random.Random, prev: Result) -> tuple[str, Result]:
    k = rng.randint(2, 20)
    text = rng.choice(("Add {k} to the result.", "Now add {k} to that."))
    return text.format(k=k), _number(prev.number + k)


def _fu_subtract(rng: random.Random, prev: Result) -> tuple[str, Result]:
    k = rng.randint(2, 20)
    text = rng.choice(("Subtract {k} from the result.", "Now subtract {k} from that."))
    return text.format(k=k), _number(prev.number - k)


def _fu_multiply(rng: random.Random, prev: Result) -> tuple[str, Result]:
    k = rng.randint(2, 5)
    text = rng.choice(("Multiply the result by {k}.", "Now multiply that by {k}."))
    return text.format(k=k), _number(prev.number * k)


def _fu_double(rng: random.Random, prev: Result) -> tuple[str, Result]:
    return rng.choice(("Double that number.", "Now double it.")), _number(prev.number * 2)


def _fu_reverse_list(rng: random.Random, prev: Result) -> tuple[str, Result]:
    text = rng.choice(("Now reverse that list.", "Reverse the order of that list."))
    return text, _numbers(prev.numbers[::-1])


def _fu_sort_desc(rng: random.Random, prev: Result) -> tuple[str, Result]:
    text = rng.choice(("Now sort it in descending order.", "Sort that list from largest to smallest."))
    return text, _numbers(sorted(prev.numbers, reverse=True))


def _fu_sum(rng: random.Random, prev: Result) -> tuple[str, Result]:
    text = rng.choice(("What is the sum of those numbers?", "Now add up all the numbers in that list."))
    return text, _number(sum(prev.numbers))


def _fu_list_max(rng: random.Random, prev: Result) -> tuple[str, Result]:
    text = rng.choice(("Which number in that list is the largest?", "What is the largest number in it?"))
    return text, _number(max(prev.numbers), "The largest number is {}.")


def _fu_list_length(rng: random.Random, prev: Result) -> tuple[str, Result]:
    text = rng.choice(("How many numbers are in that list?", "How long is that list?"))
    return text, _number(len(prev.numbers), "The list has {} numbers.")


def _fu_word_upper(rng: random.Random, prev: Result) -> tuple[str, Result]:
    text = rng.choice(("Now write it in uppercase.", "Make that word all capitals."))
    return text, _word(prev.words[0].upper())


def _fu_word_letters(rng: random.Random, prev: Result) -> tuple[str, Result]:
    text = rng.choice(("How many letters does it have?", "Count the letters in that word."))
    return text, _number(len(prev.words[0]), "The word has {} letters.")


def _fu_word_reverse(rng: random.Random, prev: Result) -> tuple[str, Result]:
    word = prev.words[0][::-1]
    text = rng.choice(("Reverse it again.", "Now spell that word backwards."))
    return text, _word(word, f"The reversed word is {word}.")


def _fu_words_upper(rng: random.Random, prev: Result) -> tuple[str, Result]:
    text = rng.choice(("Now make it all uppercase.", "Write that in capital letters."))
    return text, _words([w.upper() for w in prev.words], prev.sep)


def _fu_words_lower(rng: random.Random, prev: Result) -> tuple[str, Result]:
    text = rng.choice(("Now make it all lowercase.", "Write that in small letters."))
    return text, _words([w.lower() for w in prev.words], prev.sep)


def _fu_words_reverse(rng: random.Random, prev: Result) -> tuple[str, Result]:
    text = rng.choice(("Now reverse the order of the words.", "Put those words in reverse order."))
    return text, _words(prev.words[::-1], prev.sep)


def _fu_words_count(rng: random.Random, prev: Result) -> tuple[str, Result]:
    text = rng.choice(("How many words is that?", "Count the words in that."))
    return text, _number(len(prev.words), "There are {} words.")


def _fu_words_dash(rng: random.Random, prev: Result) -> tuple[str, Result]:
    text = rng.choice(("Now join them with a dash.", "Connect those words with dashes."))
    return text, _words(prev.words, "-")


_FOLLOW_UPS: dict[str, tuple[FollowUp, ...]] = {
    "int": (_fu_add, _fu_subtract, _fu_multiply, _fu_double),
    "ints": (_fu_reverse_list, _fu_sort_desc, _fu_sum, _fu_list_max, _fu_list_length),
    "word": (_fu_word_upper, _fu_word_letters, _fu_word_reverse),
    "words": (_fu_words_upper, _fu_words_lower, _fu_words_reverse, _fu_words_count, _fu_words_dash),
}


def _follow_up(rng: random.Random, prev: Result) -> tuple[str, Result]:
    """A follow-up question on `prev` whose answer differs from `prev.answer` (no no-op turns)."""
    options = list(_FOLLOW_UPS[prev.kind])
    rng.shuffle(options)
    for option in options:
        text, result = option(rng, prev)
        if result.answer != prev.answer:
            return text, result
    raise AssertionError(f"no follow-up changes {prev.answer!r}")  # unreachable: counts always differ


# --- conversations ---------------------------------------------------------------------------------


def _pick_task(rng: random.Random, schema: str, chainable: bool) -> tuple[_TaskSpec, Slots, Result]:
    """Draw a task by the schema's family weights; `chainable` insists on a result with follow-ups."""
    weights = _FAMILY_WEIGHTS[schema]
    families = list(weights)
    while True:
        family = rng.choices(families, weights=[weights[f] for f in families])[0]
        spec = rng.choice([t for t in _TASKS if t.family == family])
        slots, result = spec.make(rng)
        if not chainable or result.kind in _FOLLOW_UPS:
            return spec, slots, result


def _conversation(rng: random.Random, schema: str, user_turns: int) -> tuple[_TaskSpec, list[dict[str, str]]]:
    spec, slots, result = _pick_task(rng, schema, chainable=user_turns > 1)
    phrasings = spec.tulu if schema == "tulu" else spec.ultrachat
    messages = [
        {"role": "user", "content": rng.choice(phrasings).format(**slots)},
        {"role": "assistant", "content": result.answer},
    ]
    for _ in range(user_turns - 1):
        text, result = _follow_up(rng, result)
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": result.answer}]
    return spec, messages


# --- rows per schema -------------------------------------------------------------------------------


def _alpaca_row(rng: random.Random, index: int) -> dict[str, Any]:
    spec, slots, result = _pick_task(rng, "alpaca", chainable=False)
    head, data_template = rng.choice(spec.alpaca)
    data = data_template.format(**slots)
    if rng.random() < _ALPACA_INPUT_RATE:
        return {"instruction": f"{head}.", "input": data, "output": result.answer}
    return {"instruction": f"{head}: {data}", "input": "", "output": result.answer}


def _tulu_row(rng: random.Random, index: int) -> dict[str, Any]:
    system = rng.choice(TULU_SYSTEM_PROMPTS) if rng.random() < _TULU_SYSTEM_RATE else None
    user_turns = 2 if rng.random() < _TULU_FOLLOW_UP_RATE else 1
    spec, messages = _conversation(rng, "tulu", user_turns)
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return {"dataset": f"demo_{spec.family}", "id": f"demo_tulu_{index:06d}", "messages": messages}


def _ultrachat_row(rng: random.Random, index: int) -> dict[str, Any]:
    counts, weights = zip(*_ULTRACHAT_TURN_WEIGHTS, strict=True)
    user_turns = rng.choices(counts, weights=weights)[0]
    _, messages = _conversation(rng, "ultrachat", user_turns)
    return {
        "prompt": messages[0]["content"],
        "prompt_id": f"demo_ultrachat_{index:06d}",
        "messages": messages,
    }


_ROW_MAKERS: dict[str, Callable[[random.Random, int], dict[str, Any]]] = {
    "alpaca": _alpaca_row,
    "tulu": _tulu_row,
    "ultrachat": _ultrachat_row,
}


def generate_rows(schema: Schema, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` synthetic rows in `schema`'s format; a pure function of (schema, n, seed), prefix-stable in n."""
    if schema not in _ROW_MAKERS:
        raise ValueError(f"unknown demo schema {schema!r} (known: {', '.join(SCHEMAS)})")
    if n < 0:
        raise ValueError(f"row count must be >= 0, got {n}")
    rng = random.Random(seed + _SEED_OFFSETS[schema])
    make = _ROW_MAKERS[schema]
    return [make(rng, i) for i in range(n)]


def render_rows(schema: Schema, rows: list[dict[str, Any]]) -> str:
    """File text for `rows`: a JSON array for alpaca, JSON Lines for tulu and ultrachat."""
    if schema == "alpaca":
        return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_demo_files(
    out_dir: Path, n_per_schema: int = DEFAULT_N_PER_SCHEMA, seed: int = 0
) -> dict[str, Path]:
    """Write alpaca.json, tulu.jsonl and ultrachat.jsonl under `out_dir`; returns schema -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for schema in SCHEMAS:
        path = out_dir / FILE_NAMES[schema]
        _write_atomic(path, render_rows(schema, generate_rows(schema, n_per_schema, seed)))
        paths[schema] = path
    return paths
