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
PORT=8765  # examples/urls.txt names this port
if ! python - "$PORT" <<'PY'
import socket, sys
with socket.socket() as s:
    try:
        s.bind(("127.0.0.1", int(sys.argv[1])))
    except OSError:
        sys.exit(1)
PY
then
  echo "error: port $PORT on 127.0.0.1 is taken; the sample's URLs (examples/urls.txt) name it: free it and run again" >&2
  exit 2
fi
python -m http.server "$PORT" --bind 127.0.0.1 --directory examples >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null' EXIT
for _ in $(seq 50); do  # until the server answers
  python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/urls.txt', timeout=1)" \
    2>/dev/null && break
  sleep 0.1
done
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
cat <<EOF2

The captions are in out/sample.parquet (all items, done and failed). To look at them:
  . .venv/bin/activate                                     # puts recap on PATH
  export RECAP_DATABASE_URL=$RECAP_DATABASE_URL     # the sample's database
  recap status                                             # counts per status and error class
  recap export --job <job> --out out/sample.jsonl --status all
EOF2
