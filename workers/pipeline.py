"""The caption pipeline for one chunk: load (fetch + prepare) ─ batch ─ caption ─ write.

The same code runs inside the Celery task (fleet) and in-process (`recap run`). Images
are batched in the order they become ready, not input order, and results are written
batch by batch, so a kill loses at most the batch in flight.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from recap.errors import describe
from recap.quality import quality_flags
from recap.records import Caption, ItemResult, Prepared, Rejected
from recap.settings import Settings
from recap.states import ItemStatus
from recap.store import ClaimedChunk, JobInfo, Store
from workers import metrics

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ChunkOutcome:
    job_id: int
    chunk_no: int
    done: int = 0
    failed: int = 0
    # Items still loading when the rest of the chunk was written: a background finisher
    # captions them, writes them and finishes the chunk (`CaptionPipeline.finishers`).
    left_to_finisher: int = 0


def format_prompt(template: str, org_caption: str | None) -> str:
    """Fill `{org_caption}`; other braces in a prompt are left alone."""
    return template.replace("{org_caption}", org_caption or "")


_END = object()
_STOP_POLL_S = 1.0  # how often a chunk waiting for images checks whether it should stop


class _Feed:
    """Runs the loader's generator on a thread so the pipeline can wait with a timeout;
    a bounded queue keeps the loader from running ahead of the engine."""

    def __init__(self, results: Iterator, size: int):
        self.queue: queue.Queue = queue.Queue(maxsize=size)
        self.results = results
        self.closed = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._pump, daemon=True, name="recap-feed")
        self.thread.start()

    def _pump(self) -> None:
        try:
            for result in self.results:
                while not self._put(result):
                    if self.closed.is_set():
                        return
                if self.closed.is_set():
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self.error = exc
        finally:
            while not self._put(_END) and not self.closed.is_set():
                pass  # the end (or the error) must reach the consumer
            if self.closed.is_set():
                self.results.close()  # cancels the loader's work in flight

    def _put(self, item) -> bool:
        try:
            self.queue.put(item, timeout=0.2)
            return True
        except queue.Full:
            return False

    def get(self, timeout: float | None):
        """The next result, `_END`, or None when `timeout` passed first."""
        try:
            item = self.queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _END and self.error is not None:
            raise RuntimeError(f"loading images failed: {self.error!r}") from self.error
        return item

    def close(self) -> None:
        """Stop feeding (an early return or an error): the pump thread ends and the
        loader's items in flight are abandoned."""
        self.closed.set()
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break


class CaptionPipeline:
    def __init__(
        self,
        settings: Settings,
        engine,
        store: Store,
        worker: str,
        loader=None,
        stopping: threading.Event | None = None,
    ):
        from workers.loader import ImageLoader

        self.settings = settings
        self.engine = engine
        self.store = store
        self.worker = worker
        self.loader = loader or ImageLoader(settings, engine.image_spec)
        self._loaders = {engine.image_spec: self.loader}  # one per image preparation
        self.batch_size = engine.default_batch_size  # RECAP_BATCH_SIZE, else the model's
        self._provenance: int | None = None
        self.busy = metrics.BusyMeter()
        self.engine_lock = threading.Lock()  # the finishers share the engine
        self.finishers: list[threading.Thread] = []
        self.finishing: set[tuple[int, int]] = set()
        self.stopping = stopping or threading.Event()  # set: finishers give their chunks back

    def close(self) -> None:
        self.stopping.set()
        self.drain(timeout=self.settings.fetch_timeout_s * (self.settings.fetch_retries + 1) + 5)
        for loader in self._loaders.values():
            loader.close()

    def _loader_for(self, job: JobInfo):
        """Images prepared as the job's recorded image mode asks (pad or crop)."""
        mode = (job.generation or {}).get("image_mode")
        if not mode:
            return self.loader
        spec = self.engine.image_spec_for(mode)
        if spec not in self._loaders:
            from workers.loader import ImageLoader

            self._loaders[spec] = ImageLoader(
                self.settings, spec, fetcher=getattr(self.loader, "_fetcher", None)
            )
        return self._loaders[spec]

    def drain(self, timeout: float | None = None) -> None:
        """Wait for the finishers of earlier chunks (their stragglers)."""
        for thread in list(self.finishers):
            thread.join(timeout)
        self.finishers = [t for t in self.finishers if t.is_alive()]

    def run_chunk(
        self,
        job: JobInfo,
        chunk_no: int,
        on_written: Callable[[list[ItemResult]], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        lease: ClaimedChunk | None = None,
    ) -> ChunkOutcome:
        """Caption the chunk's pending items; `on_written` runs after each batch is stored
        (progress); `should_stop` ends the chunk early (graceful stop, lease lost).

        Given the chunk's `lease`, the few items still loading once everything else is
        written (and nothing arrived for RECAP_STRAGGLER_GRACE_S) go to a background
        finisher, so the engine can start on the next chunk instead of waiting for them;
        the finisher keeps the lease and finishes the chunk.
        """
        outcome = ChunkOutcome(job.id, chunk_no)
        items = self.store.pending_items(job.id, chunk_no)
        feed = _Feed(self._loader_for(job).load(items), size=2 * self.batch_size)
        try:
            self._run_feed(job, chunk_no, feed, len(items), outcome, on_written, should_stop, lease)
        finally:
            if not outcome.left_to_finisher:
                feed.close()
        return outcome

    def _run_feed(self, job, chunk_no, feed, count, outcome, on_written, should_stop, lease) -> None:
        batch = _Batch()
        remaining = count
        may_leave = max(1, int(count * self.settings.straggler_share))
        while remaining:
            tail = lease is not None and remaining <= may_leave
            # With a stop condition, wake up now and then to look at it: a stop must not
            # wait for a whole batch of slow downloads.
            poll = _STOP_POLL_S if should_stop else None
            loaded = feed.get(timeout=self.settings.straggler_grace_s if tail else poll)
            metrics.BUFFER_DEPTH.set(feed.queue.qsize() + len(batch.ready))
            if loaded is None and not tail:
                if should_stop():
                    self._flush(job, chunk_no, batch, outcome, on_written)
                    return
                continue
            if loaded is None:  # only stragglers left, and the engine would wait for them
                self._flush(job, chunk_no, batch, outcome, on_written)
                if should_stop and should_stop():
                    return  # stopping, or the chunk is no longer ours: nothing to hand off
                self._hand_off(job, lease, feed, remaining, on_written)
                outcome.left_to_finisher = remaining
                return
            if loaded is _END:
                break
            remaining -= 1
            batch.add(self, loaded)
            if batch.full(self.batch_size):
                self._flush(job, chunk_no, batch, outcome, on_written)
                if should_stop and should_stop():
                    return
        self._flush(job, chunk_no, batch, outcome, on_written)

    def _flush(self, job, chunk_no, batch: _Batch, outcome, on_written) -> None:
        if batch.empty():
            return
        results = self._caption(job, batch.ready) + batch.rejected
        batch.clear()
        self._write(job, chunk_no, results, outcome, on_written)

    def _hand_off(self, job, lease: ClaimedChunk, feed: _Feed, remaining: int, on_written) -> None:
        lease.keep()  # renewed until the finisher finishes or releases the chunk
        thread = threading.Thread(
            target=self._finish_stragglers,
            args=(job, lease, feed, remaining, on_written),
            daemon=True,
            name=f"recap-finisher-{lease.chunk_no}",
        )
        self.finishers = [t for t in self.finishers if t.is_alive()] + [thread]
        self.finishing.add((job.id, lease.chunk_no))
        try:
            thread.start()
        except BaseException:
            self.finishing.discard((job.id, lease.chunk_no))
            raise

    def is_finishing(self, job_id: int, chunk_no: int) -> bool:
        """A finisher of this process still holds the chunk: a second delivery must wait."""
        return (job_id, chunk_no) in self.finishing

    def _finish_stragglers(self, job, lease: ClaimedChunk, feed: _Feed, remaining: int, on_written) -> None:
        """Caption each straggler as it arrives (the lease is kept meanwhile), then finish
        the chunk. If this process dies first, the lease runs out and another worker takes
        the chunk's pending items: nothing is done twice."""
        chunk_no = lease.chunk_no
        outcome = ChunkOutcome(job.id, chunk_no)
        try:
            while remaining and not self.stopping.is_set():
                if lease.lost.is_set():
                    log.warning("chunk %s/%s was taken over: its finisher stops", job.id, chunk_no)
                    return
                loaded = feed.get(timeout=_STOP_POLL_S)
                if loaded is None:
                    continue
                if loaded is _END:
                    break
                remaining -= 1
                batch = _Batch()
                batch.add(self, loaded)
                self._flush(job, chunk_no, batch, outcome, on_written)
            if self.stopping.is_set() and remaining:
                lease.release(count_attempt=False)
            else:
                lease.finish()
        except Exception as exc:  # give the chunk back: another worker takes what is left
            log.exception("finishing the stragglers of chunk %s/%s failed", job.id, chunk_no)
            try:
                lease.release(error=describe(exc))
            except Exception:  # the lease runs out instead
                log.exception("could not give chunk %s/%s back", job.id, chunk_no)
        finally:
            feed.close()
            self.finishing.discard((job.id, chunk_no))

    def _caption(self, job: JobInfo, ready: list[Prepared]) -> list[ItemResult]:
        if not ready:
            return []
        prompts = [format_prompt(job.prompt, p.item.org_caption) for p in ready]
        with self.engine_lock:
            started = time.monotonic()
            captions = self.engine.caption([p.image for p in ready], prompts, job.generation)
            busy = time.monotonic() - started
        metrics.BATCH_SIZE.observe(len(ready))
        metrics.BATCH_SECONDS.observe(busy)
        self.busy.record(busy, len(ready))
        return [self._caption_result(p, c) for p, c in zip(ready, captions, strict=True)]

    def _caption_result(self, prepared: Prepared, caption: Caption) -> ItemResult:
        common = dict(
            key=prepared.item.key,
            sha256=prepared.sha256,
            width=prepared.width,
            height=prepared.height,
            fetch_ms=prepared.fetch_ms,
            infer_ms=caption.infer_ms,
            worker=self.worker,
        )
        if caption.failure is not None:
            return ItemResult(
                status=ItemStatus.FAILED,
                error_class=caption.failure.error_class.value,
                error=caption.failure.message,
                **common,
            )
        return ItemResult(
            status=ItemStatus.DONE,
            caption=caption.text,
            flags=quality_flags(caption.text, caption.finish_reason),
            **common,
        )

    def _provenance_id(self) -> int:
        """The engine's provenance row, looked up once per pipeline (the engine is fixed)."""
        if self._provenance is None:
            self._provenance = self.store.provenance_id(self.engine.provenance)
        return self._provenance

    def _rejected_result(self, rejected: Rejected) -> ItemResult:
        return ItemResult(
            key=rejected.item.key,
            status=ItemStatus.FAILED,
            error_class=rejected.failure.error_class.value,
            error=rejected.failure.message,
            sha256=rejected.sha256,
            fetch_ms=rejected.fetch_ms,
            worker=self.worker,
        )

    def _write(self, job, chunk_no, results, outcome: ChunkOutcome, on_written) -> None:
        self.store.write_results(
            job.id,
            chunk_no,
            results,
            model_revision=self.engine.revision,
            provenance_id=self._provenance_id(),
        )
        for r in results:
            metrics.ITEMS.labels(r.status.value, r.error_class or "").inc()
        outcome.done += sum(r.status == ItemStatus.DONE for r in results)
        outcome.failed += sum(r.status == ItemStatus.FAILED for r in results)
        if on_written:
            on_written(results)


class _Batch:
    """What waits for the engine (prepared images) and for the store (rejections)."""

    def __init__(self):
        self.ready: list[Prepared] = []
        self.rejected: list[ItemResult] = []

    def add(self, pipeline: CaptionPipeline, loaded: Prepared | Rejected) -> None:
        if isinstance(loaded, Rejected):
            self.rejected.append(pipeline._rejected_result(loaded))
        else:
            self.ready.append(loaded)
            metrics.FETCH_SECONDS.observe(loaded.fetch_ms / 1000)

    def full(self, size: int) -> bool:
        return len(self.ready) >= size or len(self.rejected) >= size

    def empty(self) -> bool:
        return not self.ready and not self.rejected

    def clear(self) -> None:
        self.ready, self.rejected = [], []
