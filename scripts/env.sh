#!/usr/bin/env bash
# Sourced by demo.sh and test.sh: creates .venv and installs the project once.
# TORCH_SPEC picks the torch build (default: the CPU wheel these machines hold;
# on a CUDA machine e.g. TORCH_SPEC=torch). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  # torch first: an unpinned torch pulled in by a dependency is a CUDA build of several GB
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
stamp=".venv/.installed-$(cksum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
