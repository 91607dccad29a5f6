"""`recap run`: the whole job on one machine. The one place that needs both the producer
(reading and registering inputs, exporting) and the workers (engine and pipeline)."""

from __future__ import annotations

import shlex
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

from producer.input_job import InputJob, collect_keys, job_for_input
from producer.input_keys import InputKeys
from producer.jobs import check_job_name, derive_job_name
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
    read_settings,
    say,
)
from recap.cli.error_classes import error_classes
from recap.cli.register import check_inputs, open_and_register
from recap.cli.render import print_summary
from recap.errors import RecapError
from recap.settings import Settings
from recap.store import JobInfo, JobStatus, Store
from recap.worker_names import LocalOwner
from workers.engine import check_engine_choice

JobOpt = Annotated[str | None, typer.Option(help="Job name (default: derived from inputs and model).")]
FormatOpt = Annotated[str | None, typer.Option("--format", help="parquet or jsonl (default: from --out).")]
RetryOpt = Annotated[
    str | None,
    typer.Option(
        help="Comma-separated error classes whose failed items are captioned again, e.g. timeout,http_5xx."
    ),
]
EngineOpt = Annotated[
    str | None,
    typer.Option(help="auto, vllm or transformers (default: RECAP_ENGINE); not part of the job."),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace a non-empty --out folder that recap did not write.")
]
# How often a run waiting for another process's chunks looks again.
WAIT_POLL_S = 1.0


@command(app, "run")
def run(
    inputs: Inputs,
    out_path: Annotated[str, typer.Option("--out", help="Where to export (local path or fsspec URL).")],
    job: JobOpt = None,
    model: ModelOpt = None,
    limit: LimitOpt = None,
    fmt: FormatOpt = None,
    export_status: Annotated[str, typer.Option(help="Export done, failed or all items.")] = "done",
    retry_errors: RetryOpt = None,
    engine: EngineOpt = None,
    overwrite: OverwriteOpt = False,
    url_col: UrlCol = "url",
    caption_col: CaptionCol = None,
    id_col: IdCol = None,
    sha256_col: ShaCol = None,
) -> None:
    """Caption a whole job on this machine: SQLite, no broker, export at the end. Run the
    same command again to resume; the export holds exactly the input's items as it is now."""
    from producer.export import export_format, export_job  # pyarrow: only when exporting

    settings = with_engine(read_settings(), engine)
    model = model or settings.model
    check_engine_choice(settings, model)  # a model or engine that cannot be had: before any write
    if job is not None:
        check_job_name(job)
    retry_classes = error_classes(retry_errors, "--retry-errors") if retry_errors is not None else []
    check_inputs(inputs)
    export_format(out_path, fmt, overwrite=overwrite)  # a bad --out is said now, not after the captioning
    wanted = columns(url_col, caption_col, id_col, sha256_col)
    with InputKeys.scratch() as keys:
        with err.status("reading inputs…"):
            collect_keys(inputs, wanted, limit, keys, stats=None)  # every read error: before any write
        store = local_store(create=True)
        chosen = job_for_input(store, job or derive_job_name(inputs, settings, model), keys)
    _say_replaced(chosen)
    job_info = open_and_register(store, settings, chosen.name, model, inputs, wanted, limit)
    if retry_classes:
        retried = store.retry_failed(job_info, retry_classes)
        say(f"{retried.items:,} failed item(s) of {', '.join(retry_classes)} back to pending", to=err)
    left = caption_until_finished(settings, store, job_info, model)
    stats = export_job(store, job_info, out_path, fmt=fmt, status=export_status, overwrite=overwrite)
    status = store.job_status(job_info)
    print_summary(status)
    say(f"exported {stats.rows} rows to {out_path} (job {job_info.name})")
    _exit_unless_done(status, left)


def with_engine(settings: Settings, engine: str | None) -> Settings:
    """`--engine` over RECAP_ENGINE (checked as the setting is)."""
    if engine is None:
        return settings
    if engine not in ("auto", "vllm", "transformers"):
        raise RecapError(f"--engine takes auto, vllm or transformers, got {engine!r}")
    return settings.model_copy(update={"engine": engine})


def _say_replaced(chosen: InputJob) -> None:
    if chosen.replaces is not None:
        say(
            f"the input no longer holds every item of job {chosen.replaces} (its contents changed): "
            f"captioning it as job {chosen.name}; {chosen.replaces} is kept "
            f"(recap drop --job {shlex.quote(chosen.replaces)} --yes removes it)",
            to=err,
            label="note:",
            style="yellow",
        )


def _exit_unless_done(status: JobStatus, left: int) -> None:
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


def caption_until_finished(settings: Settings, store: Store, job: JobInfo, model: str) -> int:
    """Caption what is pending; while another process (a second `recap run` of the job, a
    fleet worker) holds chunks of it, wait for them and take over what it gives back, so
    that the export holds every item. Returns how many items are left pending when nothing
    more can be done here (0 normally)."""
    captioner = _Captioner(settings, store, job, model)
    me = str(LocalOwner.this_process())
    if store.job_status(job).items.pending == 0:
        say("nothing left to caption", to=err)
    while True:
        before = store.job_status(job).items.pending
        if before == 0:
            return 0
        captioner.caption(before)
        pending = store.job_status(job).items.pending
        if pending == 0:
            return 0
        if _held_elsewhere(store, job, me):
            _wait_for_others(store, job, me)
        elif pending >= before:
            return pending  # no progress and nobody else at work on it


def _held_elsewhere(store: Store, job: JobInfo, me: str) -> list[str]:
    """Owners of live leases on the job's chunks other than this process (a killed `recap
    run`'s chunks are not held: this run takes them over)."""
    owners = []
    for lease in store.leases(job.id):
        local = LocalOwner.parse(lease.owner)
        if lease.owner != me and lease.expires_in_s > 0 and not (local and local.is_gone()):
            owners.append(lease.owner or "?")
    return owners


def _wait_for_others(store: Store, job: JobInfo, me: str) -> None:
    """Until no other process holds chunks of the job (finished, or given back)."""
    owners = ", ".join(sorted(set(_held_elsewhere(store, job, me))))
    pending = store.job_status(job).items.pending
    say(
        f"waiting for {pending:,} items that another process is captioning ({owners}): "
        "the export will hold them too; Ctrl-C stops waiting",
        to=err,
    )
    try:
        with err.status(f"waiting for {pending:,} items…") as spinner:
            while _held_elsewhere(store, job, me):
                pending = store.job_status(job).items.pending
                if pending == 0:
                    return
                spinner.update(f"waiting for {pending:,} items…")
                time.sleep(WAIT_POLL_S)
    except KeyboardInterrupt:
        say("interrupted: run the same command again to export once the other process is done", to=err)
        raise typer.Exit(1) from None


class _Captioner:
    """Captions the job's pending items with a progress bar; the engine loads on first use."""

    def __init__(self, settings: Settings, store: Store, job: JobInfo, model: str):
        self.settings, self.store, self.job, self.model = settings, store, job, model
        self.engine = None

    def caption(self, todo: int) -> None:
        # torch and transformers: imported only once there is something to caption.
        from workers.engine import load_engine
        from workers.local import run_job_locally
        from workers.threads import apply_torch_threads

        if self.engine is None:
            apply_torch_threads(self.settings)  # before torch loads: its thread pools read it once
            with err.status(f"loading {self.model}…"):
                self.engine = load_engine(self.settings, self.model)
        with _progress_bar() as progress:
            advance = _advancer(progress, progress.add_task("captioning", total=todo, rate=0.0))
            try:
                run_job_locally(self.settings, self.store, self.job, self.engine, on_written=advance)
            except KeyboardInterrupt:
                progress.stop()
                say("interrupted: finished batches are saved; run the same command again to resume", to=err)
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
