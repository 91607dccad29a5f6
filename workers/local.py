"""`recap run`: the whole job on one machine, chunk by chunk, through the fleet's pipeline."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from recap.records import ItemResult
from recap.schema import UNFINISHED_CHUNK_STATES
from recap.settings import Settings
from recap.store import JobInfo, Store
from workers.pipeline import CaptionPipeline


def local_worker_name() -> str:
    return f"recap-local-{os.getpid()}@{socket.gethostname()}"


def run_job_locally(
    settings: Settings,
    store: Store,
    job: JobInfo,
    engine,
    on_written: Callable[[list[ItemResult]], None] | None = None,
    loader=None,
) -> None:
    """Caption every unfinished chunk. This process owns the database, so it takes over
    chunks left `running` by a killed earlier run (`force`). `loader` replaces the image
    loader (the pipeline benchmark's fetch-then-caption baseline)."""
    worker = local_worker_name()
    store.set_model_revision(job.id, engine.revision)
    pipeline = CaptionPipeline(settings, engine, store, worker, loader=loader)
    try:
        for chunk_no in store.chunk_states(job.id, UNFINISHED_CHUNK_STATES):
            claim = store.claim_chunk(
                job.id, chunk_no, worker, settings.lease_s, settings.chunk_max_attempts, force=True
            )
            if not claim.claimed:
                continue
            try:
                outcome = pipeline.run_chunk(job, chunk_no, on_written=on_written, leave_stragglers=True)
            except BaseException:
                store.release_chunk(job.id, chunk_no, worker, count_attempt=False)
                raise
            if not outcome.left_to_finisher:
                store.finish_chunk(job.id, chunk_no, worker)
        pipeline.drain()  # the stragglers of the last chunks
    finally:
        pipeline.close()
