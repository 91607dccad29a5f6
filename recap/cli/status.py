"""Looking at jobs and removing them, for `recap run` and fleet jobs alike: status, drop."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.live import Live

from recap.cli.base import app, command, local_store, out
from recap.cli.render import status_view
from recap.errors import RecapError


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
