"""Commands on a job's results, for `recap run` and fleet jobs alike: status, export, drop."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.live import Live

from recap.cli.base import app, command, local_store, out
from recap.cli.render import status_view
from recap.clock import as_utc
from recap.errors import RecapError
from recap.quality import FLAGS


@command(app, "status")
def status(
    job: Annotated[str | None, typer.Option(help="One job (default: every job, newest first).")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON (the shape in docs/ARCHITECTURE.md).")
    ] = False,
    watch: Annotated[bool, typer.Option(help="Refresh until interrupted.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.")] = 2.0,
) -> None:
    """Counts per status, error class and chunk state; rate and ETA."""
    store = local_store()
    jobs = [store.get_job(job)] if job else store.list_jobs()
    if as_json:
        payload = [store.job_status(j).to_json() for j in jobs]
        out.print_json(json.dumps(payload[0] if job else payload))
        return
    if not watch:
        out.print(status_view(store, jobs))
        return
    try:
        with Live(status_view(store, jobs), console=out, refresh_per_second=4) as live:
            while True:
                time.sleep(interval)
                live.update(status_view(store, jobs))
    except KeyboardInterrupt:
        pass


@command(app, "export")
def export(
    job: Annotated[str, typer.Option(help="Job name.")],
    out_path: Annotated[str, typer.Option("--out", help="Local path or fsspec URL.")],
    fmt: Annotated[
        str | None, typer.Option("--format", help="parquet or jsonl (default: from --out).")
    ] = None,
    export_status: Annotated[str, typer.Option("--status", help="done, failed or all.")] = "done",
    exclude_flags: Annotated[str, typer.Option(help="Comma-separated quality flags to leave out.")] = "",
    rows_per_shard: Annotated[
        int, typer.Option(min=1, help="Rows per shard when --out is a folder.")
    ] = 1_000_000,
    since: Annotated[str | None, typer.Option(help="Only items updated at or after this ISO time.")] = None,
) -> None:
    """Write a job's results in the Recap-DataComp-1B column layout."""
    from producer.export import export_job  # pyarrow: only when exporting

    since_time = _parse_since(since)
    flags = _parse_flags(exclude_flags)
    store = local_store()
    job_info = store.get_job(job)
    stats = export_job(
        store,
        job_info,
        out_path,
        fmt=fmt,
        status=export_status,
        exclude_flags=flags,
        rows_per_shard=rows_per_shard,
        since=since_time,
    )
    out.print(f"exported {stats.rows:,} rows in {stats.files} file(s) to {out_path}")


def _parse_since(since: str | None):
    if not since:
        return None
    try:
        return as_utc(since)
    except ValueError:
        raise RecapError(f"--since takes an ISO date or time like 2026-11-26T10:00, got {since!r}") from None


def _parse_flags(text: str) -> list[str]:
    flags = [f.strip() for f in text.split(",") if f.strip()]
    unknown = sorted(set(flags) - set(FLAGS))
    if unknown:
        raise RecapError(f"unknown quality flag(s) {', '.join(unknown)}; known: {', '.join(FLAGS)}")
    return flags


@command(app, "drop")
def drop(
    job: Annotated[str, typer.Option(help="Job name.")],
    yes: Annotated[bool, typer.Option("--yes", help="Really delete it.")] = False,
) -> None:
    """Delete a job with all its items and chunks (PostgreSQL drops its partition whole)."""
    store = local_store()
    job_info = store.get_job(job)
    if not yes:
        raise RecapError(f"this deletes job {job!r} and all its results: add --yes to confirm")
    store.drop_job(job_info)
    out.print(f"dropped job {job}")
