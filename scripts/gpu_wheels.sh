#!/usr/bin/env bash
# The pure-Python packages scripts/bench_gpu.py and bench_api.py need that the GPU machine lacks (it has torch,
# transformers, sentence-transformers, numpy, pyyaml, httpx, typer; no pydantic, sqlite-utils, fastapi, uvicorn,
# faiss; no package registry; faiss-cpu serves bench_api's small collection, and a FAISS GPU build installed into
# /tmp/faiss-site shadows it when put first on PYTHONPATH). Run it here, in the project's root: it downloads wheels
# for the machine's Python 3.12 into .carry/wheels, ignored by git. The corpora travel with the working tree
# (tests/data, the scripts' default).
# Then one device call:  carry [".carry/wheels"], command
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/wheels/*.whl &&
#   PYTHONPATH=/tmp/site:. python3 scripts/bench_gpu.py --out $OUT/bench_gpu.json --model-dir /tmp/stella-1.5b
# and, while the machine is warm (the folder is kept in /tmp), the same install then
#   PYTHONPATH=/tmp/site:. python3 scripts/bench_api.py --shape 1.5b --model-dir /tmp/stella-1.5b --device cuda \
#     --out $OUT/bench_api_gpu.json
set -eu
root=$(git rev-parse --show-toplevel)
dest="$root/.carry/wheels"
exclude=$(cd "$root" && git rev-parse --path-format=absolute --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.carry/' "$exclude" 2>/dev/null || echo '/.carry/' >> "$exclude"
rm -rf "$dest"; mkdir -p "$dest"
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" \
  "pydantic>=2.7" "sqlite-utils>=4.0" "fastapi>=0.115" "uvicorn>=0.30" "faiss-cpu==1.15.1"
# what the machine already has (numpy, pyyaml, pip) would only shadow its own
rm -f "$dest"/numpy-* "$dest"/PyYAML-* "$dest"/pyyaml-* "$dest"/pip-*
ls "$dest"
du -sh "$dest"
