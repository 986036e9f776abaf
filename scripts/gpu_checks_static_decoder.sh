#!/usr/bin/env bash
# One device call (about 7 minutes, under the 600 s limit) that measures what session 5 left unmeasured:
#   - the static decoder with the packed-GQA decode attention (default 131,072-token batches; the 10x target),
#     262,144-token batches, 3 concurrent batches (graphs now captured on their own streams), compiled layers;
#   - where the QLoRA lowmem peak sits (profile_train.py --phases: peak per span of a step).
# Run on the GPU machine from the repository root with .carry carried:  bash scripts/gpu_checks_static_decoder.sh
# Every command writes under $OUT, partial reports included, so a cut call still returns what finished.
set -u
source scripts/device_env.sh >/dev/null
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
timeout 340 python -m peftlab bench generate --extra 262144:1,131072:3 --compile \
  --data /tmp/samples --tokenizer /tmp/tok --out "$OUT/generation-1b.json" > "$OUT/generation-1b.log" 2>&1
echo "generation bench rc=$?"
timeout 100 python benchmarks/profile_train.py --phases --steps 6 --data /tmp/samples --tokenizer /tmp/tok \
  --out "$OUT/phases-qlora-lowmem.json" qlora:lowmem > "$OUT/phases.log" 2>&1
echo "phases rc=$?"
grep -h "tokens/s" "$OUT/generation-1b.log"
tail -n 14 "$OUT/phases.log"
