"""Per-process worker state: the store, the model (loaded once, lazily), the pipeline,
the lease keeper and the feeder that keeps the queue topped up."""

from __future__ import annotations

import logging
import os
import socket
import threading
from contextlib import contextmanager

from recap.db import require_postgres
from recap.dispatch import Dispatcher
from recap.settings import Settings
from recap.store import ChunkRef, Store
from workers import metrics
from workers.engine import EngineFatalError

log = logging.getLogger(__name__)


def worker_name() -> str:
    """Lease owner: the Celery node name (set by `recap worker`) plus this process's pid."""
    node = os.environ.get("RECAP_WORKER_NAME") or f"recap-{socket.gethostname()}"
    return f"{node}:{os.getpid()}"


class WorkerRuntime:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.name = worker_name()
        self.store = Store(require_postgres(settings.database_url, "worker"), retry_s=settings.db_retry_s)
        self.dispatcher = Dispatcher(self.store, settings)
        self.stopping = threading.Event()
        self._pipeline = None
        self._load_lock = threading.Lock()
        self._feeder = threading.Thread(target=self._feed_forever, name="recap-feeder", daemon=True)
        self._feeder.start()

    def pipeline(self):
        """The model is loaded once per process, on the first chunk (not at child start:
        Celery kills a child whose start-up blocks for more than a few seconds)."""
        with self._load_lock:
            if self._pipeline is None:
                from recap.db import require_current_schema
                from workers.engine import load_engine
                from workers.pipeline import CaptionPipeline

                # Before any claim: on an older schema every write would fail after the
                # GPU work, and each failure would count an attempt against the chunk.
                require_current_schema(self.store.url)
                engine = load_engine(self.settings)
                self._pipeline = CaptionPipeline(
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
        if pipeline.is_finishing(ref.job_id, ref.chunk_no):
            return "skipped: its stragglers are being finished here"
        claim = self.store.claim_chunk(ref.job_id, ref.chunk_no, self.name, s.lease_s, s.chunk_max_attempts)
        if not claim.claimed:
            metrics.CHUNKS.labels(f"skipped_{claim.reason}").inc()
            log.info("chunk %s/%s skipped: %s", ref.job_id, ref.chunk_no, claim.reason)
            return f"skipped: {claim.reason}"
        lease_lost = threading.Event()
        try:
            with self._lease_kept(ref, lease_lost):
                outcome = pipeline.run_chunk(
                    job,
                    ref.chunk_no,
                    leave_stragglers=True,
                    should_stop=lambda: self.stopping.is_set() or lease_lost.is_set(),
                )
        except EngineFatalError as exc:
            # The device is broken: give the chunk back and end this process; Celery starts
            # a fresh child, which initialises CUDA anew. The attempt counts, so an item that
            # breaks every device it meets stops after RECAP_CHUNK_MAX_ATTEMPTS.
            log.critical("engine failure, restarting the worker process: %s", exc)
            try:
                self.stopping.set()  # finishers give their chunks back
                self.store.release_chunk(ref.job_id, ref.chunk_no, self.name, error=str(exc))
                pipeline.drain(timeout=5)
            finally:
                os._exit(70)
        except Exception as exc:
            self.store.release_chunk(
                ref.job_id, ref.chunk_no, self.name, error=f"{type(exc).__name__}: {exc}"
            )
            raise
        if lease_lost.is_set():
            return "stopped: the lease was lost (another worker has the chunk)"
        if self.stopping.is_set():
            self.store.release_chunk(ref.job_id, ref.chunk_no, self.name, count_attempt=False)
            return "released: worker stopping"
        if outcome.left_to_finisher:
            metrics.CHUNKS.labels("left_to_finisher").inc()
            return (
                f"{outcome.done} done, {outcome.failed} failed, "
                f"{outcome.left_to_finisher} straggler(s) left to the finisher"
            )
        state = self.store.finish_chunk(ref.job_id, ref.chunk_no, self.name)
        metrics.CHUNKS.labels(state).inc()
        return f"{state}: {outcome.done} done, {outcome.failed} failed"

    @contextmanager
    def _lease_kept(self, ref: ChunkRef, lost: threading.Event):
        """Renew the lease every third of its length while the chunk runs; set `lost` when
        another worker has taken the chunk (after an outage longer than the lease)."""
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.settings.lease_s / 3):
                try:
                    if not self.store.renew_lease(ref.job_id, ref.chunk_no, self.name, self.settings.lease_s):
                        log.warning("lost the lease on chunk %s/%s: stopping it", ref.job_id, ref.chunk_no)
                        lost.set()
                        return
                except Exception:  # the next renewal or the writes will tell
                    log.exception("lease renewal failed")

        thread = threading.Thread(target=renew, name="recap-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(timeout=5)

    def top_up(self) -> None:
        try:
            self.dispatcher.top_up(model=self.settings.model)
        except Exception as exc:  # Redis or Postgres down: the next top-up repairs it
            log.warning("could not top up the queue: %s: %s", type(exc).__name__, exc)

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
