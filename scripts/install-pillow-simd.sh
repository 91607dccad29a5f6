#!/usr/bin/env bash
# Replace Pillow with Pillow-SIMD (same `PIL` package, AVX2 resizes) in the active Python.
#
# Image preparation resizes every image once on the CPU; Pillow-SIMD does that about 5x
# faster (bench/fetch.py measures it: see the README's performance section). It is built
# from source here, so the machine needs a C compiler and the image library headers:
#   Debian/Ubuntu: apt-get install gcc pkg-config python3-dev libjpeg-dev zlib1g-dev \
#                  libwebp-dev libtiff-dev libavif-dev
# A library missing at build time is a format the build cannot read: the script checks the
# build first and keeps Pillow if one is missing (Debian 12's libavif is too old for AVIF:
# PILLOW_SIMD_ALLOW_MISSING=avif accepts that).
# The build uses AVX2: it refuses to run on a CPU without it (every x86-64 server CPU since
# 2015 has it). Usage, inside the worker's virtual environment:
#   scripts/install-pillow-simd.sh            # build, install, check
#   PILLOW_SIMD_VERSION=12.1.1.post0 scripts/install-pillow-simd.sh
# Undo: pip uninstall -y pillow-simd && pip install pillow
# `pip check` then reports that recap-fleet wants "pillow": Pillow-SIMD provides the same
# package under another name, which pip cannot express. recap logs which build it runs.
set -euo pipefail
VERSION=${PILLOW_SIMD_VERSION:-12.1.1.post0}
PYTHON=${PYTHON:-python}

if ! grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
    echo "install-pillow-simd: this CPU has no AVX2; keeping Pillow" >&2
    exit 1
fi
WHEELS=$(mktemp -d)
trap 'rm -rf "$WHEELS"' EXIT
# -mavx2: without it the build falls back to SSE4 and most of the gain is lost. No cache:
# pip would reuse a wheel built earlier with other flags or without some image library.
CC="${CC:-cc} -mavx2" "$PYTHON" -m pip wheel -q --no-cache-dir --no-deps --no-binary pillow-simd \
    --wheel-dir "$WHEELS" "pillow-simd==${VERSION}"
# Check the build before it replaces anything: which formats can it read?
"$PYTHON" -m pip install -q --no-deps --target "$WHEELS/check" "$WHEELS"/*.whl
PYTHONPATH="$WHEELS/check" "$PYTHON" - <<'PY'
import os, sys
from workers.prepare import missing_codecs  # with the new build's PIL, first on the path
allowed = os.environ.get("PILLOW_SIMD_ALLOW_MISSING", "").replace(",", " ").split()
missing = [name for name in missing_codecs() if name not in allowed]
if missing:
    sys.exit(f"install-pillow-simd: the build lacks {', '.join(missing)}; Pillow is kept. Install "
             "the headers named at the top of this script (libavif 1.0 or newer for avif), or "
             "accept the loss with PILLOW_SIMD_ALLOW_MISSING=" + ",".join(missing))
PY
"$PYTHON" -m pip uninstall -y -q pillow pillow-simd
"$PYTHON" -m pip install --no-deps -q "$WHEELS"/*.whl
"$PYTHON" -c "from workers.prepare import pillow_build; print('image preparation uses', pillow_build())"
