"""Items' results as the store records them: captions and rejections become `ItemResult`s
(with CLIP scores where a scorer is on), written a batch at a time with the engine's
revision and provenance."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from recap.quality import SCORE_TRUNCATED, quality_flags
from recap.records import Caption, ItemResult, Prepared, Rejected
from recap.states import ItemStatus, JobState
from recap.store import Store
from workers import metrics
from workers.scoring import ClipScorer, ScoreRequest

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ChunkOutcome:
    job_id: int
    chunk_no: int
    done: int = 0
    failed: int = 0
    # Items not yet written when the chunk's task returned (still loading, or still in the
    # engine): a background finisher writes them and finishes the chunk (`workers.finisher`).
    left_to_finisher: int = 0
    # The job was cancelled (seen when a batch was written): the chunk stops at this batch.
    job_cancelled: bool = False


OnWritten = Callable[[list[ItemResult]], None]


def engine_seconds(results: list[ItemResult]) -> float:
    """The engine time of a batch's results: each caption carries its share of its batch's
    time (`infer_ms`), on whatever device; a rejected item took none."""
    return sum(r.infer_ms or 0.0 for r in results) / 1000.0


class ResultWriter:
    def __init__(self, store: Store, engine, worker: str, scorer: ClipScorer | None = None):
        self.store = store
        self.engine = engine
        self.worker = worker
        self.scorer = scorer
        self._provenance: int | None = None
        self._job_names: dict[int, str] = {}  # the metrics' job label

    def caption_results(self, ready: list[Prepared], captions: list[Caption]) -> list[ItemResult]:
        """A batch's results, its done items scored where a scorer is on."""
        results = [self.caption_result(p, c) for p, c in zip(ready, captions, strict=True)]
        if self.scorer is not None:
            self._score(ready, results)
        return results

    def _score(self, ready: list[Prepared], results: list[ItemResult]) -> None:
        """CLIP scores on the done items; a failed scoring leaves their scores null (the
        captions are written all the same: a broken device stops the next batch)."""
        done = [
            (p, r)
            for p, r in zip(ready, results, strict=True)
            if r.status == ItemStatus.DONE and p.clip_image is not None
        ]
        requests = [ScoreRequest(p.clip_image, r.caption, p.item.org_caption) for p, r in done]
        try:
            scores = self.scorer.score(requests)
        except Exception:
            log.exception("CLIP scoring failed for %d item(s); their scores stay null", len(requests))
            return
        for (_, result), score in zip(done, scores, strict=True):
            result.re_clip_score, result.org_clip_score = score.re_clip_score, score.org_clip_score
            if score.truncated:
                result.flags.append(SCORE_TRUNCATED)

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
        engine_s = engine_seconds(results)
        written = self.store.write_batch(
            job_id,
            chunk_no,
            results,
            model_revision=self.engine.revision,
            provenance_id=self._provenance_id(),
            engine_seconds=engine_s,
        )
        outcome.job_cancelled = written.job_state is JobState.CANCELLED
        if engine_s > 0:
            metrics.ENGINE_SECONDS.labels(self._job_name(job_id)).inc(engine_s)
        for r in results:
            metrics.ITEMS.labels(r.status.value, r.error_class or "").inc()
        outcome.done += sum(r.status == ItemStatus.DONE for r in results)
        outcome.failed += sum(r.status == ItemStatus.FAILED for r in results)
        if on_written:
            on_written(results)

    def _job_name(self, job_id: int) -> str:
        if job_id not in self._job_names:
            self._job_names[job_id] = self.store.job_by_id(job_id).name
        return self._job_names[job_id]

    def _provenance_id(self) -> int:
        """The engine's provenance row (with the scorer's model and revision), looked up once
        (both are fixed)."""
        if self._provenance is None:
            scorer = self.scorer.provenance if self.scorer is not None else {}
            self._provenance = self.store.provenance_id({**self.engine.provenance, **scorer})
        return self._provenance
