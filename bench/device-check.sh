#!/usr/bin/env bash
# The engine's GPU figures in one call of a lent GPU machine (at most 8 minutes):
#   the naive baseline and eager at batch sizes 1..128, then RECAP_COMPILE at batch 128.
#   Each part has its own time limit, and bench/engine.py saves its JSON after every
#   batch size, so a part cut short keeps what it measured.
# Usage: bench/device-check.sh [OUT_DIR]   (default $OUT, the device tool's output folder)
# Needs torch with CUDA and transformers 5.x (no recap settings, no database). The tests
# here use transformers 5.24; to run the same one on a machine that has another, put its
# wheel in .whl/ first (pure Python): `pip download --no-deps -d .whl transformers==5.24.0`.
# With the device tool (.whl/ is git-ignored and travels only when carried):
#   run(command="bench/device-check.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/recap-bench}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
    # transformers checks its dependencies at import: if the machine's do not fit the
    # carried version, fall back to the machine's own transformers (and say so).
    python3 -c "import transformers" 2>/dev/null \
        || { echo "carried transformers does not import here: using the machine's"; unset PYTHONPATH; }
fi
python3 - <<'PY' 2>&1 | tee "$out/gpu.txt"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__,
      "GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
PY
timeout 240 python3 bench/engine.py --json "$out/engine.json" 2>&1 | tee "$out/engine.txt"
timeout 240 python3 bench/engine.py --compile --batch-sizes 128 --naive-images 0 \
    --json "$out/engine-compile.json" 2>&1 | tee "$out/engine-compile.txt"
