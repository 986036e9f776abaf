#!/usr/bin/env bash
# One device call (under 600 s): where the QLoRA lowmem peak moves, and the decoder's concurrency sweep.
#   - profile_train.py --phases qlora:lowmem with 4-bit matmuls computed in bf16 (the model's dtype) instead of the
#     study's fp16 (no fp16 copies of each layer input), and, as a diagnostic only, without LoRA dropout;
#   - the generation bench with the new default of 3 concurrent batches, more budgets / concurrency, the study
#     config's 64-row cap, and compiled decoder layers.
# Run on the GPU machine from the repository root with .carry carried:  bash scripts/gpu_lowmem_ab_and_concurrency.sh
set -u
source scripts/device_env.sh >/dev/null
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
common=(--phases --steps 6 --data /tmp/samples --tokenizer /tmp/tok)
timeout 90 python benchmarks/profile_train.py "${common[@]}" --set quant.compute_dtype=bfloat16 \
  --out "$OUT/phases-qlora-lowmem-bf16.json" qlora:lowmem > "$OUT/phases-bf16.log" 2>&1
echo "phases bf16 rc=$?"
timeout 90 python benchmarks/profile_train.py "${common[@]}" --set quant.compute_dtype=bfloat16 --set lora.dropout=0.0 \
  --out "$OUT/phases-qlora-lowmem-bf16-nodropout.json" qlora:lowmem > "$OUT/phases-nodropout.log" 2>&1
echo "phases bf16 no-dropout rc=$?"
timeout 380 python -m peftlab bench generate --extra 262144:2,131072:4,65536:6,131072:3:64 --compile \
  --data /tmp/samples --tokenizer /tmp/tok --out "$OUT/generation-1b.json" > "$OUT/generation-1b.log" 2>&1
echo "generation bench rc=$?"
grep -h "tokens/s" "$OUT/generation-1b.log"
for log in phases-bf16 phases-nodropout; do echo "== $log"; tail -n 6 "$OUT/$log.log"; done
