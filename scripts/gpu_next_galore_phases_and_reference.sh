#!/usr/bin/env bash
# The next device call (about 9 minutes, under the 600 s limit), for what session 6 left unmeasured:
#   - where GaLore's lowmem peak (6.45 GiB) sits: profile_train.py --phases galore:lowmem (weights 1.86 GiB,
#     bf16 gradients 1.86 GiB and the embedding's 8-bit Adam states 0.56 GiB explain ~4.3 GiB of it);
#   - the BASELINE bench with the reference beside our profiles, QLoRA first (its lowmem profile now computes in
#     bf16: 1.472 GiB measured alone); cut by the time limit, the next call continues it with --resume
#     (carry .carry, which holds the partial report as .carry/bench-partial.json when copied there).
# Run on the GPU machine from the repository root with .carry carried:  bash scripts/gpu_next_galore_phases_and_reference.sh
set -u
source scripts/device_env.sh >/dev/null
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
timeout 120 python benchmarks/profile_train.py --phases --steps 4 --data /tmp/samples --tokenizer /tmp/tok \
  --out "$OUT/phases-galore-lowmem.json" galore:lowmem > "$OUT/phases-galore.log" 2>&1
echo "phases galore rc=$?"
tail -n 12 "$OUT/phases-galore.log"
resume=()
if [ -f .carry/bench-partial.json ]; then cp .carry/bench-partial.json "$OUT/bench.json"; resume=(--resume); fi
timeout 420 python -m peftlab bench --reference --methods qlora,galore --profiles lowmem,fast "${resume[@]}" \
  --data /tmp/samples --tokenizer /tmp/tok --out "$OUT/bench.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$? (124: cut; copy $OUT/bench.json to .carry/bench-partial.json and run again)"
tail -n 12 "$OUT/bench.log"
