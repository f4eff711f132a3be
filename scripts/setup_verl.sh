#!/usr/bin/env bash
# Create .venv-verl beside .venv and install drgrpo[verl] into it (the package editable, so the verl.plugins
# entry point points at this checkout). verl 0.9.x pins transformers<5.11, so it cannot share .venv; the
# test suite runs verl's own code in this interpreter (tests/verl_env.py). As in setup.sh, the CPU torch is
# installed first and pinned as a constraint, so verl's dependencies never pull a multi-GB CUDA build;
# TORCH_SPEC="" keeps a torch you installed yourself. Called by `bash scripts/setup.sh ...,verl`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-verl
py=.venv-verl/bin/python
"$py" -m pip install -q --upgrade pip
torch_spec="${TORCH_SPEC-torch==2.13.0}"
constraints=.venv-verl/constraints.txt
: > "$constraints"
if [ -n "$torch_spec" ]; then
  "$py" -m pip install -q "$torch_spec"
  echo "$torch_spec" > "$constraints"
fi
"$py" -m pip install -q -c "$constraints" -e ".[verl]"
