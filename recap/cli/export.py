"""`recap export`: a job's results in the Recap-DataComp-1B column layout."""

from __future__ import annotations

from typing import Annotated

import typer

from recap.cli.base import app, command, local_store, say
from recap.clock import as_utc
from recap.errors import RecapError
from recap.quality import FLAGS


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
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace the contents of a non-empty folder recap did not export to."
        ),
    ] = False,
) -> None:
    """Write a job's results in the Recap-DataComp-1B column layout. The previous export to
    the same --out is replaced only once the new one is complete."""
    from producer.export import export_format, export_job  # pyarrow: only when exporting

    since_time = _parse_since(since)
    flags = _parse_flags(exclude_flags)
    export_format(out_path, fmt, overwrite)  # a bad --out is said before the database is read
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
        overwrite=overwrite,
    )
    say(f"exported {stats.rows:,} rows in {stats.files} file(s) to {out_path}")


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
