"""What `recap run` shows: its notes, its closing verdict, and the progress bar."""

from __future__ import annotations

import shlex
import time

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from producer.input_job import InputJob
from recap.cli.base import err, say
from recap.store import JobStatus


def say_replaced(chosen: InputJob) -> None:
    if chosen.replaces is not None:
        say(
            f"the input no longer holds every item of job {chosen.replaces} (its contents changed): "
            f"captioning it as job {chosen.name}; {chosen.replaces} is kept "
            f"(recap drop --job {shlex.quote(chosen.replaces)} --yes removes it)",
            to=err,
            label="note:",
            style="yellow",
        )


def exit_unless_done(status: JobStatus, left: int) -> None:
    """Exit 1 when items are left pending, or when every item failed."""
    items = status.items
    if left:
        say(
            f"{left:,} items are still pending and none could be captioned here: the export holds the "
            f"finished ones; see recap status --job {shlex.quote(status.job)}",
            to=err,
            label="error:",
            style="red",
        )
        raise typer.Exit(1)
    if items.total and items.done == 0 and items.failed == items.total:
        failures = ", ".join(f"{k} {v:,}" for k, v in status.errors.items())
        say(
            f"every item failed ({items.failed:,}: {failures}): nothing was captioned; see "
            f"recap status --job {shlex.quote(status.job)}",
            to=err,
            label="error:",
            style="red",
        )
        raise typer.Exit(1)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.1f} img/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
    )


def advancer(progress: Progress, task):
    """Moves the bar by each batch written, with the rate since the start."""
    started = time.monotonic()

    def advance(results) -> None:
        done = progress.tasks[0].completed + len(results)
        progress.update(task, completed=done, rate=done / max(time.monotonic() - started, 1e-6))

    return advance
