"""Per-process worker state: the store, the model (loaded once, lazily), the pipeline and
the feeder that keeps the queue topped up. Its collaborators are constructor arguments,
so a test hands in its own instead of patching this class."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from recap.db import require_current_schema, require_postgres
from recap.dispatch import Dispatcher
from recap.errors import describe
from recap.settings import Settings
from recap.store import ChunkRef, ClaimedChunk, JobInfo, Refused, Store
from recap.worker_names import FleetOwner
from workers import metrics
from workers.engine import EngineFatalError
from workers.pipeline import CaptionPipeline, ChunkOutcome

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings], object]
PipelineFactory = Callable[..., CaptionPipeline]


def load_configured_engine(settings: Settings):
    """RECAP_MODEL on RECAP_DEVICE, as `recap worker` serves it."""
    from workers.engine import load_engine  # torch and transformers: once a chunk arrives

    return load_engine(settings)


class WorkerRuntime:
    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        dispatcher: Dispatcher | None = None,
        engine_factory: EngineFactory = load_configured_engine,
        pipeline_factory: PipelineFactory = CaptionPipeline,
    ):
        self.settings = settings
        self.name = str(FleetOwner.this_process())
        self.store = store or Store(
            require_postgres(settings.database_url, "worker"), retry_s=settings.db_retry_s
        )
        self.dispatcher = dispatcher or Dispatcher(self.store, settings)
        self.engine_factory = engine_factory
        self.pipeline_factory = pipeline_factory
        self.stopping = threading.Event()
        self._pipeline: CaptionPipeline | None = None
        self._load_lock = threading.Lock()
        self._feeder = threading.Thread(target=self._feed_forever, name="recap-feeder", daemon=True)
        self._feeder.start()

    def pipeline(self) -> CaptionPipeline:
        """The model is loaded once per process, on the first chunk (not at child start:
        Celery kills a child whose start-up blocks for more than a few seconds)."""
        with self._load_lock:
            if self._pipeline is None:
                # Before any claim: on an older schema every write would fail after the
                # GPU work, and each failure would count an attempt against the chunk.
                require_current_schema(self.store.url)
                engine = self.engine_factory(self.settings)
                self._pipeline = self.pipeline_factory(
                    self.settings, engine, self.store, self.name, stopping=self.stopping
                )
            return self._pipeline

    def handle_chunk(self, ref: ChunkRef) -> str:
        try:
            return self._handle_chunk(ref)
        finally:
            self.top_up()

    def _handle_chunk(self, ref: ChunkRef) -> str:
        s = self.settings
        if self._pipeline is None:  # an older schema lacks columns this recap reads and writes
            require_current_schema(self.store.url)
        job = self.store.job_by_id(ref.job_id)  # before the claim: a failure here costs nothing
        if job.model != s.model:  # queue names are model slugs, and two models may share one
            log.warning(
                "chunk %s/%s is for model %s, this worker serves %s: skipped",
                ref.job_id,
                ref.chunk_no,
                job.model,
                s.model,
            )
            return f"skipped: the job's model is {job.model}"
        pipeline = self.pipeline()
        if pipeline.fatal is not None:  # the device broke under a finisher: claim nothing more
            self._exit_on_fatal(pipeline, pipeline.fatal, lease=None)
        if pipeline.is_finishing(ref.job_id, ref.chunk_no):
            return "skipped: its stragglers are being finished here"
        job, lease = self._claim_first(job, ref)
        if not lease.claimed:
            reason = lease.reason.value
            metrics.CHUNKS.labels(f"skipped_{reason}").inc()
            log.info("chunk %s/%s skipped: %s", ref.job_id, ref.chunk_no, reason)
            return f"skipped: {reason}"
        lease.keep()
        outcome = self._run(pipeline, job, lease)
        if lease.lost.is_set():
            return "stopped: the lease was lost (another worker has the chunk)"
        if outcome.left_to_finisher:  # the finisher holds the chunk now, stopping or not
            metrics.CHUNKS.labels("left_to_finisher").inc()
            return (
                f"{outcome.done} done, {outcome.failed} failed, "
                f"{outcome.left_to_finisher} item(s) left to the finisher"
            )
        if self.stopping.is_set():
            lease.release(count_attempt=False)
            return "released: worker stopping"
        state = lease.finish().value
        metrics.CHUNKS.labels(state).inc()
        return f"{state}: {outcome.done} done, {outcome.failed} failed"

    def _claim_first(self, job: JobInfo, ref: ChunkRef) -> tuple[JobInfo, ClaimedChunk | Refused]:
        """Claim a chunk of a higher-priority job of this model where there is one (the
        message's chunk goes back to `pending`, sent again by dispatch), else the message's:
        a rush job starts within one chunk on every worker, whatever the queue holds."""
        s = self.settings
        better = self.store.higher_priority_chunk(s.model, job.priority)
        if better is not None and not self._pipeline.is_finishing(better.job_id, better.chunk_no):
            lease = self.store.claim_chunk(
                better.job_id, better.chunk_no, self.name, s.lease_s, s.chunk_max_attempts
            )
            if lease.claimed:
                self.store.unqueue_chunk(ref)
                log.info(
                    "chunk %s/%s set aside for chunk %s/%s of a higher-priority job",
                    ref.job_id,
                    ref.chunk_no,
                    better.job_id,
                    better.chunk_no,
                )
                return self.store.job_by_id(better.job_id), lease
        return job, self.store.claim_chunk(
            ref.job_id, ref.chunk_no, self.name, s.lease_s, s.chunk_max_attempts
        )

    def _run(self, pipeline: CaptionPipeline, job: JobInfo, lease: ClaimedChunk) -> ChunkOutcome:
        """The chunk through the pipeline; a failure gives it back with its reason."""
        try:
            return pipeline.run_chunk(
                job,
                lease.chunk_no,
                lease=lease,
                should_stop=lambda: self.stopping.is_set() or lease.lost.is_set(),
            )
        except EngineFatalError as exc:
            self._exit_on_fatal(pipeline, exc, lease)
        except Exception as exc:
            lease.release(error=describe(exc))
            raise

    def _exit_on_fatal(self, pipeline: CaptionPipeline, exc: Exception, lease: ClaimedChunk | None):
        """The device is broken: give the chunk back and end this process; Celery starts a
        fresh child, which initialises CUDA anew. The attempt counts, so an item that breaks
        every device it meets stops after RECAP_CHUNK_MAX_ATTEMPTS."""
        log.critical("engine failure, restarting the worker process: %s", exc)
        try:
            self.stopping.set()  # finishers give their chunks back
            if lease is not None:
                lease.release(error=str(exc))
            pipeline.drain(timeout=5)
        finally:
            os._exit(70)

    def top_up(self) -> None:
        try:
            self.dispatcher.top_up(model=self.settings.model)
        except Exception as exc:  # Redis or Postgres down: the next top-up repairs it
            log.warning("could not top up the queue: %s", describe(exc))

    def _feed_forever(self) -> None:
        while not self.stopping.wait(self.settings.feed_interval_s):
            self.top_up()

    def on_sigterm(self, _signum=None, _frame=None) -> None:
        log.warning("SIGTERM: finishing the batch in flight, then giving the chunk back")
        self.stopping.set()

    def close(self) -> None:
        self.stopping.set()
        if self._pipeline is not None:
            self._pipeline.close()
