#!/usr/bin/env bash
# Create .venv and install fedrank with its dev tools. Idempotent: re-installs only when
# pyproject.toml changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${FEDRANK_VENV:-.venv}"
# PyTorch CPU build, pinned: a bare `torch` requirement can pull a multi-GB CUDA build.
TORCH_SPEC="${FEDRANK_TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "fedrank setup: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.fedrank-installed"
want="$(cat pyproject.toml | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "fedrank setup: installing $TORCH_SPEC and fedrank[dev] into $VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
  "$VENV/bin/python" -m pip install --quiet -e ".[dev]"
  echo "$want" > "$stamp"
fi
