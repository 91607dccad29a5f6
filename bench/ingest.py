"""Registering and exporting at dataset scale.

Generates a DataComp-like parquet (uid, url, text, sha256), then measures, each in its own
process: reading it alone (the baseline: no database), `recap submit` into PostgreSQL
(rows/s and the producer's peak RSS) and `recap export` back to parquet (rows/s).

    python bench/ingest.py --rows 1000000
    RECAP_BENCH_PG=postgresql://postgres@127.0.0.1:5432/postgres python bench/ingest.py

It creates (and drops) the database `recap_bench` on that server and uses Redis database 15.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_parquet(path: Path, rows: int) -> None:
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    step = 100_000
    for start in range(0, rows, step):
        n = min(step, rows - start)
        uids = [f"{start + i:032x}" for i in range(n)]
        urls = [f"https://img{(start + i) % 97}.example.com/photos/{u}.jpg" for i, u in enumerate(uids)]
        texts = [f"a photo of item {start + i} on a table, stock image" for i in range(n)]
        hashes = [hashlib.sha256(u.encode()).hexdigest() for u in uids]
        table = pa.table({"uid": uids, "url": urls, "text": texts, "sha256": hashes})
        writer = writer or pq.ParquetWriter(path, table.schema, compression="zstd")
        writer.write_table(table, row_group_size=step)
    writer.close()


def timed_child(argv: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    output = proc.stdout.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{output}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    admin = os.environ.get("RECAP_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
    work = Path(tempfile.mkdtemp(prefix="recap-ingest-"))
    data = work / "datacomp.parquet"
    make_parquet(data, args.rows)
    print(f"{args.rows:,} rows, {data.stat().st_size / 2**20:.0f} MiB of parquet")

    import sqlalchemy as sa

    from recap.db import normalise_url

    engine = sa.create_engine(normalise_url(admin), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text("DROP DATABASE IF EXISTS recap_bench WITH (FORCE)"))
        conn.execute(sa.text("CREATE DATABASE recap_bench"))
    url = admin.rsplit("/", 1)[0] + "/recap_bench"
    env = {
        **os.environ,
        "RECAP_DATABASE_URL": url,
        "RECAP_BROKER_URL": "redis://127.0.0.1:6379/15",
        "RECAP_MODEL": "tiny",
        "PYTHONPATH": str(REPO),
    }
    py = [sys.executable, "-m"]
    subprocess.run([*py, "recap.cli", "db", "upgrade"], env=env, check=True, capture_output=True)

    read_code = (
        "from producer.readers import read_items, ColumnOptions\n"
        f"columns = ColumnOptions(id_col='uid', sha256_col='sha256')\n"
        f"n = sum(len(b) for b in read_items([{str(data)!r}], columns))\n"
        f"assert n == {args.rows}, n\n"
    )
    read_s, read_rss = timed_child([sys.executable, "-c", read_code], env)
    submit_s, submit_rss = timed_child(
        [
            *py,
            "recap.cli",
            "submit",
            str(data),
            "--job",
            "bench",
            "--id-col",
            "uid",
            "--sha256-col",
            "sha256",
        ],
        env,
    )
    again_s, _ = timed_child(
        [
            *py,
            "recap.cli",
            "submit",
            str(data),
            "--job",
            "bench",
            "--id-col",
            "uid",
            "--sha256-col",
            "sha256",
        ],
        env,
    )
    export_s, export_rss = timed_child(
        [*py, "recap.cli", "export", "--job", "bench", "--status", "all", "--out", str(work / "export")], env
    )
    status_s, _ = timed_child([*py, "recap.cli", "status", "--job", "bench", "--json"], env)

    import redis

    redis.Redis.from_url(env["RECAP_BROKER_URL"]).flushdb()
    with engine.connect() as conn:
        conn.execute(sa.text("DROP DATABASE IF EXISTS recap_bench WITH (FORCE)"))
    rate = args.rows / submit_s
    print(f"read only (baseline):   {args.rows / read_s:>9,.0f} rows/s, peak RSS {read_rss:.0f} MiB")
    print(
        f"recap submit:           {rate:>9,.0f} rows/s, peak RSS {submit_rss:.0f} MiB "
        f"({rate / (args.rows / read_s):.2f}x the read-only rate; "
        f"a billion rows in {1e9 / rate / 3600:.1f} h)"
    )
    print(f"recap submit again:     {args.rows / again_s:>9,.0f} rows/s (all duplicates, nothing added)")
    print(f"recap export (parquet): {args.rows / export_s:>9,.0f} rows/s, peak RSS {export_rss:.0f} MiB")
    print(f"recap status --json:    {status_s:.2f} s (process start included)")
    _ = resource  # imported for readers of this script: ru_maxrss is KiB on Linux


if __name__ == "__main__":
    main()
