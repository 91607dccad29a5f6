#!/usr/bin/env bash
# The whole test suite, from a fresh machine: services, virtual environment, linters, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
scripts/setup-venv.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
echo "--- ruff (format and lint), import-linter (the layers of docs/ARCHITECTURE.md)"
ruff format --check --quiet .
ruff check --quiet .
lint-imports --no-cache > /dev/null || lint-imports --no-cache
echo "--- pytest"
python -m pytest -q "$@"
