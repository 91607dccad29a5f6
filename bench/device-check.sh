#!/usr/bin/env bash
# The engine's GPU figures in one call of a lent GPU machine (about 8 minutes on an H100):
#   eager at batch sizes 1..128 with the naive baseline, then RECAP_COMPILE at the two
#   largest sizes. Each part has its own time limit so the first one's figures survive.
# Usage: bench/device-check.sh [OUT_DIR]   (default $OUT, the device tool's output folder)
# Needs torch with CUDA and transformers 5.x (no recap settings, no database). The tests
# here use transformers 5.24; to run the same one on a machine that has another, put its
# wheel in .whl/ first (pure Python): `pip download --no-deps -d .whl transformers==5.24.0`.
# With the device tool: `echo /.whl/ >> .git/info/exclude`, download as above, then
#   run(command="bench/device-check.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/recap-bench}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
python3 - <<'PY' 2>&1 | tee "$out/gpu.txt"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__,
      "GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
PY
timeout 330 python3 bench/engine.py --json "$out/engine.json" 2>&1 | tee "$out/engine.txt"
timeout 200 python3 bench/engine.py --compile --batch-sizes 64,128 --naive-images 4 \
    --json "$out/engine-compile.json" 2>&1 | tee "$out/engine-compile.txt"
