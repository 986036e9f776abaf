#!/usr/bin/env bash
# One lever at a time on the default path, one GPU, ONE device call (at most 600 s), from the repository
# root with .carry carried (wheels, tokenizer, samples):
#   source .carry/env.sh; bash benchmarks/gpu_levers.sh /tmp/samples /tmp/tok
# Writes $OUT/levers.json (+ .png, .loss.png): `peftlab bench train --methods qlora,galore` with the
# profiles in $PROFILES (default: `default`, and `default-noliger` / `default-unbinned`: one lever
# off), then with $PROFILE_RUNS set (e.g. "qlora:default galore:default") $OUT/profile.json from
# benchmarks/profile_train.py; $OUT/run.log has the log. A cut keeps the finished runs.
set -u
SAMPLES=${1:?usage: bash benchmarks/gpu_levers.sh SAMPLES_DIR [TOKENIZER_DIR]}
TOK=${2:-/tmp/tok}
[ -d "$TOK" ] || TOK=builtin:gemma-3-270m
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python -c "import inspect, torch, transformers; from torch.nn.attention.varlen import varlen_attn; \
print('torch', torch.__version__, 'transformers', transformers.__version__); print('varlen_attn', inspect.signature(varlen_attn))"
} 2>&1 | tee -a "$OUT/run.log"
timeout "${BUDGET_S:-540}" python -m peftlab bench train --methods qlora,galore \
  --profiles "${PROFILES:-default,default-noliger,default-unbinned}" --max-steps "${BENCH_STEPS:-12}" \
  --data "$SAMPLES" --tokenizer "$TOK" --out "$OUT/levers.json" >> "$OUT/run.log" 2>&1
echo "bench rc=$?" | tee -a "$OUT/run.log"
if [ -n "${PROFILE_RUNS:-}" ]; then
  # shellcheck disable=SC2086
  timeout "${PROFILE_S:-150}" python benchmarks/profile_train.py --data "$SAMPLES" --tokenizer "$TOK" --steps 8 \
    --out "$OUT/profile.json" $PROFILE_RUNS >> "$OUT/run.log" 2>&1
  echo "profile rc=$?" | tee -a "$OUT/run.log"
fi
grep -v "it/s\]\|s/it\]\|Loading weights\|steps  loss" "$OUT/run.log" | tail -40
python - "$OUT/levers.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["runs"]:
    e = r.get("execution") or {}
    print(r["method"], r["profile"], round(r["tokens_per_s"]), round(r["steady_tokens_per_s"] or 0),
          round(r["first_step_s"], 2), round(r["step_s_median"], 3), round(r["peak_alloc_gib"], 2),
          e.get("attention"), e.get("graph_tokens"), e.get("graphs"), e.get("attention_probe"))
PY
