"""How far HF `evaluate`'s ROUGE (a bootstrap median) is from peftlab's ROUGE (the mean per-row F).

peftlab reports ROUGE-1/2/L as the mean over rows of rouge_score's per-row F-measure. The original
study used `evaluate.load("rouge")`, whose default (`use_aggregator=True`) feeds the same per-row
scores to `rouge_score.scoring.BootstrapAggregator()` and reports `.mid.fmeasure`: the median
(50th percentile) of 1,000 means of rows resampled with replacement, drawn from numpy's global,
unseeded random state, so it changes from call to call. This script scores real predictions both
ways: the per-row scores come from `peftlab.evaluate.metrics.score_rows` (RougeScorer, no stemmer,
`score(reference, prediction)`, as the `evaluate` metric calls it), the aggregate from rouge_score's
own `BootstrapAggregator`, once per numpy seed 0..SEEDS-1 (the spread is what unseeded calls see).

Usage (CPU, repository root):
    python benchmarks/cpu_rouge_aggregation.py RUN_DIR [RUN_DIR ...] --out benchmarks/results/cpu-rouge-aggregation.json
where each RUN_DIR holds eval/<model>/predictions.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from rouge_score import rouge_scorer, scoring

from peftlab.evaluate.metrics import score_rows
from peftlab.rundir import package_versions, read_jsonl, write_json

TYPES = ("rouge1", "rouge2", "rougeL")


def aggregator_mid(per_row: dict[str, np.ndarray], seed: int) -> dict[str, float]:
    """What `evaluate`'s rouge returns for these per-row F-measures under numpy seed `seed`."""
    aggregator = scoring.BootstrapAggregator()  # defaults: 1,000 samples, 95% interval
    rows = len(per_row["rougeL"])
    for index in range(rows):
        aggregator.add_scores({name: scoring.Score(precision=0.0, recall=0.0, fmeasure=float(per_row[name][index]))
                               for name in TYPES})
    np.random.seed(seed)
    result = aggregator.aggregate()
    return {name: float(result[name].mid.fmeasure) for name in TYPES}


def compare(predictions: list[dict], seeds: int) -> dict:
    scores = score_rows([r["prediction"] for r in predictions], [r["reference"] for r in predictions])
    per_row = {"rouge1": scores.rouge1, "rouge2": scores.rouge2, "rougeL": scores.rougeL}
    # The evaluate metric's own per-row scorer agrees with ours row by row (checked, not assumed).
    scorer = rouge_scorer.RougeScorer(list(TYPES), use_stemmer=False)
    for index, row in enumerate(predictions):
        theirs = scorer.score(row["reference"], row["prediction"])
        assert all(theirs[name].fmeasure == per_row[name][index] for name in TYPES)
    means = {name: float(per_row[name].mean()) for name in TYPES}
    mids = [aggregator_mid(per_row, seed) for seed in range(seeds)]
    out = {"rows": len(predictions), "mean_per_row_f": means}
    for name in TYPES:
        gaps = np.array([mid[name] - means[name] for mid in mids])
        out[name] = {"bootstrap_mid_first_seeds": [mid[name] for mid in mids[:5]],
                     "mid_minus_mean": {"mean": float(gaps.mean()), "mean_abs": float(np.abs(gaps).mean()),
                                        "max_abs": float(np.abs(gaps).max()), "min": float(gaps.min()),
                                        "max": float(gaps.max())}}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--seeds", type=int, default=100, help="numpy seeds of the aggregator's resampling")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--predictions", default="", help="how the predictions were made (kept in the result)")
    args = parser.parse_args(argv)
    models: dict[str, dict] = {}
    for run_dir in args.run_dirs:
        for path in sorted(run_dir.glob("eval/*/predictions.jsonl")):
            models[f"{run_dir.name}/{path.parent.name}"] = compare(read_jsonl(path), args.seeds)
    if not models:
        print(f"no eval/*/predictions.jsonl under {', '.join(map(str, args.run_dirs))}", file=sys.stderr)
        return 2
    gaps = [m["rougeL"]["mid_minus_mean"] for m in models.values()]
    report = {
        "command": "python benchmarks/cpu_rouge_aggregation.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "what": "ROUGE as HF evaluate reports it (BootstrapAggregator mid, 1,000 resamples) minus peftlab's"
                " mean per-row F, on the same per-row rouge_score F-measures",
        "predictions": args.predictions,
        "seeds": args.seeds,
        "rougeL_mid_minus_mean_max_abs": max(g["max_abs"] for g in gaps),
        "rougeL_mid_minus_mean_mean_abs": float(np.mean([g["mean_abs"] for g in gaps])),
        "models": models,
        "versions": {k: v for k, v in package_versions().items() if k in ("rouge-score", "numpy", "peftlab")},
    }
    write_json(args.out, report)
    print(json.dumps({k: report[k] for k in ("rougeL_mid_minus_mean_max_abs", "rougeL_mid_minus_mean_mean_abs")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
