#!/usr/bin/env bash
# Issue 20 on one GPU in ONE device call (at most 600 s), from the repository root, .carry carried
# (scripts/build_carry.sh): wheels, tokenizer, samples.
#   bash benchmarks/gpu_fast_default.sh SAMPLES_DIR [TOKENIZER_DIR]     # e.g. /tmp/samples /tmp/tok
# STAGES (default "tests,bench,attention,study"; `projection` adds (p), `first` adds (f)) picks the parts; BENCH_STEPS
# (default -1: the whole workload, one epoch) caps the bench's optimizer steps; PROFILES (default "default,lowmem")
# and REFERENCE (default 1: with the reference recipe's rows) pick the bench's runs.
# The bench starts from an empty Triton cache (TRITON_CACHE_DIR=/tmp/triton-bench, new), as on a fresh machine:
# the GPU tests before it compile kernels into the default cache, which would otherwise warm the first run.
# In this order, each under the remaining time, each writing its JSON as it goes (a cut keeps what finished):
#   (0) $OUT/gpu-tests.txt   the CUDA cases of the optimizer-step tests (bitwise against the libraries) and of
#                            the Triton cross-entropy (against the torch loss)
#   (a) $OUT/bench.json      `peftlab bench train --reference --methods qlora,galore --profiles default,lowmem`
#                            (reference, default and lowmem rows of one file, same GPU)
#   (b) $OUT/attention.json  padding-free attention kernels with the sliding window (benchmarks/attention_varlen.py)
#   (f) $OUT/first-steps.json cProfile of the first 5 steps of qlora and galore `default` (the one-off work: warm-up
#                            bin, captures, compiles, the first projection; qlora from an empty Triton cache)
#   (p) $OUT/projection.json GaLore's projection refresh, the shipped basis beside its batched and threaded
#                            forms (benchmarks/galore_projection.py; only when STAGES names `projection`)
#   (c) $OUT/study.json      a whole `peftlab study` of the seed-shaped rehearsal, each stage timed
#                            (benchmarks/study_rehearsal.py), and $OUT/seed-estimate.json: the full seed
#                            study's time on this GPU derived from it (benchmarks/estimate_seed_study.py)
# Logs: $OUT/run.log. A cut bench resumes: copy $OUT/bench.json to .carry/bench-partial.json, run again.
set -u
SAMPLES=${1:?usage: bash benchmarks/gpu_fast_default.sh SAMPLES_DIR [TOKENIZER_DIR]}
[ -f scripts/device_env.sh ] && source scripts/device_env.sh >/dev/null
TOK=${2:-/tmp/tok}
[ -d "$TOK" ] || TOK=builtin:gemma-3-270m
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
deadline=$((SECONDS + ${BUDGET_S:-575}))
left() { echo $((deadline - SECONDS)); }
log() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$OUT/run.log"; }
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader | tee -a "$OUT/run.log"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/run.log"

STAGES=${STAGES:-tests,bench,attention,study}
has() { [[ ",$STAGES," == *",$1,"* ]]; }
if has tests; then
  log "(0) GPU tests"
  timeout 100 python -m pytest -q -p no:cacheprovider tests/methods/test_optimizer_steps.py > "$OUT/gpu-tests.txt" 2>&1
  optimizer_rc=$?
  timeout 100 python -m pytest -q -p no:cacheprovider tests/train/test_graphs.py tests/train/test_kernel_warmup.py \
    -k "triton or warmup or ahead" >> "$OUT/gpu-tests.txt" 2>&1
  log "(0) tests rc=$optimizer_rc,$? $(grep -E ' passed| failed' "$OUT/gpu-tests.txt" | tr '\n' ' ')"
fi
reserve=230
has attention || reserve=$((reserve - 60))
has study || reserve=$((reserve - 170))
has projection && reserve=$((reserve + 120))

# (a) the bench: leave ~230 s for (b) and (c)
if has first; then
  log "(f) first steps, cProfile"
  rm -rf /tmp/triton-first
  TRITON_CACHE_DIR=/tmp/triton-first timeout 150 python benchmarks/profile_train.py --python --steps 5 \
    --data "$SAMPLES" --tokenizer "$TOK" --out "$OUT/first-steps.json" qlora:default galore:default >> "$OUT/run.log" 2>&1
  log "(f) first steps rc=$?"
fi

resume=()
if [ -f .carry/bench-partial.json ]; then cp .carry/bench-partial.json "$OUT/bench.json"; resume=(--resume); fi
reference=(--reference)
[ "${REFERENCE:-1}" = 1 ] || reference=()
if has bench; then
log "(a) bench: $(( $(left) - reserve )) s"
[ -f .carry/bench-partial.json ] || rm -rf /tmp/triton-bench
TRITON_CACHE_DIR=/tmp/triton-bench timeout $(( $(left) - reserve )) python -m peftlab bench train "${reference[@]}" \
  --methods qlora,galore --profiles "${PROFILES:-default,lowmem}" --max-steps "${BENCH_STEPS:--1}" --data "$SAMPLES" \
  --tokenizer "$TOK" --out "$OUT/bench.json" "${resume[@]}" >> "$OUT/run.log" 2>&1
log "(a) bench rc=$? (124: cut; the finished runs are in bench.json)"
fi

if has projection; then
  log "(p) GaLore projection refresh"
  timeout $(( $(left) < 120 ? $(left) : 120 )) python benchmarks/galore_projection.py --data "$SAMPLES" --tokenizer "$TOK" \
    --skip svd_gesvdj,svd_gesvda,gram_eigh,gram_eigh_batched,svd_lowrank,gram_eigh64 --out "$OUT/projection.json" \
    >> "$OUT/run.log" 2>&1
  log "(p) projection rc=$?"
fi

has attention || log "(b) skipped"
has attention && {
# (b) the attention kernels: at most 60 s
log "(b) attention kernels"
timeout $(( $(left) < 60 ? $(left) : 60 )) python benchmarks/attention_varlen.py --out "$OUT/attention.json" \
  >> "$OUT/run.log" 2>&1
log "(b) attention rc=$?"
}

has study || log "(c) skipped"
has study && {
# (c) the rehearsal study, then the seed study's estimate (needs ~5 s)
log "(c) rehearsal study: $(( $(left) - 10 )) s"
rm -rf /tmp/rehearsal
timeout $(( $(left) - 10 )) python benchmarks/study_rehearsal.py "$SAMPLES" --tokenizer "$TOK" \
  --run-dir /tmp/rehearsal --out "$OUT/study.json" >> "$OUT/run.log" 2>&1
log "(c) study rc=$?"
[ -f "$OUT/study.json" ] && python benchmarks/estimate_seed_study.py "$OUT/study.json" \
  --out "$OUT/seed-estimate.json" > /dev/null 2>> "$OUT/run.log"
}
log "done; $(left) s left"
grep -v "it/s\]\|s/it\]\|Loading weights" "$OUT/run.log" | tail -40
