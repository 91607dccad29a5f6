#!/usr/bin/env bash
# Replace Pillow with Pillow-SIMD (same `PIL` package, AVX2 resizes) in the active Python.
#
# Image preparation resizes every image once on the CPU; Pillow-SIMD does that about 5x
# faster (bench/fetch.py measures it: see the README's performance section). It is built
# from source here, so the machine needs a C compiler and the image library headers:
#   Debian/Ubuntu: apt-get install gcc python3-dev libjpeg-dev zlib1g-dev libpng-dev \
#                  libwebp-dev libtiff-dev
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
"$PYTHON" -m pip uninstall -y -q pillow pillow-simd
"$PYTHON" -m pip install --no-deps -q "$WHEELS"/*.whl
"$PYTHON" -c "from workers.prepare import pillow_build; print('image preparation uses', pillow_build())"
