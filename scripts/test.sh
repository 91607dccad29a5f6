#!/usr/bin/env bash
# The whole test suite, from a fresh machine: services, virtual environment, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
scripts/setup-venv.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
exec python -m pytest -q "$@"
