"""The caption pipeline for one chunk: load (fetch + prepare) ─ batch ─ caption ─ write.

The same code runs inside the Celery task (fleet) and in-process (`recap run`). Images
are batched in the order they become ready, not input order, and results are written
batch by batch, so a kill loses at most the batches in flight. A streaming engine (vLLM)
gets the next batch while earlier ones run, and a chunk's last batches join the next
chunk's in it (`workers.in_flight`); a finisher writes what a chunk leaves behind
(`workers.finisher`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from recap.records import Caption, ImageSpec, ItemResult, Prepared
from recap.settings import Settings
from recap.store import ClaimedChunk, JobInfo, Store
from workers import metrics
from workers.engine.protocol import EngineFatalError, StreamingEngine
from workers.finisher import Finisher
from workers.image_feed import END, STOP_POLL_S, FormingBatch, ImageFeed
from workers.in_flight import EngineSlots, Flight, format_prompt
from workers.results import ChunkOutcome, ResultWriter

__all__ = ["CaptionPipeline", "ChunkOutcome", "format_prompt"]

log = logging.getLogger(__name__)


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
        from workers.scoring import load_scorer

        self.settings = settings
        self.engine = engine
        self.store = store
        self.worker = worker
        # CLIP scores (RECAP_SCORE_MODEL) on the captioner's device; None: off.
        self.scorer = load_scorer(settings, getattr(engine, "device", "cpu"))
        spec = self._with_clip_view(engine.image_spec)
        self.loader = loader or ImageLoader(settings, spec)
        self._loaders = {spec: self.loader}  # one per image preparation
        self.batch_size = engine.default_batch_size  # RECAP_BATCH_SIZE, else the model's
        self.results = ResultWriter(store, engine, worker, self.scorer)
        self.busy = metrics.BusyMeter()
        # A streaming engine is fed without waiting, within its slots; a synchronous one is
        # called under a lock (the finishers share it).
        self.slots = EngineSlots(self.busy) if isinstance(engine, StreamingEngine) else None
        self.engine_lock = threading.Lock()
        self.finishers: list[threading.Thread] = []
        self.finishing: set[tuple[int, int]] = set()
        self.stopping = stopping or threading.Event()  # set: finishers give their chunks back
        self.fatal: EngineFatalError | None = None  # the device broke under a finisher

    def close(self) -> None:
        self.stopping.set()
        self.drain(timeout=self.settings.fetch_timeout_s * (self.settings.fetch_retries + 1) + 5)
        for loader in self._loaders.values():
            loader.close()

    def _loader_for(self, job: JobInfo):
        """Images prepared as the job's recorded image mode asks (pad or crop)."""
        mode = job.generation.image_mode
        if not mode:
            return self.loader
        spec = self._with_clip_view(self.engine.image_spec_for(mode))
        if spec not in self._loaders:
            from workers.loader import ImageLoader

            self._loaders[spec] = ImageLoader(
                self.settings, spec, fetcher=getattr(self.loader, "_fetcher", None)
            )
        return self._loaders[spec]

    def _with_clip_view(self, spec: ImageSpec) -> ImageSpec:
        """The engine's image spec, asking for CLIP's thumbnail too where scoring is on."""
        return spec if self.scorer is None else replace(spec, clip_side=self.scorer.side)

    def drain(self, timeout: float | None = None) -> None:
        """Wait for the finishers of earlier chunks (their stragglers and engine tails)."""
        for thread in list(self.finishers):
            thread.join(timeout)
        self.finishers = [t for t in self.finishers if t.is_alive()]

    def is_finishing(self, job_id: int, chunk_no: int) -> bool:
        """A finisher of this process still holds the chunk: a second delivery must wait."""
        return (job_id, chunk_no) in self.finishing

    def run_chunk(
        self,
        job: JobInfo,
        chunk_no: int,
        on_written: Callable[[list[ItemResult]], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        lease: ClaimedChunk | None = None,
    ) -> ChunkOutcome:
        """Caption the chunk's pending items; `on_written` runs after each batch is stored
        (progress); `should_stop` ends the chunk early (graceful stop, lease lost), once
        the batches in the engine are written; so does a cancelled job, seen when a batch
        is written.

        Given the chunk's `lease`, what is left once everything else is written (the few
        items still loading after RECAP_STRAGGLER_GRACE_S without an arrival, and the
        batches still in a streaming engine) goes to a background finisher, so the engine
        can start on the next chunk instead of waiting; the finisher keeps the lease and
        finishes the chunk.
        """
        if self.fatal is not None:  # a finisher met a broken device: stop, blaming no item
            raise self.fatal
        outcome = ChunkOutcome(job.id, chunk_no)
        items = self.store.pending_items(job.id, chunk_no)
        feed = ImageFeed(self._loader_for(job).load(items, self.store.blocklist()), size=2 * self.batch_size)
        flight = Flight(self, job, chunk_no, outcome, on_written)
        feed_handed_off = False
        asked = should_stop or (lambda: False)

        def stop() -> bool:
            return flight.outcome.job_cancelled or asked()

        try:
            feed_handed_off = self._run_feed(feed, flight, len(items), stop, lease)
        finally:
            if not feed_handed_off:
                feed.close()
        return outcome

    def _run_feed(self, feed: ImageFeed, flight: Flight, count: int, should_stop, lease) -> bool:
        """True when a finisher took the feed (its stragglers still loading)."""
        batch = FormingBatch()
        remaining = count
        may_leave = max(1, int(count * self.settings.straggler_share))
        while remaining:
            tail = lease is not None and remaining <= may_leave
            # Wake up now and then to look at the stop condition: a stop must not wait for
            # a whole batch of slow downloads.
            loaded = flight.next(feed, timeout=self.settings.straggler_grace_s if tail else STOP_POLL_S)
            metrics.BUFFER_DEPTH.set(feed.queue.qsize() + len(batch.ready))
            if loaded is None and not tail:
                if should_stop():
                    break
                continue
            if loaded is None:  # only stragglers left, and the engine would wait for them
                flight.send(batch)
                return self._end(flight, should_stop, lease, feed, remaining)
            if loaded is END:
                break
            remaining -= 1
            batch.add(loaded, self.results.rejected_result)
            if batch.full(self.batch_size):
                flight.send(batch)
                batch = FormingBatch()
                if should_stop():
                    break
        flight.send(batch)
        return self._end(flight, should_stop, lease, None, 0)

    def _end(self, flight: Flight, should_stop, lease, feed: ImageFeed | None, stragglers: int) -> bool:
        """The chunk's task is done with it: what is still loading or in the engine goes to
        a finisher (True: with the feed); stopping, the batches in the engine are written
        first and nothing is handed off (the runtime gives the chunk back)."""
        if should_stop() or lease is None or not (stragglers or flight.items):
            flight.wait_all()
            return False
        outcome, left = flight.outcome, stragglers + flight.items
        self._hand_off(Finisher(self, flight.job, lease, flight, feed if stragglers else None, stragglers))
        outcome.left_to_finisher = left
        return bool(stragglers)

    def _hand_off(self, finisher: Finisher) -> None:
        lease = finisher.lease
        lease.keep()  # renewed until the finisher finishes or releases the chunk
        thread = threading.Thread(target=finisher.run, daemon=True, name=f"recap-finisher-{lease.chunk_no}")
        self.finishers = [t for t in self.finishers if t.is_alive()] + [thread]
        self.finishing.add((finisher.job.id, lease.chunk_no))
        try:
            thread.start()
        except BaseException:
            self.finishing.discard((finisher.job.id, lease.chunk_no))
            raise

    def caption_now(self, job: JobInfo, ready: list[Prepared]) -> list[Caption]:
        """A synchronous engine's captions of a batch (the finishers share the engine)."""
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
        return captions
