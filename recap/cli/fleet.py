"""Fleet job commands (PostgreSQL and Redis): submit, reconcile, retry."""

from __future__ import annotations

from typing import Annotated

import typer
from sqlalchemy.exc import DBAPIError

from producer.jobs import check_job_name
from recap.cli.base import (
    CaptionCol,
    IdCol,
    Inputs,
    LimitOpt,
    ModelOpt,
    ShaCol,
    UrlCol,
    app,
    columns,
    command,
    fleet_store,
    local_store,
    read_settings,
    say,
)
from recap.cli.error_classes import error_classes
from recap.cli.register import check_inputs, open_and_register, probe_inputs
from recap.db import database_url_or_default, parse_database_url, safe_url, schema_exists
from recap.dispatch import Dispatcher, DispatchReport
from recap.errors import RecapError, ServiceUnavailable
from recap.store import JobInfo
from recap.transient import is_transient


@command(app, "submit")
def submit(
    inputs: Inputs,
    job: Annotated[str, typer.Option(help="Job name (run again with the same name to add or resume).")],
    model: ModelOpt = None,
    limit: LimitOpt = None,
    url_col: UrlCol = "url",
    caption_col: CaptionCol = None,
    id_col: IdCol = None,
    sha256_col: ShaCol = None,
    priority: Annotated[
        int | None,
        typer.Option(help="Any integer, larger runs first (a new job: 0; see `recap priority`)."),
    ] = None,
) -> None:
    """Register a fleet job and its items in PostgreSQL, enqueue chunks up to the queue cap, exit."""
    settings = read_settings()
    check_job_name(job)
    store = fleet_store("submit")
    check_inputs(inputs)
    wanted = columns(url_col, caption_col, id_col, sha256_col)
    probe_inputs(inputs, wanted)  # what can be found before registering is found now
    job_info = open_and_register(store, settings, job, model or settings.model, inputs, wanted, limit)
    if priority is not None:
        store.set_priority(job_info, priority)
        job_info = store.get_job(job)
    reports = dispatch(Dispatcher(store, settings), [job_info])
    items = store.job_status(job_info).items
    say(
        f"job {job}: {items.total:,} items ({items.done:,} done); "
        f"enqueued {sum(r.enqueued for r in reports)} chunk(s) on {reports[0].queue if reports else '-'}"
    )


def is_sqlite(url: str) -> bool:
    return parse_database_url(url).drivername.startswith("sqlite")


def dispatch(dispatcher: Dispatcher, jobs: list[JobInfo] | None) -> list[DispatchReport]:
    """Top the queues up; a broker that is down is one line (what was registered stays)."""
    try:
        return dispatcher.top_up(jobs)
    except Exception as exc:
        if is_transient(exc) and not isinstance(exc, DBAPIError):
            raise ServiceUnavailable(
                f"could not reach the broker ({type(exc).__name__}); what was registered is "
                "kept: run `recap reconcile` once Redis is back"
            ) from None
        raise
    finally:
        dispatcher.close()


@command(app, "reconcile")
def reconcile(job: Annotated[str | None, typer.Option(help="Only this job.")] = None) -> None:
    """Re-enqueue chunks that are pending, whose lease expired, or whose message is gone."""
    settings = read_settings()
    store = fleet_store("reconcile")
    jobs = [store.get_job(job)] if job else None
    reports = dispatch(Dispatcher(store, settings), jobs)
    for report in reports:
        say(f"{report.queue}: {report.depth_before} waiting, enqueued {report.enqueued}")
    if not reports:
        say("nothing to reconcile: no unfinished jobs")


@command(app, "retry")
def retry(
    job: Annotated[str, typer.Option(help="Job name.")],
    errors: Annotated[str, typer.Option(help="Comma-separated error classes, e.g. timeout,http_5xx.")],
) -> None:
    """Put failed items of these error classes back to pending: on PostgreSQL their chunks
    are re-enqueued; on SQLite the next `recap run` of the job captions them."""
    classes = error_classes(errors, "--errors")
    settings = read_settings()
    url = database_url_or_default(settings.database_url)
    if is_sqlite(url):
        if not schema_exists(url):
            raise RecapError(
                f"no recap database at {safe_url(url)}: `recap retry` works on a `recap run` database "
                "(SQLite) or on a fleet's PostgreSQL (set RECAP_DATABASE_URL)"
            )
        store = local_store()
        retried = store.retry_failed(store.get_job(job), classes)
        say(
            f"{retried.items:,} item(s) back to pending in {len(retried.chunks)} chunk(s) of job {job}: "
            "run the same `recap run` command again to caption them"
        )
        return
    store = fleet_store("retry")
    job_info = store.get_job(job)
    retried = store.retry_failed(job_info, classes)
    dispatch(Dispatcher(store, settings), [job_info])
    say(f"{retried.items:,} item(s) back to pending in {len(retried.chunks)} chunk(s) of job {job}")
