"""`recap run`: the whole job on one machine. The one command that needs both the producer
(reading and registering inputs, exporting) and the workers (engine and pipeline)."""

from __future__ import annotations

from typing import Annotated

import typer

from producer.input_job import collect_keys, job_for_input
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
from recap.cli.local_run import caption_until_finished
from recap.cli.register import check_inputs, open_and_register
from recap.cli.render import print_summary
from recap.cli.run_view import exit_unless_done, say_replaced
from recap.errors import RecapError
from recap.settings import Settings
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
    say_replaced(chosen)
    job_info = open_and_register(store, settings, chosen.name, model, inputs, wanted, limit)
    if retry_classes:
        retried = store.retry_failed(job_info, retry_classes)
        say(f"{retried.items:,} failed item(s) of {', '.join(retry_classes)} back to pending", to=err)
    left = caption_until_finished(settings, store, job_info, model)
    stats = export_job(store, job_info, out_path, fmt=fmt, status=export_status, overwrite=overwrite)
    status = store.job_status(job_info)
    print_summary(status)
    say(f"exported {stats.rows} rows to {out_path} (job {job_info.name})")
    exit_unless_done(status, left)


def with_engine(settings: Settings, engine: str | None) -> Settings:
    """`--engine` over RECAP_ENGINE (checked as the setting is)."""
    if engine is None:
        return settings
    if engine not in ("auto", "vllm", "transformers"):
        raise RecapError(f"--engine takes auto, vllm or transformers, got {engine!r}")
    return settings.model_copy(update={"engine": engine})
