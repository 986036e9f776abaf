#!/usr/bin/env bash
# On the GPU machine without network: install what scripts/offline_bundle.sh packed, from its folder only.
#   bash offline_install.sh [BUNDLE]     (default: ./offline-bundle)
# Then run studies with the bundle's model and data in place of the hub ids, e.g.
#   peftlab study seed --set model.name_or_path=BUNDLE/model \
#     --set data.sources.0.path=BUNDLE/data/alpaca.jsonl --set data.sources.1.path=BUNDLE/data/tulu.jsonl \
#     --set data.sources.2.path=BUNDLE/data/ultrachat.jsonl
set -euo pipefail
bundle=${1:-offline-bundle}
python -m pip install --no-index --find-links "$bundle/wheels" -r "$bundle/requirements.txt"
python -m pip install --no-index --no-deps "$bundle"/wheels/peftlab-*.whl
python -c "import peftlab, torch; print('peftlab', peftlab.__file__, '| torch', torch.__version__, '| CUDA', torch.cuda.is_available())"
