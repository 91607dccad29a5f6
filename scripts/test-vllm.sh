#!/usr/bin/env bash
# The vLLM engine's tests (tests/test_vllm.py) on the CPU, in .venv-vllm (built or checked by
# scripts/setup-vllm-venv.sh: cached, about 4 minutes and 7.3 GB the first time). Here a
# missing vLLM fails the run instead of skipping it (RECAP_REQUIRE_VLLM=1).
# Usage: scripts/test-vllm.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
scripts/setup-vllm-venv.sh
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 RECAP_REQUIRE_VLLM=1
exec "${VLLM_VENV:-.venv-vllm}/bin/python" -m pytest -q tests/test_vllm.py "$@"
