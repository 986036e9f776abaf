"""Generation metrics, row by row: BLEU-4, ROUGE-1/2/L and exact match.

The metric functions are pure functions of (predictions, references); nothing is cached between calls
and nothing depends on global random state.

Definitions (chosen to reproduce a study that scored with Hugging Face `evaluate`):

* **BLEU-4** is *corpus-level* BLEU in [0, 1]: n-gram matches and hypothesis/reference lengths are summed
  over all rows first, then ``BP * exp(mean_n log(p_n))`` with ``n = 1..4``, no smoothing, a score of 0.0
  as soon as any order has zero matches (or zero candidate n-grams), and the brevity penalty
  ``exp(1 - ref_len / hyp_len)`` when ``hyp_len < ref_len`` (0 when ``hyp_len == 0``). This is exactly
  `evaluate.load("bleu")` with its defaults (tensorflow/nmt ``compute_bleu`` on ``tokenizer_13a``
  tokens, ``max_order=4``, ``smooth=False``). It is computed offline with sacrebleu: text is tokenised
  with sacrebleu's ``Tokenizer13a`` and then scored by
  ``BLEU(lowercase=False, tokenize="none", force=True, smooth_method="none", max_ngram_order=4)``,
  ``.score / 100`` (clamped to 1.0 against float round-off). Tokenising ourselves (instead of
  ``tokenize="13a"``) matters: sacrebleu right-strips each segment *before* tokenising, HF `evaluate`
  does not, and the two disagree on text that ends in ``"-\\n"`` (13a deletes a hyphen followed by a
  newline). Lower-casing is off in both. Agreement with HF is to float round-off (<= 1e-15).
* **ROUGE-1 / ROUGE-2 / ROUGE-L** are the *mean over rows* of the per-row F-measure of
  ``rouge_score.rouge_scorer.RougeScorer([...], use_stemmer=False).score(reference, prediction)``
  (target first), each in [0, 1]. We deliberately do not use rouge_score's ``BootstrapAggregator``
  "mid" (which HF `evaluate` reports with ``use_aggregator=True``): that is itself a random bootstrap
  estimate whose value depends on unseeded resampling, whereas the plain mean is deterministic and is
  what the aggregator's "mid" estimates. Note that rouge_score's default tokenizer lower-cases and keeps
  only ``[a-z0-9]`` runs, so non-ASCII letters are dropped (as in HF `evaluate`).
* **Exact match** (``exact_match``) is 1 for a row whose prediction equals its reference once leading and
  trailing whitespace is stripped, else 0; **normalised exact match** (``exact_match_norm``) compares
  the texts after SQuAD's answer normalisation (`normalize_answer`: lower-case, drop ASCII punctuation,
  drop the articles a/an/the, collapse whitespace). Both are means over rows in [0, 1]. "The answer is
  93." against "The answer is 188." scores ROUGE-L 0.75 but 0 on both exact matches.
* Empty prediction strings are valid and score 0 (ROUGE, exact match unless the reference is empty too) /
  contribute zero length (BLEU).

Per-row results live in `RowScores`: the three ROUGE F-measures and, for BLEU, the per-row sufficient
statistics (hypothesis length, reference length, matches and totals for n = 1..4). Corpus BLEU of any
subset or bootstrap resample is computed exactly from summed statistics, without re-tokenising.

Summaries over rows (bootstrap confidence intervals, paired bootstrap tests, Holm's correction) live in
`peftlab.evaluate.statistics`; scoring a whole table or predictions file lives in `peftlab.evaluate.scoring`.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

BLEU_MAX_ORDER = 4
"""Maximum n-gram order of BLEU-4."""

BLEU_STATS_COLUMNS = (
    "hyp_len",
    "ref_len",
    *(f"matches_{n}" for n in range(1, 5)),
    *(f"totals_{n}" for n in range(1, 5)),
)
"""Column order of `RowScores.bleu_stats` (the layout sacrebleu uses for its segment statistics)."""

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
EXACT_TYPES = ("exact_match", "exact_match_norm")

Metric = Literal["bleu4", "rougeL", "rouge1", "rouge2", "exact_match", "exact_match_norm"]
METRICS: tuple[str, ...] = ("bleu4", "rougeL", "rouge1", "rouge2", *EXACT_TYPES)
"""Every metric `summarize` reports and `paired_bootstrap` compares (config `evaluate.metrics` picks from these)."""

_TOKENIZER_13A = Tokenizer13a()


# --------------------------------------------------------------------------------------- per-row scores


@dataclass(frozen=True, eq=False)
class RowScores:
    """Per-row metric values for one system, aligned with its input rows.

    `rouge1`, `rouge2`, `rougeL` are float arrays of F-measures, shape ``(n,)``. `bleu_stats` is an
    int64 array of shape ``(n, 10)`` with columns `BLEU_STATS_COLUMNS`: hypothesis length, reference
    length, clipped n-gram matches for n = 1..4 and candidate n-gram totals for n = 1..4.
    `exact_match` and `exact_match_norm` are 0/1 float arrays, shape ``(n,)``; None when the scores
    were built without the texts (then the exact-match metrics are left out of summaries).
    """

    rouge1: np.ndarray
    rouge2: np.ndarray
    rougeL: np.ndarray
    bleu_stats: np.ndarray
    exact_match: np.ndarray | None = field(default=None)
    exact_match_norm: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        n = len(self.bleu_stats)
        if self.bleu_stats.shape != (n, len(BLEU_STATS_COLUMNS)):
            raise ValueError(
                f"bleu_stats must have shape (n, {len(BLEU_STATS_COLUMNS)}), got {self.bleu_stats.shape}"
            )
        for name in (*ROUGE_TYPES, *EXACT_TYPES):
            value = getattr(self, name)
            if value is not None and value.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {value.shape}")

    @property
    def has_exact_match(self) -> bool:
        return self.exact_match is not None and self.exact_match_norm is not None

    def __len__(self) -> int:
        return len(self.bleu_stats)

    def subset(self, indices: Sequence[int] | np.ndarray) -> RowScores:
        """The rows at `indices` (in that order; repeats allowed)."""
        idx = np.asarray(indices, dtype=np.int64)
        return RowScores(
            rouge1=self.rouge1[idx],
            rouge2=self.rouge2[idx],
            rougeL=self.rougeL[idx],
            bleu_stats=self.bleu_stats[idx],
            exact_match=None if self.exact_match is None else self.exact_match[idx],
            exact_match_norm=None if self.exact_match_norm is None else self.exact_match_norm[idx],
        )

    @property
    def hyp_len(self) -> np.ndarray:
        """Tokens per prediction, shape ``(n,)``."""
        return self.bleu_stats[:, 0]

    @property
    def ref_len(self) -> np.ndarray:
        """Tokens per reference, shape ``(n,)``."""
        return self.bleu_stats[:, 1]

    @property
    def matches(self) -> np.ndarray:
        """Clipped n-gram matches, shape ``(n, 4)``; column k is order k + 1."""
        return self.bleu_stats[:, 2 : 2 + BLEU_MAX_ORDER]

    @property
    def totals(self) -> np.ndarray:
        """Candidate n-grams in the prediction, shape ``(n, 4)``; column k is order k + 1."""
        return self.bleu_stats[:, 2 + BLEU_MAX_ORDER :]


def score_rows(predictions: Sequence[str], references: Sequence[str]) -> RowScores:
    """Score each (prediction, reference) pair: ROUGE-1/2/L F-measures, BLEU statistics, exact matches."""
    _check_pairs(predictions, references)
    rouge = _rouge_rows(predictions, references)
    exact, normalised = exact_match_rows(predictions, references)
    return RowScores(
        rouge1=rouge[:, 0],
        rouge2=rouge[:, 1],
        rougeL=rouge[:, 2],
        bleu_stats=_bleu_row_stats(predictions, references),
        exact_match=exact,
        exact_match_norm=normalised,
    )


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    for kind, texts in (("prediction", predictions), ("reference", references)):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{kind} {i} is {type(text).__name__}, expected str")


def _rouge_rows(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """ROUGE-1/2/L F-measures per row, shape ``(n, 3)``."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    out = np.zeros((len(predictions), len(ROUGE_TYPES)), dtype=np.float64)
    for i, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
        scores = scorer.score(ref, pred)  # (target, prediction)
        out[i] = [scores[name].fmeasure for name in ROUGE_TYPES]
    return out


# ----------------------------------------------------------------------------------------- exact match

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's answer normalisation: lower-case, drop punctuation, drop a/an/the, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match_rows(predictions: Sequence[str], references: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-row exact match (surrounding whitespace stripped) and normalised exact match, as 0/1 floats."""
    _check_pairs(predictions, references)
    exact = [p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)]
    normalised = [
        normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True)
    ]
    return np.asarray(exact, dtype=np.float64), np.asarray(normalised, dtype=np.float64)


# ------------------------------------------------------------------------------------------------ BLEU


def tokenize_13a(text: str) -> str:
    """mteval-v13a tokenisation as HF `evaluate`'s bleu applies it (no right-strip, no lower-casing)."""
    return _TOKENIZER_13A(text)


def _sacrebleu(*, effective_order: bool = False) -> BLEU:
    """sacrebleu BLEU on already 13a-tokenised text; see the module docstring for why."""
    return BLEU(
        lowercase=False,
        tokenize="none",
        force=True,
        smooth_method="none",
        max_ngram_order=BLEU_MAX_ORDER,
        effective_order=effective_order,
    )


def _bleu_row_stats(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-row BLEU sufficient statistics, shape ``(n, 10)`` (see `BLEU_STATS_COLUMNS`).

    `effective_order` only changes sacrebleu's sentence *score*, not its statistics; it is on so that
    `sentence_score` does not log a warning per row.
    """
    metric = _sacrebleu(effective_order=True)
    stats = np.zeros((len(predictions), len(BLEU_STATS_COLUMNS)), dtype=np.int64)
    for i, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
        s = metric.sentence_score(tokenize_13a(pred), [tokenize_13a(ref)])
        stats[i] = [s.sys_len, s.ref_len, *s.counts, *s.totals]
    return stats


def bleu4(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 in [0, 1] (HF `evaluate` "bleu" with default arguments)."""
    _check_pairs(predictions, references)
    if not predictions:
        raise ValueError("BLEU of an empty corpus is undefined")
    hyps = [tokenize_13a(p) for p in predictions]
    refs = [tokenize_13a(r) for r in references]
    return _unit(_sacrebleu().corpus_score(hyps, [refs]).score)


def bleu_from_stats(stats: Sequence[int] | np.ndarray) -> float:
    """Corpus BLEU-4 in [0, 1] from summed statistics (one row laid out as `BLEU_STATS_COLUMNS`)."""
    s = [int(x) for x in np.asarray(stats).reshape(-1)]
    k = BLEU_MAX_ORDER
    score = BLEU.compute_bleu(
        correct=s[2 : 2 + k],
        total=s[2 + k : 2 + 2 * k],
        sys_len=s[0],
        ref_len=s[1],
        smooth_method="none",
        max_ngram_order=k,
    )
    return _unit(score.score)


def _unit(sacrebleu_score: float) -> float:
    """sacrebleu's 0-100 score as a fraction, clamped to 1.0 (a perfect match gives 100.00000000000004)."""
    return min(1.0, sacrebleu_score / 100.0)


def bleu_from_stats_batch(sums: np.ndarray) -> np.ndarray:
    """Vectorised `bleu_from_stats` over rows of summed statistics, shape ``(b, 10)`` -> ``(b,)``."""
    sums = np.asarray(sums, dtype=np.float64)
    k = BLEU_MAX_ORDER
    hyp, ref = sums[:, 0], sums[:, 1]
    matches, totals = sums[:, 2 : 2 + k], sums[:, 2 + k : 2 + 2 * k]
    ok = np.all(matches > 0, axis=1)  # matches <= totals, so this also guarantees totals > 0
    safe_p = np.where(ok[:, None], matches / np.maximum(totals, 1.0), 1.0)
    geo_mean = np.exp(np.log(safe_p).mean(axis=1))
    bp = np.where(hyp < ref, np.exp(1.0 - ref / np.maximum(hyp, 1.0)), 1.0)
    return np.where(ok, bp * geo_mean, 0.0)


# ----------------------------------------------------------------------------------------------- ROUGE


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean per-row ROUGE-L F-measure in [0, 1]."""
    _check_pairs(predictions, references)
    if not predictions:
        raise ValueError("ROUGE-L of an empty corpus is undefined")
    return float(_rouge_rows(predictions, references)[:, 2].mean())
