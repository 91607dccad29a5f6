#!/usr/bin/env bash
# The caption engines' GPU figures in one call of a lent GPU machine (at most 9 minutes):
#   1. bench/engine.py: the naive baseline, the transformers engine (eager) at batch sizes
#      1..128, then the vLLM engine at feed depths 64..1024 (where vLLM can be imported;
#      else recorded as unmeasured, with the reason), and vLLM's best over transformers';
#   2. RECAP_COMPILE (static KV cache + torch.compile) at batch 128.
#   Each part has its own time limit, and bench/engine.py saves its JSON after every
#   measurement, so a part cut short keeps what it measured.
# Usage: bench/device-check.sh [--tiny] [OUT_DIR]   (default $OUT, the device tool's output
#   folder; --tiny: the CPU-sized smoke run of the same script, e.g. in .venv-vllm here)
# Needs torch with CUDA and transformers 5.x (no recap settings, no database). The tests
# here use transformers 5.24; to run the same one on a machine that has another, put its
# wheel in .whl/ first (pure Python): `pip download --no-deps -d .whl transformers==5.24.0`.
# vLLM cannot be carried (its wheel is over 300 MB, a call carries 64 MiB): it is measured
# on a machine that has it installed.
# With the device tool (.whl/ is git-ignored and travels only when carried):
#   run(command="bench/device-check.sh", carry=[".whl"], timeout_s=560)
set -uo pipefail
cd "$(dirname "$0")/.."
size=()
if [ "${1:-}" = "--tiny" ]; then
    size=(--tiny)
    shift
fi
out=${1:-${OUT:-/tmp/recap-bench}}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
    # transformers checks its dependencies at import: if the machine's do not fit the
    # carried version, fall back to the machine's own transformers (and say so).
    "$python" -c "import transformers" 2>/dev/null \
        || { echo "carried transformers does not import here: using the machine's"; unset PYTHONPATH; }
fi
"$python" - <<'PY' 2>&1 | tee "$out/gpu.txt"
import importlib.util, torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__,
      "vllm", "installed" if importlib.util.find_spec("vllm") else "not installed",
      "GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
PY
timeout 400 "$python" bench/engine.py "${size[@]}" --json "$out/engine.json" 2>&1 | tee "$out/engine.txt"
timeout 140 "$python" bench/engine.py "${size[@]}" --engines transformers --compile --batch-sizes 128 \
    --naive-images 0 --json "$out/engine-compile.json" 2>&1 | tee "$out/engine-compile.txt"
