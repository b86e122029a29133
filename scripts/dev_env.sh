#!/usr/bin/env bash
# Create (or refresh) the development venv and build mmattn into it, editable.
# Idempotent: safe to run before every `make test` / `make run`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip install -q)

# torch 2.13.0 CPU when no torch is present (an unpinned `torch` would pull the
# multi-GB CUDA build); an existing torch >= 2.10 is kept as is.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" torch==2.13.0
fi
"$VENV/bin/python" - <<'PY' || "${PIP[@]}" triton==3.8.0
import importlib.metadata as m, sys
sys.exit(0 if m.version("triton") == "3.8.0" else 1)
PY
"${PIP[@]}" "setuptools>=77" wheel pytest hypothesis numpy networkx matplotlib tqdm ruff

# The extension build: torch comes from the venv, hence no build isolation.
"$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
