#!/usr/bin/env bash
# Device calls of session 7 (each under the 600 s limit), run from the repository root with .carry carried:
#   bash scripts/gpu_galore_projected_and_reference.sh first   # GaLore lowmem (projected accumulation) alone, then
#                                                             # where its peak sits (profile_train.py --phases)
#   bash scripts/gpu_galore_projected_and_reference.sh rest    # the BASELINE bench with the reference, resuming the
#                                                             # report in .carry/bench-partial.json (copy $OUT/bench.json
#                                                             # there after each call); run again while it is cut
set -u
source scripts/device_env.sh >/dev/null
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
if [ "${1:-first}" = first ]; then
  timeout 330 python -m peftlab bench --methods galore --profiles lowmem \
    --data /tmp/samples --tokenizer /tmp/tok --out "$OUT/bench.json" > "$OUT/bench.log" 2>&1
  echo "bench galore lowmem rc=$?"
  tail -n 8 "$OUT/bench.log"
  timeout 200 python benchmarks/profile_train.py --phases --steps 3 --data /tmp/samples --tokenizer /tmp/tok \
    --out "$OUT/phases-galore-lowmem.json" galore:lowmem > "$OUT/phases-galore.log" 2>&1
  echo "phases galore rc=$?"
  tail -n 15 "$OUT/phases-galore.log"
else
  resume=()
  if [ -f .carry/bench-partial.json ]; then cp .carry/bench-partial.json "$OUT/bench.json"; resume=(--resume); fi
  timeout 560 python -m peftlab bench --reference --methods galore,qlora --profiles lowmem,fast "${resume[@]}" \
    --data /tmp/samples --tokenizer /tmp/tok --out "$OUT/bench.json" > "$OUT/bench.log" 2>&1
  echo "bench rc=$? (124: cut; copy $OUT/bench.json to .carry/bench-partial.json and run again)"
  tail -n 14 "$OUT/bench.log"
fi
