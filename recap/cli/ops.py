"""Fleet job operations (PostgreSQL): pause, resume, cancel, priority. What they set lives in
the jobs table, so it survives worker and broker restarts."""

from __future__ import annotations

from typing import Annotated

import typer

from recap.cli.base import app, command, fleet_store, read_settings, say
from recap.cli.fleet import dispatch
from recap.dispatch import Dispatcher
from recap.errors import RecapError
from recap.states import JobState
from recap.store import JobInfo, Store

JobOpt = Annotated[str, typer.Option(help="Job name.")]


def _job(command_name: str, name: str) -> tuple[Store, JobInfo]:
    store = fleet_store(command_name)
    return store, store.get_job(name)


@command(app, "pause")
def pause(job: JobOpt) -> None:
    """Stop new claims of the job's chunks; chunks in flight finish and are written."""
    store, info = _job("pause", job)
    state = store.set_job_state(info, JobState.PAUSED)
    if state is not JobState.PAUSED:
        raise RecapError(f"job {job!r} is {state.value}: it cannot be paused")
    say(f"paused job {job}: chunks in flight finish; `recap resume --job {job}` feeds it again")


@command(app, "resume")
def resume(job: JobOpt) -> None:
    """Let the fleet take the job's chunks again, and enqueue them."""
    store, info = _job("resume", job)
    state = store.set_job_state(info, JobState.RUNNING)
    if state is not JobState.RUNNING:
        raise RecapError(f"job {job!r} is {state.value}: it cannot be resumed")
    reports = dispatch(Dispatcher(store, read_settings()), [store.get_job(job)])
    say(f"resumed job {job}: enqueued {sum(r.enqueued for r in reports)} chunk(s)")


@command(app, "cancel")
def cancel(job: JobOpt) -> None:
    """End a job without deleting what it made: its pending items end `cancelled`, chunks
    in flight stop at their next batch, done items stay done and exportable (`recap drop`
    deletes a job)."""
    store, info = _job("cancel", job)
    store.set_job_state(info, JobState.CANCELLED)
    cancelled = store.cancel_pending(info)
    items = store.job_status(info).items
    say(
        f"cancelled job {job}: {cancelled.items:,} pending item(s) cancelled; "
        f"{items.done:,} done and {items.failed:,} failed item(s) kept"
    )


@command(app, "priority")
def priority(
    job: JobOpt,
    value: Annotated[int, typer.Argument(help="Any integer; larger runs first (default 0).")],
) -> None:
    """Change a job's priority: workers of its model take higher-priority jobs' chunks first
    and share equally between jobs of the same priority."""
    store, info = _job("priority", job)
    store.set_priority(info, value)
    say(f"job {job}: priority {value}")
