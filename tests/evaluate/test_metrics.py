"""Tests for peftlab.evaluate.metrics, .statistics and .scoring against reference implementations on fixed cases.

BLEU is checked against a verbatim copy of what HF `evaluate`'s "bleu" metric runs (tensorflow/nmt
`compute_bleu` + its `tokenizer_13a`), kept here only as a test oracle. ROUGE is checked against
rouge_score directly.
"""

from __future__ import annotations

import collections
import json
import math
import random
import re
import time
from pathlib import Path

import numpy as np
import pytest
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

from peftlab.errors import UserError
from peftlab.evaluate.metrics import (
    RowScores,
    bleu4,
    bleu_from_stats,
    bleu_from_stats_batch,
    exact_match_rows,
    normalize_answer,
    rouge_l,
    score_rows,
)
from peftlab.evaluate.scoring import load_predictions, score_file, score_table
from peftlab.evaluate.statistics import holm_adjust, paired_bootstrap, summarize

# ------------------------------------------------------------------------------ reference BLEU (oracle)
# Copied from huggingface/evaluate metrics/bleu/tokenizer_13a.py (itself from sacrebleu, Apache-2.0)
# and metrics/bleu/nmt_bleu.py (tensorflow/nmt scripts/bleu.py, Apache-2.0), reformatted only.

_HF_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]


def hf_tokenizer_13a(line: str) -> list[str]:
    line = line.replace("<skipped>", "")
    line = line.replace("-\n", "")
    line = line.replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"')
        line = line.replace("&amp;", "&")
        line = line.replace("&lt;", "<")
        line = line.replace("&gt;", ">")
    line = f" {line} "
    for regex, repl in _HF_13A_RULES:
        line = regex.sub(repl, line)
    return line.split()


def _get_ngrams(segment, max_order):
    ngram_counts = collections.Counter()
    for order in range(1, max_order + 1):
        for i in range(0, len(segment) - order + 1):
            ngram_counts[tuple(segment[i : i + order])] += 1
    return ngram_counts


def nmt_compute_bleu(reference_corpus, translation_corpus, max_order=4, smooth=False):
    matches_by_order = [0] * max_order
    possible_matches_by_order = [0] * max_order
    reference_length = 0
    translation_length = 0
    for references, translation in zip(reference_corpus, translation_corpus, strict=True):
        reference_length += min(len(r) for r in references)
        translation_length += len(translation)
        merged_ref_ngram_counts = collections.Counter()
        for reference in references:
            merged_ref_ngram_counts |= _get_ngrams(reference, max_order)
        translation_ngram_counts = _get_ngrams(translation, max_order)
        overlap = translation_ngram_counts & merged_ref_ngram_counts
        for ngram in overlap:
            matches_by_order[len(ngram) - 1] += overlap[ngram]
        for order in range(1, max_order + 1):
            possible_matches = len(translation) - order + 1
            if possible_matches > 0:
                possible_matches_by_order[order - 1] += possible_matches
    precisions = [0] * max_order
    for i in range(0, max_order):
        if smooth:
            precisions[i] = (matches_by_order[i] + 1.0) / (possible_matches_by_order[i] + 1.0)
        elif possible_matches_by_order[i] > 0:
            precisions[i] = float(matches_by_order[i]) / possible_matches_by_order[i]
        else:
            precisions[i] = 0.0
    geo_mean = math.exp(sum(1.0 / max_order * math.log(p) for p in precisions)) if min(precisions) > 0 else 0
    if reference_length == 0 or translation_length == 0:
        bp = 0.0
    else:
        ratio = float(translation_length) / reference_length
        bp = 1.0 if ratio > 1.0 else math.exp(1 - 1.0 / ratio)
    return geo_mean * bp


def hf_bleu(predictions: list[str], references: list[str]) -> float:
    """What `evaluate.load("bleu").compute(predictions=..., references=...)["bleu"]` returns."""
    refs = [[hf_tokenizer_13a(r)] for r in references]
    preds = [hf_tokenizer_13a(p) for p in predictions]
    return nmt_compute_bleu(refs, preds, max_order=4, smooth=False)


# ------------------------------------------------------------------------------------------ fixtures

_VOCAB = "the a cat dog sat on mat quickly jumped over lazy fox , . model data 3.5 co-op"
WORDS = _VOCAB.split()


def random_corpus(rng: random.Random, n: int, max_len: int = 30) -> tuple[list[str], list[str]]:
    refs = [" ".join(rng.choices(WORDS, k=rng.randint(1, max_len))) for _ in range(n)]
    preds = []
    for ref in refs:
        toks = ref.split()
        keep = [t for t in toks if rng.random() < 0.7] + rng.choices(WORDS, k=rng.randint(0, 5))
        preds.append(" ".join(keep))
    return preds, refs


FIXED_CORPORA = {
    "perfect": (
        ["the cat sat on the mat .", "hello there general kenobi", "It costs $3.50, right?"],
        ["the cat sat on the mat .", "hello there general kenobi", "It costs $3.50, right?"],
    ),
    "no_4gram_match": (
        ["the cat sat on", "mat the on sat cat"],
        ["the cat sat down on the mat", "the cat sat on the mat"],
    ),
    "brevity_penalty": (
        ["the cat sat on the mat", "hello there general kenobi"],
        ["the cat sat on the mat today in the sun", "hello there general kenobi , how are you ?"],
    ),
    "longer_hypothesis": (
        ["the cat sat on the mat today in the warm sun all day long"],
        ["the cat sat on the mat today"],
    ),
    "some_empty_predictions": (
        ["", "the cat sat on the mat", "", "a quick brown fox jumps over"],
        ["a dog", "the cat sat on the mat", "nothing", "a quick brown fox jumped over it"],
    ),
    "all_empty_predictions": (["", ""], ["the cat sat on the mat", "hello there"]),
    "empty_reference": (["the cat sat on the mat"], [""]),
    "shorter_than_4_tokens": (["the cat", "hello there"], ["the cat", "hello there"]),
    "punctuation_and_entities": (
        ['Tom &amp; Jerry (1-2) said: "hi"... ok', "costs 3,000.50 USD; co-op"],
        ["Tom & Jerry ( 1 - 2 ) said : &quot;hi&quot; ... ok", "costs 3,000.50 USD ; co-op !"],
    ),
    # 13a deletes "-\n"; sacrebleu's tokenize="13a" would right-strip first and keep the hyphen.
    "trailing_hyphen_newline": (
        ["the well-\nknown cat sat on the mat long-\n", "a b c d e-\n "],
        ["the wellknown cat sat on the mat long", "a b c d e"],
    ),
    "skipped_marker": (["the cat <skipped> sat on the mat"], ["the cat sat on the mat"]),
}


# ------------------------------------------------------------------------------------------------ BLEU


@pytest.mark.parametrize("name", sorted(FIXED_CORPORA))
def test_bleu4_equals_hf_evaluate_reference(name: str) -> None:
    preds, refs = FIXED_CORPORA[name]
    expected = hf_bleu(preds, refs)
    assert bleu4(preds, refs) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    stats = score_rows(preds, refs).bleu_stats.sum(axis=0)
    assert bleu_from_stats(stats) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert bleu_from_stats_batch(stats[None, :])[0] == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_bleu4_fixed_case_values() -> None:
    assert bleu4(*FIXED_CORPORA["perfect"]) == 1.0
    assert bleu4(*FIXED_CORPORA["no_4gram_match"]) == 0.0
    assert bleu4(*FIXED_CORPORA["all_empty_predictions"]) == 0.0
    assert bleu4(*FIXED_CORPORA["shorter_than_4_tokens"]) == 0.0
    # all n-grams of the hypotheses match, so the score is exactly the brevity penalty
    assert bleu4(*FIXED_CORPORA["brevity_penalty"]) == pytest.approx(math.exp(1 - 19 / 10))
    assert bleu4(*FIXED_CORPORA["longer_hypothesis"]) < 1.0


def test_trailing_hyphen_newline_is_why_we_pre_tokenize() -> None:
    preds, refs = FIXED_CORPORA["trailing_hyphen_newline"]
    naive = BLEU(tokenize="13a", smooth_method="none", max_ngram_order=4).corpus_score(preds, [refs])
    assert naive.score / 100 != pytest.approx(hf_bleu(preds, refs))
    assert bleu4(preds, refs) == pytest.approx(hf_bleu(preds, refs), rel=1e-12)


@pytest.mark.parametrize("seed", range(25))
def test_bleu4_equals_hf_evaluate_reference_random_corpora(seed: int) -> None:
    preds, refs = random_corpus(random.Random(seed), n=random.Random(seed).randint(1, 40))
    assert bleu4(preds, refs) == pytest.approx(hf_bleu(preds, refs), rel=1e-12, abs=1e-15)


def test_bleu_of_subsets_from_row_stats() -> None:
    preds, refs = random_corpus(random.Random(7), n=200)
    rows = score_rows(preds, refs)
    rng = np.random.default_rng(0)
    subsets = [rng.integers(0, 200, size=rng.integers(1, 200)) for _ in range(30)]
    batch = bleu_from_stats_batch(np.stack([rows.bleu_stats[s].sum(axis=0) for s in subsets]))
    for subset, got in zip(subsets, batch, strict=True):
        expected = hf_bleu([preds[i] for i in subset], [refs[i] for i in subset])
        assert bleu_from_stats(rows.bleu_stats[subset].sum(axis=0)) == pytest.approx(expected, rel=1e-12)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_row_stats_layout() -> None:
    rows = score_rows(["the cat sat", ""], ["the cat sat on the mat", "x"])
    assert rows.hyp_len.tolist() == [3, 0]
    assert rows.ref_len.tolist() == [6, 1]
    assert rows.matches.tolist() == [[3, 2, 1, 0], [0, 0, 0, 0]]
    assert rows.totals.tolist() == [[3, 2, 1, 0], [0, 0, 0, 0]]


def test_bleu4_empty_corpus_is_an_error() -> None:
    with pytest.raises(ValueError):
        bleu4([], [])


# ----------------------------------------------------------------------------------------------- ROUGE


def test_rouge_matches_rouge_score_mean() -> None:
    preds, refs = random_corpus(random.Random(3), n=60)
    preds[0] = ""
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    direct = [scorer.score(r, p) for p, r in zip(preds, refs, strict=True)]
    rows = score_rows(preds, refs)
    for name in ("rouge1", "rouge2", "rougeL"):
        expected = [s[name].fmeasure for s in direct]
        assert getattr(rows, name).tolist() == pytest.approx(expected, abs=0)
    assert rouge_l(preds, refs) == pytest.approx(float(np.mean([s["rougeL"].fmeasure for s in direct])))
    assert rows.rougeL[0] == 0.0


def test_rouge_l_uses_stemmer_false() -> None:
    # with a stemmer "jumped"/"jumping" would match
    assert rouge_l(["the dogs jumped"], ["the dog jumping"]) == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------------- bootstrap


def test_summarize_shape_ci_and_determinism() -> None:
    preds, refs = random_corpus(random.Random(11), n=300)
    rows = score_rows(preds, refs)
    out = summarize(rows, bootstrap_samples=500, seed=0)
    exact = {f"{m}{suffix}" for m in ("exact_match", "exact_match_norm") for suffix in ("", "_ci", "_count")}
    assert set(out) == {"n", "bleu4", "bleu4_ci", "rougeL", "rougeL_ci", "rouge1", "rouge2", *exact}
    assert out["n"] == 300
    # the exact-match columns do not change the resamples of BLEU-4 and ROUGE-L
    plain = RowScores(rows.rouge1, rows.rouge2, rows.rougeL, rows.bleu_stats)
    assert summarize(plain, bootstrap_samples=500, seed=0) == {k: v for k, v in out.items() if k not in exact}
    assert out["bleu4"] == pytest.approx(bleu4(preds, refs), rel=1e-12)
    assert out["rougeL"] == pytest.approx(rouge_l(preds, refs), rel=1e-12)
    for key in ("bleu4", "rougeL"):
        lo, hi = out[f"{key}_ci"]
        assert 0.0 <= lo <= out[key] <= hi <= 1.0
    assert summarize(rows, bootstrap_samples=500, seed=0) == out
    assert summarize(rows, bootstrap_samples=500, seed=1) != out
    json.dumps(out)  # plain Python types


def test_ci_narrows_with_more_rows() -> None:
    preds, refs = random_corpus(random.Random(5), n=2000)
    rows = score_rows(preds, refs)
    small = summarize(rows.subset(range(50)))
    large = summarize(rows)
    for key in ("bleu4_ci", "rougeL_ci"):
        assert large[key][1] - large[key][0] < 0.5 * (small[key][1] - small[key][0])


def test_summarize_single_row_and_bad_args() -> None:
    rows = score_rows(["the cat sat on the mat"], ["the cat sat on the mat"])
    out = summarize(rows, bootstrap_samples=10)
    assert out["bleu4_ci"] == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError):
        summarize(rows, bootstrap_samples=0)
    with pytest.raises(ValueError):
        summarize(rows.subset([]))


def test_paired_bootstrap_identical_systems() -> None:
    preds, refs = random_corpus(random.Random(1), n=200)
    rows = score_rows(preds, refs)
    for metric in ("bleu4", "rougeL"):
        out = paired_bootstrap(rows, rows, metric)
        assert out["metric"] == metric
        assert out["diff"] == 0.0
        assert out["p_value"] == 1.0
        assert out["ci"] == [0.0, 0.0]


def test_paired_bootstrap_clearly_better_system() -> None:
    preds, refs = random_corpus(random.Random(2), n=200)
    rng = random.Random(9)
    worse = [" ".join(rng.choices(WORDS, k=len(p.split()))) for p in preds]
    a, b = score_rows(preds, refs), score_rows(worse, refs)
    for metric in ("bleu4", "rougeL"):
        out = paired_bootstrap(a, b, metric, samples=1000, seed=0)
        assert out["diff"] > 0
        assert out["p_value"] < 0.05
        assert out["p_value"] == pytest.approx(2 / 1001)
        assert 0 < out["ci"][0] <= out["diff"] <= out["ci"][1]
        swapped = paired_bootstrap(b, a, metric, samples=1000, seed=0)
        assert swapped["diff"] == pytest.approx(-out["diff"])
        assert swapped["p_value"] == out["p_value"]


def test_paired_bootstrap_is_paired_and_checks_args() -> None:
    preds, refs = random_corpus(random.Random(4), n=100)
    rows = score_rows(preds, refs)
    with pytest.raises(ValueError):
        paired_bootstrap(rows, rows.subset(range(99)), "bleu4")
    with pytest.raises(ValueError):
        paired_bootstrap(rows, rows, "chrf")  # type: ignore[arg-type]
    # the same resamples for both: a tiny uniform improvement is always significant
    better = RowScores(rows.rouge1, rows.rouge2, rows.rougeL + 1e-3, rows.bleu_stats)
    assert paired_bootstrap(better, rows, "rougeL")["p_value"] == pytest.approx(2 / 1001)


def test_summarize_is_fast_on_6000_rows() -> None:
    rng = np.random.default_rng(0)
    n = 6000
    totals = rng.integers(4, 40, size=(n, 1)) - np.arange(4)[None, :]
    matches = (totals * rng.uniform(0.2, 0.9, size=(n, 1))).astype(np.int64)
    stats = np.hstack([totals[:, :1], totals[:, :1] + rng.integers(-3, 4, size=(n, 1)), matches, totals])
    rouge = rng.uniform(size=n)
    rows = RowScores(rouge, rouge, rouge, stats.astype(np.int64))
    start = time.perf_counter()
    summarize(rows, bootstrap_samples=1000, seed=0)
    assert time.perf_counter() - start < 2.0


# --------------------------------------------------------------------------------------- exact match


def test_exact_match_and_squad_normalisation() -> None:
    # the case: ROUGE-L 0.75, but the numbers differ, so no exact match of either kind
    preds = ["The answer is 93.", "the ANSWER is  188", "An apple, a day!", "", "  same  "]
    refs = ["The answer is 188.", "The answer is 188.", "apple day", "", "same"]
    exact, normalised = exact_match_rows(preds, refs)
    assert exact.tolist() == [0, 0, 0, 1, 1]
    assert normalised.tolist() == [0, 1, 1, 1, 1]
    assert score_rows(preds[:1], refs[:1]).rougeL[0] == pytest.approx(0.75)
    assert normalize_answer("  The Answer, is: an   A-pple!\n") == "answer is apple"
    assert normalize_answer("Theatre of the anthem") == "theatre of anthem"  # articles only as words
    out = summarize(score_rows(preds, refs), bootstrap_samples=200)
    assert (out["exact_match"], out["exact_match_count"]) == (0.4, 2)
    assert (out["exact_match_norm"], out["exact_match_norm_count"]) == (0.8, 4)
    assert 0.0 <= out["exact_match_ci"][0] <= 0.4 <= out["exact_match_ci"][1] <= 1.0


def test_paired_bootstrap_on_exact_match() -> None:
    refs = [f"answer {i}" for i in range(60)]
    good = score_rows(refs, refs)
    bad = score_rows([f"answer {i + 1}" for i in range(60)], refs)
    out = paired_bootstrap(good, bad, "exact_match_norm", samples=500)
    assert out["diff"] == 1.0 and out["p_value"] == pytest.approx(2 / 501)
    with pytest.raises(ValueError, match="without exact-match"):
        paired_bootstrap(RowScores(good.rouge1, good.rouge2, good.rougeL, good.bleu_stats), good, "exact_match")


def test_holm_adjust() -> None:
    # hand-computed: sorted 0.005 0.01 0.03 0.04 -> x4, x3, x2, x1 = 0.02 0.03 0.06 0.04 -> monotone 0.06
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm_adjust([0.02]) == [0.02] and holm_adjust([]) == []
    # ties keep equal adjusted values; the smallest p is multiplied by m
    assert holm_adjust([0.01, 0.01, 0.2]) == pytest.approx([0.03, 0.03, 0.2])


# ---------------------------------------------------------------------------------------- per source


def test_score_table_per_source() -> None:
    preds, refs = random_corpus(random.Random(6), n=120)
    sources = ["squad" if i % 3 else "alpaca" for i in range(120)]
    table = score_table(preds, refs, sources, bootstrap_samples=200, seed=3)
    assert list(table["per_source"]) == ["alpaca", "squad"]
    assert table["n"] == 120
    for source, block in table["per_source"].items():
        sub_p = [p for p, s in zip(preds, sources, strict=True) if s == source]
        sub_r = [r for r, s in zip(refs, sources, strict=True) if s == source]
        assert block == score_table(sub_p, sub_r, bootstrap_samples=200, seed=3)
        assert block["bleu4"] == pytest.approx(hf_bleu(sub_p, sub_r), rel=1e-12)
    assert "per_source" not in score_table(preds, refs, bootstrap_samples=200)
    with pytest.raises(ValueError):
        score_table(preds, refs, sources[:-1])


# ---------------------------------------------------------------------------------------- score_file


def _write(tmp_path: Path, text: str | bytes, name: str = "preds.jsonl") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_score_file_reads_rows_and_sources(tmp_path: Path) -> None:
    preds, refs = random_corpus(random.Random(8), n=30)
    lines = [
        json.dumps({"prediction": p, "reference": r, "source_dataset": "ab"[i % 2], "extra": i})
        for i, (p, r) in enumerate(zip(preds, refs, strict=True))
    ]
    path = _write(tmp_path, "\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n")
    table = score_file(path)
    expected = score_table(preds, refs, ["ab"[i % 2] for i in range(30)])
    assert table == expected
    plain = _write(
        tmp_path,
        "\n".join(json.dumps({"prediction": p, "reference": r}) for p, r in zip(preds, refs, strict=True)),
        name="plain.jsonl",
    )
    assert "per_source" not in score_file(plain)
    assert load_predictions(plain).sources is None


def test_score_file_empty_prediction_is_valid(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"prediction": "", "reference": "the cat"}\n')
    table = score_file(path)
    assert table["bleu4"] == 0.0
    assert table["rougeL"] == 0.0


GOOD = '{"prediction": "a b", "reference": "a b"}'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            f'{GOOD}\n{GOOD}\n{{"prediction": "x" "reference": "y"}}\n',
            "preds.jsonl line 3: malformed JSON (Expecting ',' delimiter)",
        ),
        (f'{GOOD}\n{{"reference": "y"}}\n', "preds.jsonl line 2: missing 'prediction'"),
        (f'{{"prediction": "y"}}\n{GOOD}\n', "preds.jsonl line 1: missing 'reference'"),
        (
            f'{GOOD}\n\n{{"prediction": "y", "reference": 3}}\n',
            "preds.jsonl line 3: 'reference' must be a string, got number",
        ),
        (
            '{"prediction": null, "reference": "y"}\n',
            "preds.jsonl line 1: 'prediction' must be a string, got null",
        ),
        (f'{GOOD}\n["a", "b"]\n', "preds.jsonl line 2: expected a JSON object, got array"),
        (
            '{"prediction": "a", "reference": "b", "source_dataset": 1}\n',
            "preds.jsonl line 1: 'source_dataset' must be a string, got number",
        ),
        (
            f'{{"prediction": "a", "reference": "b", "source_dataset": "s"}}\n{GOOD}\n',
            "preds.jsonl line 2: missing 'source_dataset' (other rows have it)",
        ),
        ("", "preds.jsonl: no rows (the file is empty)"),
        ("\n  \n\n", "preds.jsonl: no rows (the file is empty)"),
        (
            f"{GOOD}\n".encode() + b'{"prediction": "\xff", "reference": "y"}\n',
            "preds.jsonl line 2: not valid UTF-8",
        ),
    ],
)
def test_score_file_errors(tmp_path: Path, text: str | bytes, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(UserError) as excinfo:
        score_file(path)
    assert str(excinfo.value).startswith(f"{path} line ") or str(excinfo.value).startswith(f"{path}: ")
    assert message in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


def test_score_file_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope\.jsonl: file not found"):
        score_file(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="cannot read"):
        score_file(tmp_path)


def test_score_file_accepts_bom_and_crlf(tmp_path: Path) -> None:
    path = _write(tmp_path, b"\xef\xbb\xbf" + (GOOD + "\r\n" + GOOD + "\r\n").encode())
    assert score_file(path)["n"] == 2
