"""How commands show jobs to a person: the status table, the one-line summary."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table

from recap.cli.base import out
from recap.store import JobStatus


def print_summary(status: JobStatus) -> None:
    items = status.items
    line = f"{items.done:,} done, {items.failed:,} failed, {items.pending:,} pending"
    if status.errors:
        line += " · failures: " + ", ".join(f"{k} {v}" for k, v in status.errors.items())
    out.print(line, highlight=False)


def status_view(store, jobs):
    table = Table(title="recap jobs", title_justify="left")
    for column in ("job", "done", "failed", "pending", "chunks run/queue/wait/done/fail", "rate/s", "ETA"):
        table.add_column(column, no_wrap=True)
    notes = []
    for job in jobs:
        s = store.job_status(job)
        c, items = s.chunks, s.items
        table.add_row(
            s.job,
            f"{items.done:,}",
            f"{items.failed:,}",
            f"{items.pending:,}",
            f"{c.running}/{c.queued}/{c.pending}/{c.done}/{c.failed}",
            "-" if s.rate_per_s is None else f"{s.rate_per_s:.1f}",
            duration(s.eta_s),
        )
        notes.append(f"{s.job}: model {s.model}")
        if s.errors:
            notes[-1] += "; failures: " + ", ".join(f"{k} {v:,}" for k, v in s.errors.items())
        notes += [
            f"[yellow]lease expiring[/yellow]: chunk {lease.chunk_no} of job {s.job} held by "
            f"{lease.owner}, {lease.expires_in_s}s left"
            for lease in store.leases(job.id)
            if lease.expires_in_s < 60
        ]
    return Group(table, *notes)


def duration(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
