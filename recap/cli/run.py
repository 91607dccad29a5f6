"""`recap run`: the whole job on one machine. The one place that needs both the producer
(reading and registering inputs, exporting) and the workers (engine and pipeline)."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from producer.jobs import derive_job_name
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
    err,
    local_store,
    out,
    read_settings,
)
from recap.cli.register import check_inputs, open_and_register
from recap.cli.render import print_summary
from recap.settings import Settings
from recap.store import JobInfo, Store

JobOpt = Annotated[str | None, typer.Option(help="Job name (default: derived from inputs and model).")]
FormatOpt = Annotated[str | None, typer.Option("--format", help="parquet or jsonl (default: from --out).")]


@command(app, "run")
def run(
    inputs: Inputs,
    out_path: Annotated[str, typer.Option("--out", help="Where to export (local path or fsspec URL).")],
    job: JobOpt = None,
    model: ModelOpt = None,
    limit: LimitOpt = None,
    fmt: FormatOpt = None,
    export_status: Annotated[str, typer.Option(help="Export done, failed or all items.")] = "done",
    url_col: UrlCol = "url",
    caption_col: CaptionCol = None,
    id_col: IdCol = None,
    sha256_col: ShaCol = None,
) -> None:
    """Caption a whole job on this machine: SQLite, no broker, export at the end. Run the
    same command again to resume."""
    from producer.export import export_format, export_job  # pyarrow: only when exporting

    settings = read_settings()
    model = model or settings.model
    check_inputs(inputs)
    export_format(out_path, fmt)  # a mismatch is said now, not after the captioning
    store = local_store(create=True)
    name = job or derive_job_name(inputs, settings, model)
    job_info = open_and_register(
        store, settings, name, model, inputs, columns(url_col, caption_col, id_col, sha256_col), limit
    )
    caption_with_progress(settings, store, job_info, model)
    stats = export_job(store, job_info, out_path, fmt=fmt, status=export_status)
    print_summary(store.job_status(job_info))
    out.print(f"exported {stats.rows} rows to {out_path} (job {name})")


def caption_with_progress(settings: Settings, store: Store, job: JobInfo, model: str) -> None:
    """Caption what is pending, with a progress bar; Ctrl-C keeps what was written."""
    todo = store.job_status(job).items.pending
    if todo == 0:
        err.print("nothing left to caption")
        return
    # torch and transformers: imported only once there is something to caption.
    from workers.engine import load_engine
    from workers.local import run_job_locally

    with err.status(f"loading {model}…"):
        engine = load_engine(settings, model)
    with _progress_bar() as progress:
        advance = _advancer(progress, progress.add_task("captioning", total=todo, rate=0.0))
        try:
            run_job_locally(settings, store, job, engine, on_written=advance)
        except KeyboardInterrupt:
            progress.stop()
            err.print("interrupted: finished batches are saved; run the same command again to resume")
            raise typer.Exit(1) from None


def _progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.1f} img/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
    )


def _advancer(progress: Progress, task):
    """Moves the bar by each batch written, with the rate since the start."""
    started = time.monotonic()

    def advance(results) -> None:
        done = progress.tasks[0].completed + len(results)
        progress.update(task, completed=done, rate=done / max(time.monotonic() - started, 1e-6))

    return advance
