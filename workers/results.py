"""Items' results as the store records them: captions and rejections become `ItemResult`s,
written a batch at a time with the engine's revision and provenance."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from recap.quality import quality_flags
from recap.records import Caption, ItemResult, Prepared, Rejected
from recap.states import ItemStatus
from recap.store import Store
from workers import metrics


@dataclass(slots=True)
class ChunkOutcome:
    job_id: int
    chunk_no: int
    done: int = 0
    failed: int = 0
    # Items not yet written when the chunk's task returned (still loading, or still in the
    # engine): a background finisher writes them and finishes the chunk (`workers.finisher`).
    left_to_finisher: int = 0


OnWritten = Callable[[list[ItemResult]], None]


class ResultWriter:
    def __init__(self, store: Store, engine, worker: str):
        self.store = store
        self.engine = engine
        self.worker = worker
        self._provenance: int | None = None

    def caption_result(self, prepared: Prepared, caption: Caption) -> ItemResult:
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

    def rejected_result(self, rejected: Rejected) -> ItemResult:
        return ItemResult(
            key=rejected.item.key,
            status=ItemStatus.FAILED,
            error_class=rejected.failure.error_class.value,
            error=rejected.failure.message,
            sha256=rejected.sha256,
            fetch_ms=rejected.fetch_ms,
            worker=self.worker,
        )

    def write(
        self, job_id: int, chunk_no: int, results: list[ItemResult], outcome: ChunkOutcome, on_written
    ) -> None:
        if not results:
            return
        self.store.write_results(
            job_id,
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

    def _provenance_id(self) -> int:
        """The engine's provenance row, looked up once (the engine is fixed)."""
        if self._provenance is None:
            self._provenance = self.store.provenance_id(self.engine.provenance)
        return self._provenance
