#!/usr/bin/env bash
# The pure-Python packages scripts/bench_gpu.py needs that the GPU machine lacks (it has torch, transformers,
# sentence-transformers, numpy, pyyaml; no pydantic, sqlite-utils; no package registry). Run it here, in the
# project's root: it downloads wheels for the machine's Python 3.12 into .carry/wheels and copies the msmarco
# and scifact corpora (which do not travel from ../shared) into .carry/data, both ignored by git.
# Then one device call:  carry [".carry/wheels", ".carry/data"], command
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/wheels/*.whl &&
#   PYTHONPATH=/tmp/site:. python3 scripts/bench_gpu.py --out $OUT/bench_gpu.json \
#     --corpora .carry/data/msmarco/corpus.jsonl .carry/data/scifact/corpus.jsonl
set -eu
root=$(git rev-parse --show-toplevel)
dest="$root/.carry/wheels"
exclude=$(cd "$root" && git rev-parse --path-format=absolute --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.carry/' "$exclude" 2>/dev/null || echo '/.carry/' >> "$exclude"
rm -rf "$dest"; mkdir -p "$dest"
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" \
  "pydantic>=2.7" "sqlite-utils>=4.0"
# what the machine already has (numpy, pyyaml, pip) would only shadow its own
rm -f "$dest"/numpy-* "$dest"/PyYAML-* "$dest"/pyyaml-* "$dest"/pip-*
for corpus in msmarco scifact; do
  mkdir -p "$root/.carry/data/$corpus"
  cp "$root/../shared/data/$corpus/corpus.jsonl" "$root/.carry/data/$corpus/"
done
ls "$dest"
du -sh "$dest" "$root/.carry/data"
