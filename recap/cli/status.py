"""Looking at jobs and removing them, for `recap run` and fleet jobs alike: status, drop."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.live import Live

from recap.cli.base import app, command, local_store, out, read_settings, say
from recap.cli.render import JobView, look, status_view
from recap.errors import RecapError
from recap.store import JobInfo, Store

MIN_INTERVAL_S, MAX_INTERVAL_S = 0.1, 3600.0


@command(app, "status")
def status(
    job: Annotated[str | None, typer.Option(help="One job (default: every job, newest first).")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON (the shape in docs/ARCHITECTURE.md).")
    ] = False,
    watch: Annotated[
        bool, typer.Option(help="Refresh until every job shown is finished (or until interrupted).")
    ] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.")] = 2.0,
) -> None:
    """Counts per status, error class and chunk state; rate and ETA; state, priority and
    GPU-hours (with RECAP_GPU_HOUR_COST, the cost so far and to finish)."""
    if watch and not MIN_INTERVAL_S <= interval <= MAX_INTERVAL_S:  # also refuses nan
        raise RecapError(f"--interval takes {MIN_INTERVAL_S} to {MAX_INTERVAL_S:g} seconds, got {interval:g}")
    store = local_store()
    cost = read_settings().gpu_hour_cost
    jobs = [store.get_job(job)] if job else store.list_jobs()
    if as_json:
        statuses = [store.job_status(j, cost) for j in jobs]
        payload = [s.to_json() for s in statuses]
        out.print_json(json.dumps(payload[0] if job else payload))
        return
    if not jobs:
        say(f"no jobs in {_database(store)} (RECAP_DATABASE_URL names the database to look at)")
        return
    views = look(store, jobs, cost)
    if not watch:
        out.print(status_view(views))
        return
    views = _watch(store, jobs, views, interval, cost)
    if all(view.finished for view in views):
        say(f"{_finished(views)}: nothing pending, queued or running")


def _watch(
    store: Store, jobs: list[JobInfo], views: list[JobView], interval: float, cost: float | None
) -> list[JobView]:
    """Refresh until every job is finished or Ctrl-C; the views last shown."""
    try:
        with Live(status_view(views), console=out, refresh_per_second=4) as live:
            while not all(view.finished for view in views):
                time.sleep(interval)
                views = look(store, jobs, cost)
                live.update(status_view(views))
    except KeyboardInterrupt:
        pass
    if not out.is_terminal:
        out.line()  # rich ends the last view without a newline where it cannot redraw
    return views


def _database(store: Store) -> str:
    return store.engine.url.render_as_string(hide_password=True)


def _finished(views: list[JobView]) -> str:
    return (
        f"job {views[0].status.job} is finished" if len(views) == 1 else f"all {len(views)} jobs are finished"
    )


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
    say(f"dropped job {job}")
