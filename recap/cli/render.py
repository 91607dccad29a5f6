"""How commands show jobs to a person: the status table, the one-line summary. Job names,
models and lease owners are user text: they go in as Text, printed as they are."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Group
from rich.table import Table
from rich.text import Text

from recap.cli.base import out
from recap.cli.console import labelled
from recap.states import JobState
from recap.store import JobInfo, JobStatus, Lease, Store

EXPIRING_S = 60  # a lease with less left than this is shown: its worker may be stalled or dead
CHUNK_LEGEND = "chunks: running/queued/waiting/done/failed; prio: priority (‖ paused, × cancelled)"
STATE_MARKS = {JobState.RUNNING: "", JobState.PAUSED: " ‖", JobState.CANCELLED: " ×"}


@dataclass(frozen=True, slots=True)
class JobView:
    """One job as `recap status` shows it: its counts and its leases about to expire."""

    status: JobStatus
    expiring: list[Lease]

    @property
    def finished(self) -> bool:
        """Nothing pending, queued or running: nothing more will change by itself."""
        chunks = self.status.chunks
        return self.status.items.pending == 0 and chunks.pending + chunks.queued + chunks.running == 0


def look(store: Store, jobs: list[JobInfo], gpu_hour_cost: float | None = None) -> list[JobView]:
    """The jobs as the fleet serves them: higher priority first (newest first within one)."""
    views = [
        JobView(
            store.job_status(job, gpu_hour_cost),
            [lease for lease in store.leases(job.id) if lease.expires_in_s < EXPIRING_S],
        )
        for job in jobs
    ]
    return sorted(views, key=lambda view: -view.status.priority)


def print_summary(status: JobStatus) -> None:
    items = status.items
    line = f"{items.done:,} done, {items.failed:,} failed, {items.pending:,} pending"
    if status.errors:
        line += " · failures: " + ", ".join(f"{k} {v}" for k, v in status.errors.items())
    out.print(Text(line))


def status_view(views: list[JobView]) -> Group:
    """The table, then a line per job (model, failures) and per expiring lease."""
    # The job name folds onto as many lines as it needs; the numbers never wrap, so the table
    # fits 80 columns without cutting a name short.
    table = Table(title="recap jobs", title_justify="left", caption=CHUNK_LEGEND, caption_justify="left")
    table.add_column("job", overflow="fold")
    for column in ("done", "failed", "pending", "chunks", "rate/s", "ETA", "prio", "GPU-h"):
        table.add_column(column, no_wrap=True)
    notes: list[Text] = []
    for view in views:
        s, c, items = view.status, view.status.chunks, view.status.items
        table.add_row(
            Text(s.job),
            f"{items.done:,}",
            f"{items.failed:,}",
            f"{items.pending:,}",
            f"{c.running}/{c.queued}/{c.pending}/{c.done}/{c.failed}",
            "-" if s.rate_per_s is None else f"{s.rate_per_s:.1f}",
            duration(s.eta_s),
            f"{s.priority}{STATE_MARKS[s.state]}",
            f"{s.time.gpu_hours:.2f}",
        )
        note = f"{s.job}: model {s.model}"
        if s.state is not JobState.RUNNING:
            note += f"; {s.state.value}"
        if s.items.cancelled:
            note += f"; {s.items.cancelled:,} cancelled"
        note += _time_note(s)
        if s.errors:
            note += "; failures: " + ", ".join(f"{k} {v:,}" for k, v in s.errors.items())
        notes.append(Text(note))
        notes += [
            labelled(
                "lease expiring:",
                "yellow",
                f"chunk {lease.chunk_no} of job {s.job} held by {lease.owner}, {lease.expires_in_s}s left",
            )
            for lease in view.expiring
        ]
    return Group(table, *notes)


def _time_note(s: JobStatus) -> str:
    """GPU-hours, images per GPU-hour and, priced, the cost so far and to finish."""
    t = s.time
    if t.engine_seconds <= 0:
        return ""
    note = f"; {t.gpu_hours:.3f} GPU-h, {t.images_per_gpu_hour:,.0f} images/GPU-h"
    if t.cost_so_far is not None:
        note += f", cost {t.cost_so_far:,.2f}"
        if t.cost_to_finish is not None:
            note += f" (+{t.cost_to_finish:,.2f} to finish)"
    return note


def duration(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
