#!/usr/bin/env bash
# Create .venv and install drgrpo with the given extras (default: train).
# torch is pinned to the CPU build these machines carry (pip install torch==2.13.0); the package
# itself accepts a range (see pyproject.toml), and the constraint keeps any extra from pulling
# a multi-GB CUDA build. On a GPU machine, install the torch you want first and set TORCH_SPEC="".
set -euo pipefail
extras="${1:-train}"
cd "$(dirname "$0")/.."
# "verl" in the list (e.g. train,peers,dev,verl) also makes .venv-verl, verl's own environment (it pins
# transformers<5.11), with scripts/setup_verl.sh; it is not installed into .venv.
with_verl=0
if [[ ",$extras," == *,verl,* ]]; then
  with_verl=1
  extras=$(echo ",$extras," | sed -e 's/,verl,/,/g' -e 's/^,//' -e 's/,$//')
fi
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
torch_spec="${TORCH_SPEC-torch==2.13.0}"
constraints=.venv/constraints.txt
: > "$constraints"
if [ -n "$torch_spec" ]; then
  python -m pip install -q "$torch_spec"
  echo "$torch_spec" > "$constraints"
fi
python -m pip install -q -c "$constraints" -e ".${extras:+[$extras]}"
if [ "$with_verl" = 1 ]; then
  bash scripts/setup_verl.sh
fi
