#!/usr/bin/env bash
# Caption the bundled sample: installs into ./.venv, serves examples/ on loopback and runs
# `recap run` on the URL list. MODEL=tiny (default) is offline and its captions are
# meaningless; MODEL=xtuner/llava-llama-3-8b-v1_1-transformers uses the real model
# (needs the Hugging Face hub and, to be quick, a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh
. .venv/bin/activate
MODEL=${MODEL:-tiny}
# examples/urls.txt names this port.
python -m http.server 8765 --bind 127.0.0.1 --directory examples >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null' EXIT
sleep 1
mkdir -p out
export RECAP_FETCH_ALLOW_CIDRS=127.0.0.1/32   # the sample server is on loopback
export RECAP_DATABASE_URL=${RECAP_DATABASE_URL:-sqlite:///out/sample.db}
recap run examples/urls.txt --model "$MODEL" --out out/sample.parquet --export-status all
python - <<'PY'
import pyarrow.parquet as pq
table = pq.read_table("out/sample.parquet", columns=["key", "status", "error_class", "re_caption"])
for row in table.to_pylist():
    print(f"{row['status']:6} {row['error_class'] or '':12} {(row['re_caption'] or '')[:70]}")
PY
