#!/usr/bin/env bash
# Create (or update) ./.venv with recap, its worker extra (torch, transformers) and test tools.
# torch is installed first and pinned, so the worker extra's range is already satisfied.
# Nothing is installed again while pyproject.toml is unchanged (a second `make run` or
# `make test` needs no package index).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
stamp=.venv/.recap-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1) torch==${TORCH_VERSION}"
if [ -x .venv/bin/recap ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${TORCH_VERSION}"
python -m pip install -q -e '.[worker,test]'
echo "$want" > "$stamp"
