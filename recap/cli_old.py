"""The `recap` command line. Never imports torch or transformers at import time, so
`recap --help` answers fast and producer hosts need no GPU stack."""

from __future__ import annotations

import functools
import json
import sys
import time
from datetime import UTC
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from recap.errors import RecapError

app = typer.Typer(
    name="recap",
    help="Re-caption web-scale image datasets with LLaMA-3 vision-language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
dev_app = typer.Typer(help="Developer tools: tiny offline models.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(dev_app, name="dev")

out = Console()
err = Console(stderr=True)

TINY_WARNING = "the tiny model's captions are meaningless (random weights): it is for tests and smoke runs"


def command(group: typer.Typer, *args, **kwargs):
    """Register a command whose user errors end in one line and exit code 2."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            try:
                return fn(*a, **k)
            except RecapError as exc:
                err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            except Exception as exc:
                reason = _unreachable(exc)
                if reason is None:
                    raise
                err.print(f"[red]error:[/red] {reason}", highlight=False, soft_wrap=True)
                raise typer.Exit(1) from None

        return group.command(*args, **kwargs)(wrapper)

    return decorate


def _unreachable(exc: BaseException) -> str | None:
    """A one-line reason when a service is down (exit 1), else None (a bug: traceback)."""
    from recap.errors import ServiceUnavailable
    from recap.transient import is_transient

    if isinstance(exc, ServiceUnavailable):
        return str(exc)
    if not is_transient(exc):
        return None
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, DBAPIError):
        first = (
            str(exc.orig or exc).strip().splitlines()[0]
            if str(exc.orig or exc).strip()
            else type(exc).__name__
        )
        return f"cannot reach the database: {first}"
    return f"cannot reach the broker: {type(exc).__name__}: {exc}"


def _settings():
    from recap.settings import get_settings

    try:
        return get_settings()
    except Exception as exc:  # pydantic's ValidationError: a bad RECAP_* value
        raise RecapError(f"invalid settings: {' '.join(str(exc).split())}") from None


def _local_store(create: bool = False):
    """`recap run`/`status`/`export`: RECAP_DATABASE_URL, else ./recap.db.

    Only `run` creates the schema; the readers say what is missing instead."""
    from recap.db import database_url_or_default, require_current_schema, upgrade
    from recap.store import Store

    url = database_url_or_default(_settings().database_url)
    if create:
        upgrade(url)
    else:
        require_current_schema(url)
    return Store(url)


def _fleet_store(command_name: str):
    from recap.db import require_current_schema, require_postgres
    from recap.store import Store

    url = require_postgres(_settings().database_url, command_name)
    require_current_schema(url)
    return Store(url)


# Column options shared by `run` and `submit`.
UrlCol = Annotated[str, typer.Option(help="Column holding the image URL.")]
CaptionCol = Annotated[
    str | None, typer.Option(help="Column holding the original caption (default: text, else caption).")
]
IdCol = Annotated[str | None, typer.Option(help="Column holding the item key (default: sha256 of the URL).")]
ShaCol = Annotated[str | None, typer.Option(help="Column holding the expected image sha256.")]
Inputs = Annotated[list[str], typer.Argument(help="Files, folders, globs or fsspec URLs.")]
ModelOpt = Annotated[
    str | None, typer.Option(help="Model id, local folder, or 'tiny' (default: RECAP_MODEL).")
]
LimitOpt = Annotated[int | None, typer.Option(min=1, help="Only the first N items (a canary run).")]


def _columns(url_col, caption_col, id_col, sha256_col):
    from producer.readers import ColumnOptions

    return ColumnOptions(url_col=url_col, caption_col=caption_col, id_col=id_col, sha256_col=sha256_col)


@command(db_app, "upgrade")
def db_upgrade() -> None:
    """Create or migrate the schema (Alembic `upgrade head`)."""
    from recap.db import database_url_or_default, safe_url, upgrade

    url = database_url_or_default(_settings().database_url)
    upgrade(url)
    out.print(f"schema is up to date at {safe_url(url)}")


@command(dev_app, "tiny-model")
def dev_tiny_model(
    directory: Annotated[Path, typer.Argument(help="Folder to write the model into.")],
    family: Annotated[str, typer.Option(help="llava, llava-next or mllama.")] = "llava",
) -> None:
    """Build a tiny random-weight model (real classes) for tests and offline smoke runs."""
    if family not in ("llava", "llava-next", "mllama"):
        raise RecapError(f"unknown family {family!r}: use llava, llava-next or mllama")
    from workers.tiny_model import build_tiny_model

    path = build_tiny_model(directory, family=family)
    out.print(f"wrote tiny {family} model to {path}; {TINY_WARNING}")


@command(app, "run")
def run(
    inputs: Inputs,
    out_path: Annotated[str, typer.Option("--out", help="Where to export (local path or fsspec URL).")],
    job: Annotated[
        str | None, typer.Option(help="Job name (default: derived from inputs and model).")
    ] = None,
    model: ModelOpt = None,
    limit: LimitOpt = None,
    fmt: Annotated[
        str | None, typer.Option("--format", help="parquet or jsonl (default: from --out).")
    ] = None,
    export_status: Annotated[str, typer.Option(help="Export done, failed or all items.")] = "done",
    url_col: UrlCol = "url",
    caption_col: CaptionCol = None,
    id_col: IdCol = None,
    sha256_col: ShaCol = None,
) -> None:
    """Caption a whole job on this machine: SQLite, no broker, export at the end. Run the
    same command again to resume."""
    from producer.export import export_format, export_job
    from producer.jobs import derive_job_name

    settings = _settings()
    model = model or settings.model
    _check_inputs(inputs)
    export_format(out_path, fmt)  # a mismatch is said now, not after the captioning
    store = _local_store(create=True)
    name = job or derive_job_name(inputs, settings, model)
    job_info = _open_and_register(
        store, settings, name, model, inputs, _columns(url_col, caption_col, id_col, sha256_col), limit
    )
    _caption_with_progress(settings, store, job_info, model)
    stats = export_job(store, job_info, out_path, fmt=fmt, status=export_status)
    _print_summary(store.job_status(job_info))
    out.print(f"exported {stats.rows} rows to {out_path} (job {name})")


def _check_inputs(inputs: list[str]) -> None:
    """A missing input is said before any job is created (nothing is read or walked)."""
    from producer.readers import check_inputs

    check_inputs(inputs)


def _open_and_register(store, settings, name, model, inputs, columns, limit):
    """`run` and `submit` alike: the job (which owns its model, prompt and generation
    settings), then its items."""
    from producer.jobs import open_job
    from recap.models import TINY_MODELS as TINY_ALIASES

    job = open_job(store, settings, name, model)
    if model in TINY_ALIASES:
        err.print(f"[yellow]note:[/yellow] {TINY_WARNING}")
    _register_with_spinner(store, job, inputs, columns, limit)
    return job


def _register_with_spinner(store, job, inputs, columns, limit) -> None:
    from producer.jobs import register_inputs
    from producer.readers import ReadStats

    read = ReadStats()
    with err.status("reading inputs…") as spinner:
        stats = register_inputs(
            store,
            job,
            inputs,
            columns,
            limit=limit,
            read_stats=read,
            on_batch=lambda s: spinner.update(f"reading inputs… {s.read:,} read, {s.new:,} new"),
        )
    err.print(f"read {read.summary()}")  # rows left out are said, with their reasons
    err.print(f"registered {stats.new:,} new items ({stats.duplicates:,} already known or duplicate)")


def _caption_with_progress(settings, store, job, model) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    status = store.job_status(job)
    todo = status["items"]["pending"]
    if todo == 0:
        err.print("nothing left to caption")
        return
    from workers.engine import load_engine
    from workers.local import run_job_locally

    with err.status(f"loading {model}…"):
        engine = load_engine(settings, model)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.1f} img/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    started = time.monotonic()
    with Progress(*columns, console=err) as progress:
        task = progress.add_task("captioning", total=todo, rate=0.0)

        def advance(results) -> None:
            done = progress.tasks[0].completed + len(results)
            progress.update(task, completed=done, rate=done / max(time.monotonic() - started, 1e-6))

        try:
            run_job_locally(settings, store, job, engine, on_written=advance)
        except KeyboardInterrupt:
            progress.stop()
            err.print("interrupted: finished batches are saved; run the same command again to resume")
            raise typer.Exit(1) from None


def _print_summary(status: dict) -> None:
    items = status["items"]
    line = f"{items['done']:,} done, {items['failed']:,} failed, {items['pending']:,} pending"
    if status["errors"]:
        line += " · failures: " + ", ".join(f"{k} {v}" for k, v in status["errors"].items())
    out.print(line, highlight=False)


@command(app, "status")
def status(
    job: Annotated[str | None, typer.Option(help="One job (default: every job, newest first).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (DESIGN.md's shape).")] = False,
    watch: Annotated[bool, typer.Option(help="Refresh until interrupted.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.")] = 2.0,
) -> None:
    """Counts per status, error class and chunk state; rate and ETA."""
    store = _local_store()
    jobs = [store.get_job(job)] if job else store.list_jobs()
    if as_json:
        payload = [store.job_status(j) for j in jobs]
        out.print_json(json.dumps(payload[0] if job else payload))
        return
    if not watch:
        out.print(_status_view(store, jobs))
        return
    from rich.live import Live

    try:
        with Live(_status_view(store, jobs), console=out, refresh_per_second=4) as live:
            while True:
                time.sleep(interval)
                live.update(_status_view(store, jobs))
    except KeyboardInterrupt:
        pass


def _status_view(store, jobs):
    from rich.console import Group
    from rich.table import Table

    table = Table(title="recap jobs", title_justify="left")
    for column in ("job", "done", "failed", "pending", "chunks run/queue/wait/done/fail", "rate/s", "ETA"):
        table.add_column(column, no_wrap=True)
    notes = []
    for job in jobs:
        s = store.job_status(job)
        c, items = s["chunks"], s["items"]
        table.add_row(
            s["job"],
            f"{items['done']:,}",
            f"{items['failed']:,}",
            f"{items['pending']:,}",
            f"{c['running']}/{c['queued']}/{c['pending']}/{c['done']}/{c['failed']}",
            "-" if s["rate_per_s"] is None else f"{s['rate_per_s']:.1f}",
            _duration(s["eta_s"]),
        )
        notes.append(f"{s['job']}: model {s['model']}")
        if s["errors"]:
            notes[-1] += "; failures: " + ", ".join(f"{k} {v:,}" for k, v in s["errors"].items())
        notes += [
            f"[yellow]lease expiring[/yellow]: chunk {x['chunk_no']} of job {s['job']} held by "
            f"{x['owner']}, {x['expires_in_s']}s left"
            for x in store.leases(job.id)
            if x["expires_in_s"] < 60
        ]
    return Group(table, *notes)


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


@command(app, "export")
def export(
    job: Annotated[str, typer.Option(help="Job name.")],
    out_path: Annotated[str, typer.Option("--out", help="Local path or fsspec URL.")],
    fmt: Annotated[
        str | None, typer.Option("--format", help="parquet or jsonl (default: from --out).")
    ] = None,
    export_status: Annotated[str, typer.Option("--status", help="done, failed or all.")] = "done",
    exclude_flags: Annotated[str, typer.Option(help="Comma-separated quality flags to leave out.")] = "",
    rows_per_shard: Annotated[
        int, typer.Option(min=1, help="Rows per shard when --out is a folder.")
    ] = 1_000_000,
    since: Annotated[str | None, typer.Option(help="Only items updated at or after this ISO time.")] = None,
) -> None:
    """Write a job's results in the Recap-DataComp-1B column layout."""
    from datetime import datetime

    from producer.export import export_job

    since_time = None
    if since:
        try:
            since_time = datetime.fromisoformat(since)
        except ValueError:
            raise RecapError(
                f"--since takes an ISO date or time like 2026-11-26T10:00, got {since!r}"
            ) from None
        if since_time.tzinfo is None:
            since_time = since_time.replace(tzinfo=UTC)

    from recap.quality import FLAGS

    flags = [f.strip() for f in exclude_flags.split(",") if f.strip()]
    unknown = sorted(set(flags) - set(FLAGS))
    if unknown:
        raise RecapError(f"unknown quality flag(s) {', '.join(unknown)}; known: {', '.join(FLAGS)}")
    store = _local_store()
    job_info = store.get_job(job)
    stats = export_job(
        store,
        job_info,
        out_path,
        fmt=fmt,
        status=export_status,
        exclude_flags=flags,
        rows_per_shard=rows_per_shard,
        since=since_time,
    )
    out.print(f"exported {stats.rows:,} rows in {stats.files} file(s) to {out_path}")


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
    from recap.dispatch import Dispatcher

    settings = _settings()
    store = _fleet_store("submit")
    _check_inputs(inputs)
    job_info = _open_and_register(
        store,
        settings,
        job,
        model or settings.model,
        inputs,
        _columns(url_col, caption_col, id_col, sha256_col),
        limit,
    )
    reports = _dispatch(Dispatcher(store, settings), [job_info])
    total = store.job_status(job_info)["items"]
    out.print(
        f"job {job}: {total['total']:,} items ({total['done']:,} done); "
        f"enqueued {sum(r.enqueued for r in reports)} chunk(s) on {reports[0].queue if reports else '-'}",
        highlight=False,
    )


def _dispatch(dispatcher, jobs):
    from sqlalchemy.exc import DBAPIError

    from recap.errors import ServiceUnavailable
    from recap.transient import is_transient

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
    from recap.dispatch import Dispatcher

    settings = _settings()
    store = _fleet_store("reconcile")
    jobs = [store.get_job(job)] if job else None
    reports = _dispatch(Dispatcher(store, settings), jobs)
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
    from recap.dispatch import Dispatcher
    from recap.errors import ErrorClass

    classes = [c.strip() for c in errors.split(",") if c.strip()]
    known = {e.value for e in ErrorClass}
    unknown = [c for c in classes if c not in known]
    if unknown or not classes:
        raise RecapError(
            f"unknown error class(es) {', '.join(unknown) or '(none)'}; known: {', '.join(sorted(known))}"
        )
    settings = _settings()
    store = _fleet_store("retry")
    job_info = store.get_job(job)
    count, chunks = store.retry_failed(job_info, classes)
    _dispatch(Dispatcher(store, settings), [job_info])
    out.print(f"{count:,} item(s) back to pending in {len(chunks)} chunk(s) of job {job}")


@command(app, "worker")
def worker(
    gpus: Annotated[str, typer.Option(help="all, none (one CPU worker) or a list like 0,1.")] = "all",
) -> None:
    """Start worker processes on this host: one per GPU, or one on the CPU."""
    from recap.db import require_postgres
    from workers.daemon import parse_gpus, run_workers, worker_specs

    settings = _settings()
    _check_schema_unless_unreachable(require_postgres(settings.database_url, "worker"))
    specs = worker_specs(parse_gpus(gpus), settings)
    for spec in specs:
        err.print(
            f"starting {spec.node_name} on {'GPU ' + spec.gpu if spec.gpu else 'the CPU'}, queue {spec.queue}"
        )
    raise typer.Exit(run_workers(specs, settings))


def _check_schema_unless_unreachable(url: str) -> None:
    """Workers start while the database is down (they wait it out), not on an old schema."""
    from recap.db import get_engine, require_current_schema
    from recap.transient import is_transient

    try:
        require_current_schema(url)
    except Exception as exc:
        if not is_transient(exc):
            raise
        err.print(f"could not check the database schema ({type(exc).__name__}): starting anyway")
    finally:
        get_engine(url).dispose()  # the launcher itself keeps no connection open


@command(app, "flower")
def flower(
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 5555,
    address: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
) -> None:
    """Start Flower on this fleet's broker, with basic auth from RECAP_FLOWER_USER/PASSWORD."""
    import os
    import subprocess

    settings = _settings()
    if not settings.flower_user or not settings.flower_password:
        raise RecapError("recap flower needs RECAP_FLOWER_USER and RECAP_FLOWER_PASSWORD (basic auth)")
    secret = settings.flower_password.get_secret_value()
    if "," in secret or ":" in settings.flower_user or "," in settings.flower_user:
        # Flower splits FLOWER_BASIC_AUTH on commas (several users) and on the first colon.
        raise RecapError("RECAP_FLOWER_USER may not contain ':' or ',', nor RECAP_FLOWER_PASSWORD ','")
    env = dict(os.environ)
    # Through the environment, so the password is not on the process list.
    env["FLOWER_BASIC_AUTH"] = f"{settings.flower_user}:{secret}"
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.celery_app",
        "flower",
        f"--port={port}",
        f"--address={address}",
    ]
    raise typer.Exit(subprocess.call(argv, env=env))


@command(app, "drop")
def drop(
    job: Annotated[str, typer.Option(help="Job name.")],
    yes: Annotated[bool, typer.Option("--yes", help="Really delete it.")] = False,
) -> None:
    """Delete a job with all its items and chunks (PostgreSQL drops its partition whole)."""
    store = _local_store()
    job_info = store.get_job(job)
    if not yes:
        raise RecapError(f"this deletes job {job!r} and all its results: add --yes to confirm")
    store.drop_job(job_info)
    out.print(f"dropped job {job}")


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
