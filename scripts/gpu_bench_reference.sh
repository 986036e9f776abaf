#!/usr/bin/env bash
# The BASELINE bench with the reference (issue 5's "one `peftlab bench --reference` run"), then the hybrid's
# stages, into one report; each device call under the 600 s limit. Run from the repository root with .carry
# carried, as many times as needed:
#   bash scripts/gpu_bench_reference.sh                          # HYBRID_PROFILES=fast,lowmem for both
# It resumes the report in .carry/bench-partial.json when there is one: after a call that was cut, copy
# $OUT/bench.json (and nothing else) there and call again. Delete it before a fresh bench.
set -u
source scripts/device_env.sh >/dev/null
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
deadline=$((SECONDS + ${BUDGET_S:-565}))
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
resume=()
if [ -f .carry/bench-partial.json ]; then cp .carry/bench-partial.json "$OUT/bench.json"; resume=(--resume); fi
common=(--data /tmp/samples --tokenizer /tmp/tok --out "$OUT/bench.json")
timeout $((deadline - SECONDS)) python -m peftlab bench --reference --methods qlora,galore --profiles fast,lowmem \
  "${resume[@]}" "${common[@]}" > "$OUT/bench.log" 2>&1
rc=$?
echo "bench rc=$rc (124: cut; copy \$OUT/bench.json to .carry/bench-partial.json and run again)"
tail -n 12 "$OUT/bench.log"
if [ $rc -eq 0 ] && [ $((deadline - SECONDS)) -gt 150 ]; then
  timeout $((deadline - SECONDS)) python -m peftlab bench --methods hybrid --profiles "${HYBRID_PROFILES:-fast}" --resume "${common[@]}" \
    > "$OUT/bench-hybrid.log" 2>&1
  echo "hybrid rc=$?"
  tail -n 14 "$OUT/bench-hybrid.log"
fi
