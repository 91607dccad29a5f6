"""The worker pipeline in-process: a stop is honoured while images are still loading; the
chunk's lease is kept while it runs (fleet and `recap run` alike); the worker runtime takes
its collaborators from its constructor."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

import pytest
import sqlalchemy as sa

from recap.db import upgrade
from recap.generation import GenerationSettings
from recap.records import InputItem
from recap.settings import Settings
from recap.states import ClaimRefusal
from recap.store import ChunkRef, Store
from workers.engine import EngineFatalError, TransformersEngine
from workers.engine.protocol import StreamingEngine
from workers.local import run_job_locally
from workers.pipeline import CaptionPipeline
from workers.runtime import WorkerRuntime


def test_a_stop_does_not_wait_for_a_batch_of_slow_downloads(sqlite_url, image_server, tiny_model_dir):
    settings = Settings(
        device="cpu", dtype="float32", batch_size=8, max_new_tokens=4, fetch_timeout_s=30, fetch_retries=0
    )
    store = Store(sqlite_url)
    job = store.ensure_job("slow", "tiny", "describe", GenerationSettings.from_json({}), 8)
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
    job = store.ensure_job("kept", "tiny", "describe", GenerationSettings.from_json({}), 8)
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
    job = store.ensure_job("seams", "tiny", "describe", GenerationSettings.from_json({}), 4)
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


# -- a streaming engine: batches join the ones in the engine, across chunks ------------------


class StreamingTransformers(StreamingEngine):
    """The tiny transformers engine behind a thread of its own, as vLLM's feed is: `submit`
    queues a batch and returns; each batch holds the engine `hold_s` longer (a slow GPU)."""

    def __init__(
        self, engine: TransformersEngine, batch_size: int, hold_s: float, fail_batch: int | None = None
    ):
        self.engine = engine
        self.default_batch_size = batch_size
        self.hold_s = hold_s
        self.fail_batch = fail_batch  # this batch (0-based) meets a broken device
        for name in ("model_id", "revision", "image_spec", "provenance", "is_tiny"):
            setattr(self, name, getattr(engine, name))
        self.image_spec_for = engine.image_spec_for
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.submitted = 0
        self.joined_running = 0  # batches submitted while an earlier one was still unfinished
        self.unfinished = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def caption(self, images, prompts, generation=None):
        return self.submit(images, prompts, generation).result()

    def submit(self, images, prompts, generation=None) -> Future:
        future: Future = Future()
        with self.lock:
            self.joined_running += self.unfinished > 0
            self.unfinished += 1
            self.inbox.put((self.submitted, images, prompts, generation, future))
            self.submitted += 1
        return future

    def _serve(self) -> None:
        while True:
            n, images, prompts, generation, future = self.inbox.get()
            time.sleep(self.hold_s)
            with self.lock:
                self.unfinished -= 1
            if n == self.fail_batch:
                future.set_exception(EngineFatalError("CUDA error: an illegal memory access (injected)"))
            else:
                future.set_result(self.engine.caption(images, prompts, generation))


def _job_of(store, name: str, image_server, n: int, chunk_size: int):
    job = store.ensure_job(name, "tiny", "describe", GenerationSettings.from_json({}), chunk_size)
    store.register_items(
        job, [[InputItem(f"k{i}", image_server.url(f"/img/{40 + i}x40.jpg?seed={i}")) for i in range(n)]]
    )
    return job


def _sqlite_store(path) -> Store:
    upgrade(f"sqlite:///{path}")
    return Store(f"sqlite:///{path}")


def _rows(store) -> list[tuple]:
    with store.engine.connect() as conn:
        items = conn.execute(sa.text("SELECT key, status, caption FROM items ORDER BY key")).all()
        chunks = conn.execute(sa.text("SELECT state, attempts FROM chunks ORDER BY chunk_no")).all()
    return [tuple(r) for r in items], [tuple(c) for c in chunks]


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir):
    return TransformersEngine(tiny_model_dir, Settings(device="cpu", dtype="float32", max_new_tokens=4))


def test_a_streaming_engine_is_fed_across_chunk_boundaries(image_server, tiny_engine, tmp_path):
    """Each chunk is one batch: its task returns with the batch still in the engine (a
    finisher writes it and finishes the chunk), and the next chunk's batch joins it there;
    the captions and the chunks' ends are those of the synchronous path."""
    settings = Settings(device="cpu", dtype="float32", max_new_tokens=4, fetch_retries=0)
    streaming = StreamingTransformers(tiny_engine, 4, hold_s=1.5)
    rows = {}
    for name, engine in (("sync", tiny_engine), ("stream", streaming)):
        store = _sqlite_store(tmp_path / f"{name}.db")
        job = _job_of(store, "fed", image_server, 12, chunk_size=4)
        run_job_locally(settings, store, job, engine)
        rows[name] = _rows(store)
    assert streaming.submitted == 3 and streaming.joined_running == 2
    assert rows["stream"] == rows["sync"]
    items, chunks = rows["stream"]
    assert chunks == [("done", 1)] * 3 and [r[1] for r in items] == ["done"] * 12


def test_a_stop_writes_the_batches_in_the_engine_and_hands_nothing_off(sqlite_url, image_server, tiny_engine):
    settings = Settings(device="cpu", dtype="float32", max_new_tokens=4, fetch_retries=0)
    streaming = StreamingTransformers(tiny_engine, 2, hold_s=0.5)
    store = Store(sqlite_url)
    job = _job_of(store, "stopped", image_server, 8, chunk_size=8)
    lease = store.claim_chunk(job.id, 0, "w", 60, 3)
    lease.keep()
    stop = threading.Event()
    pipeline = CaptionPipeline(settings, streaming, store, "w", stopping=stop)
    try:
        outcome = pipeline.run_chunk(
            job, 0, on_written=lambda _: stop.set(), should_stop=stop.is_set, lease=lease
        )
        lease.release(count_attempt=False)  # as the runtime does on SIGTERM
    finally:
        pipeline.close()
    assert outcome.left_to_finisher == 0 and not pipeline.finishers
    assert outcome.done == 2 * streaming.submitted < 8  # every batch sent was written, no more
    items, chunks = _rows(store)
    assert [r[1] for r in items].count("done") == outcome.done
    assert chunks == [("pending", 0)]


def test_a_broken_device_under_a_finisher_stops_the_next_chunk_blaming_no_item(
    sqlite_url, image_server, tiny_engine
):
    settings = Settings(device="cpu", dtype="float32", max_new_tokens=4, fetch_retries=0)
    streaming = StreamingTransformers(tiny_engine, 4, hold_s=0.2, fail_batch=0)
    store = Store(sqlite_url)
    job = _job_of(store, "broken", image_server, 8, chunk_size=4)
    pipeline = CaptionPipeline(settings, streaming, store, "w")
    try:
        lease = store.claim_chunk(job.id, 0, "w", 60, 3)
        lease.keep()
        assert pipeline.run_chunk(job, 0, lease=lease).left_to_finisher == 4
        pipeline.drain()
        with pytest.raises(EngineFatalError, match="illegal memory access"):
            pipeline.run_chunk(job, 1, lease=store.claim_chunk(job.id, 1, "w", 60, 3))
    finally:
        pipeline.close()
    with store.engine.connect() as conn:
        chunk = conn.execute(
            sa.text("SELECT state, attempts, last_error FROM chunks WHERE chunk_no = 0")
        ).one()
    assert (chunk.state, chunk.attempts) == ("pending", 1) and "illegal memory access" in chunk.last_error
    assert {r[1] for r in _rows(store)[0]} == {"pending"}


def test_a_finisher_that_loses_the_lease_stops_without_writing_or_finishing(
    sqlite_url, image_server, tiny_engine
):
    settings = Settings(device="cpu", dtype="float32", max_new_tokens=4, fetch_retries=0)
    streaming = StreamingTransformers(tiny_engine, 4, hold_s=1.0)
    store = Store(sqlite_url)
    job = _job_of(store, "taken", image_server, 4, chunk_size=4)
    pipeline = CaptionPipeline(settings, streaming, store, "w")
    lease = store.claim_chunk(job.id, 0, "w", 60, 3)
    lease.keep()
    try:
        assert pipeline.run_chunk(job, 0, lease=lease).left_to_finisher == 4
        assert pipeline.is_finishing(job.id, 0)
        lease.lost.set()  # as a renewal that finds the chunk taken does
        pipeline.drain(timeout=10)
        assert not pipeline.finishers and not pipeline.is_finishing(job.id, 0)
    finally:
        pipeline.close()
    items, chunks = _rows(store)
    assert {r[1] for r in items} == {"pending"} and chunks == [("running", 1)]
