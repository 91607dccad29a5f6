"""`recap run`: the whole job on one machine, chunk by chunk, through the fleet's pipeline."""

from __future__ import annotations

from collections.abc import Callable

from recap.records import ItemResult
from recap.settings import Settings
from recap.states import UNFINISHED_CHUNK_STATES
from recap.store import JobInfo, Store
from recap.worker_names import LocalOwner
from workers.pipeline import CaptionPipeline


def run_job_locally(
    settings: Settings,
    store: Store,
    job: JobInfo,
    engine,
    on_written: Callable[[list[ItemResult]], None] | None = None,
    loader=None,
) -> None:
    """Caption every unfinished chunk, keeping each chunk's lease while it runs, as the
    fleet does. This process owns the database, so it takes over chunks left `running` by
    a killed earlier run (`force`). `loader` replaces the image loader (the pipeline
    benchmark's fetch-then-caption baseline)."""
    owner = str(LocalOwner.this_process())
    pipeline = CaptionPipeline(settings, engine, store, owner, loader=loader)
    try:
        for chunk_no in store.chunk_states(job.id, UNFINISHED_CHUNK_STATES):
            lease = store.claim_chunk(
                job.id, chunk_no, owner, settings.lease_s, settings.chunk_max_attempts, force=True
            )
            if not lease.claimed:
                continue
            lease.keep()
            try:
                outcome = pipeline.run_chunk(
                    job, chunk_no, on_written=on_written, should_stop=lease.lost.is_set, lease=lease
                )
            except BaseException:
                lease.release(count_attempt=False)
                raise
            if not outcome.left_to_finisher:
                lease.finish()
        pipeline.drain()  # the stragglers of the last chunks
    finally:
        pipeline.close()
