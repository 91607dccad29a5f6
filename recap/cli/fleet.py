"""Fleet job commands (PostgreSQL and Redis): submit, reconcile, retry."""

from __future__ import annotations

from typing import Annotated

import typer
from sqlalchemy.exc import DBAPIError

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
    out,
    read_settings,
)
from recap.cli.register import check_inputs, open_and_register
from recap.dispatch import Dispatcher, DispatchReport
from recap.errors import ErrorClass, RecapError, ServiceUnavailable
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
) -> None:
    """Register a fleet job and its items in PostgreSQL, enqueue chunks up to the queue cap, exit."""
    settings = read_settings()
    store = fleet_store("submit")
    check_inputs(inputs)
    job_info = open_and_register(
        store,
        settings,
        job,
        model or settings.model,
        inputs,
        columns(url_col, caption_col, id_col, sha256_col),
        limit,
    )
    reports = dispatch(Dispatcher(store, settings), [job_info])
    items = store.job_status(job_info).items
    out.print(
        f"job {job}: {items.total:,} items ({items.done:,} done); "
        f"enqueued {sum(r.enqueued for r in reports)} chunk(s) on {reports[0].queue if reports else '-'}",
        highlight=False,
    )


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
        out.print(f"{report.queue}: {report.depth_before} waiting, enqueued {report.enqueued}")
    if not reports:
        out.print("nothing to reconcile: no unfinished jobs")


@command(app, "retry")
def retry(
    job: Annotated[str, typer.Option(help="Job name.")],
    errors: Annotated[str, typer.Option(help="Comma-separated error classes, e.g. timeout,http_5xx.")],
) -> None:
    """Put failed items of these error classes back to pending and re-enqueue their chunks."""
    classes = [c.strip() for c in errors.split(",") if c.strip()]
    known = {e.value for e in ErrorClass}
    unknown = [c for c in classes if c not in known]
    if unknown or not classes:
        raise RecapError(
            f"unknown error class(es) {', '.join(unknown) or '(none)'}; known: {', '.join(sorted(known))}"
        )
    settings = read_settings()
    store = fleet_store("retry")
    job_info = store.get_job(job)
    retried = store.retry_failed(job_info, classes)
    dispatch(Dispatcher(store, settings), [job_info])
    out.print(f"{retried.items:,} item(s) back to pending in {len(retried.chunks)} chunk(s) of job {job}")
