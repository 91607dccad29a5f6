"""The worker pipeline in-process: a stop is honoured while images are still loading; the
chunk's lease is kept while it runs (fleet and `recap run` alike); the worker runtime takes
its collaborators from its constructor."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from recap.records import InputItem
from recap.settings import Settings
from recap.states import ClaimRefusal
from recap.store import ChunkRef, Store
from workers.engine import TransformersEngine
from workers.local import run_job_locally
from workers.pipeline import CaptionPipeline
from workers.runtime import WorkerRuntime


def test_a_stop_does_not_wait_for_a_batch_of_slow_downloads(sqlite_url, image_server, tiny_model_dir):
    settings = Settings(
        device="cpu", dtype="float32", batch_size=8, max_new_tokens=4, fetch_timeout_s=30, fetch_retries=0
    )
    store = Store(sqlite_url)
    job = store.ensure_job("slow", "tiny", "describe", {}, 8)
    store.register_items(
        job, [[InputItem(f"k{i}", image_server.url(f"/slow?delay=20&seed={i}")) for i in range(8)]]
    )
    pipeline = CaptionPipeline(settings, TransformersEngine(tiny_model_dir, settings), store, "w")
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    try:
        outcome = pipeline.run_chunk(job, 0, should_stop=stop.is_set)
    finally:
        pipeline.close()
    assert time.monotonic() - started < 5, "the stop waited for the downloads"
    assert (outcome.done, outcome.failed) == (0, 0)


def test_recap_run_keeps_its_lease_while_a_chunk_runs(sqlite_url, image_server, tiny_model_dir):
    settings = Settings(
        device="cpu", dtype="float32", max_new_tokens=4, lease_s=1.5, fetch_timeout_s=30, fetch_retries=0
    )
    store = Store(sqlite_url)
    job = store.ensure_job("kept", "tiny", "describe", {}, 8)
    store.register_items(
        job, [[InputItem(f"k{i}", image_server.url(f"/slow?delay=4&seed={i}")) for i in range(2)]]
    )
    engine = TransformersEngine(tiny_model_dir, settings)
    run = threading.Thread(target=run_job_locally, args=(settings, store, job, engine), daemon=True)
    run.start()
    time.sleep(3)  # twice the lease: only its renewals keep it
    assert store.claim_chunk(job.id, 0, "another-worker", 60, 3).reason is ClaimRefusal.LEASED
    run.join(60)
    assert not run.is_alive()
    assert store.job_status(job).items.done == 2


class _PoisonedPipeline(CaptionPipeline):
    def run_chunk(self, job, chunk_no, **kwargs):
        if chunk_no == 1:
            raise RuntimeError("injected crash\nin chunk 1")
        return super().run_chunk(job, chunk_no, **kwargs)


def test_the_worker_runtime_takes_its_engine_store_and_pipeline_from_its_constructor(
    pg_url, redis_url, image_server, tiny_model_dir, tmp_path
):
    settings = Settings(
        database_url=pg_url,
        broker_url=redis_url,
        model="tiny",
        device="cpu",
        dtype="float32",
        max_new_tokens=4,
        cache_dir=tmp_path,
        feed_interval_s=3600,
        fetch_retries=0,
    )
    store = Store(pg_url)
    job = store.ensure_job("seams", "tiny", "describe", {}, 4)
    store.register_items(
        job, [[InputItem(f"k{i}", image_server.url(f"/img/48x48.jpg?seed={i}")) for i in range(8)]]
    )
    runtime = WorkerRuntime(
        settings,
        store=store,
        engine_factory=lambda s: TransformersEngine(tiny_model_dir, s),
        pipeline_factory=_PoisonedPipeline,
    )
    try:
        runtime.handle_chunk(ChunkRef(job.id, 0))
        with pytest.raises(RuntimeError, match="injected crash"):
            runtime.handle_chunk(ChunkRef(job.id, 1))
        runtime.pipeline().drain()
    finally:
        runtime.close()
    with store.engine.connect() as conn:
        chunks = conn.execute(
            sa.text("SELECT chunk_no, state, attempts, lease_owner, last_error FROM chunks ORDER BY chunk_no")
        ).all()
    assert tuple(chunks[0]) == (0, "done", 1, None, None)
    # Given back with its reason on one line, and the attempt counted; the runtime's
    # top-up may have queued it again already.
    assert chunks[1].state in ("pending", "queued")
    assert (chunks[1].attempts, chunks[1].lease_owner) == (1, None)
    assert chunks[1].last_error == "RuntimeError: injected crash in chunk 1"
