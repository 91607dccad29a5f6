"""The caption pipeline for one chunk: load (fetch + prepare) ─ batch ─ caption ─ write.

The same code runs inside the Celery task (fleet) and in-process (`recap run`). Images
are batched in the order they become ready, not input order, and results are written
batch by batch, so a kill loses at most the batch in flight.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from recap.records import Caption, ItemResult, Prepared, Rejected
from recap.settings import Settings
from recap.store import JobInfo, Store
from workers import metrics
from workers.quality import quality_flags

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ChunkOutcome:
    job_id: int
    chunk_no: int
    done: int = 0
    failed: int = 0
    state: str = "running"


def format_prompt(template: str, org_caption: str | None) -> str:
    """Fill `{org_caption}`; other braces in a prompt are left alone."""
    return template.replace("{org_caption}", org_caption or "")


class CaptionPipeline:
    def __init__(self, settings: Settings, engine, store: Store, worker: str, loader=None):
        from workers.loader import ImageLoader

        self.settings = settings
        self.engine = engine
        self.store = store
        self.worker = worker
        self.loader = loader or ImageLoader(settings, engine.image_spec)
        self.batch_size = settings.batch_size or engine.default_batch_size
        self.busy = metrics.BusyMeter()

    def close(self) -> None:
        self.loader.close()

    def run_chunk(
        self,
        job: JobInfo,
        chunk_no: int,
        on_written: Callable[[list[ItemResult]], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> ChunkOutcome:
        """Caption the chunk's pending items; `on_written` runs after each batch is stored
        (progress, lease renewal); `should_stop` ends the chunk early (graceful stop)."""
        outcome = ChunkOutcome(job.id, chunk_no)
        items = self.store.pending_items(job.id, chunk_no)
        ready: list[Prepared] = []
        rejected: list[ItemResult] = []
        for loaded in self.loader.load(items):
            if isinstance(loaded, Rejected):
                rejected.append(self._rejected_result(loaded))
            else:
                ready.append(loaded)
                metrics.FETCH_SECONDS.observe(loaded.fetch_ms / 1000)
            metrics.BUFFER_DEPTH.set(len(ready))
            if len(ready) >= self.batch_size or len(rejected) >= self.batch_size:
                self._write(job, chunk_no, self._caption(job, ready) + rejected, outcome, on_written)
                ready, rejected = [], []
                if should_stop and should_stop():
                    return outcome
        if ready or rejected:
            self._write(job, chunk_no, self._caption(job, ready) + rejected, outcome, on_written)
        return outcome

    def _caption(self, job: JobInfo, ready: list[Prepared]) -> list[ItemResult]:
        if not ready:
            return []
        prompts = [format_prompt(job.prompt, p.item.org_caption) for p in ready]
        started = time.monotonic()
        captions = self.engine.caption([p.image for p in ready], prompts)
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
            attempts=prepared.attempts,
            fetch_ms=prepared.fetch_ms,
            infer_ms=caption.infer_ms,
            worker=self.worker,
        )
        if caption.failure is not None:
            return ItemResult(
                status="failed",
                error_class=caption.failure.error_class.value,
                error=caption.failure.message,
                **common,
            )
        return ItemResult(
            status="done",
            caption=caption.text,
            flags=quality_flags(caption.text, caption.finish_reason),
            **common,
        )

    def _rejected_result(self, rejected: Rejected) -> ItemResult:
        return ItemResult(
            key=rejected.item.key,
            status="failed",
            error_class=rejected.failure.error_class.value,
            error=rejected.failure.message,
            sha256=rejected.sha256,
            attempts=rejected.attempts,
            fetch_ms=rejected.fetch_ms,
            worker=self.worker,
        )

    def _write(self, job, chunk_no, results, outcome: ChunkOutcome, on_written) -> None:
        self.store.write_results(job.id, chunk_no, results, model_revision=self.engine.revision)
        for r in results:
            metrics.ITEMS.labels(r.status, r.error_class or "").inc()
        outcome.done += sum(r.status == "done" for r in results)
        outcome.failed += sum(r.status == "failed" for r in results)
        if on_written:
            on_written(results)
