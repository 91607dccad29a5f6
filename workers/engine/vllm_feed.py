"""vLLM's engine, owned by one thread: batches join the requests already running.

Every call into vLLM (adding a request, which runs its image processor, and stepping)
happens on this thread, so batches may be submitted from any thread. Between two steps a
few requests of the waiting batches are added: a new batch's first sequences enter the
engine while the last captions of the one before are still being decoded, and the engine
stays full (issue 13, "Keep it full"). A batch's future is resolved when its last request
finishes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from recap.errors import describe
from recap.records import Caption
from workers.engine.failures import is_fatal
from workers.engine.protocol import EngineFatalError, failed_caption

log = logging.getLogger(__name__)

# Requests added between two steps while others run: rendering a big batch's images (vLLM's
# processor) must not hold up the decoding of the sequences in flight for long.
ADD_PER_STEP = 16

AddRequest = Callable[[object, str, object], str]  # (image, prompt, sampling params) -> request id
Decode = Callable[[object, float], Caption]  # (vLLM's output, ms per image) -> caption


@dataclass(slots=True)
class FeedCounters:
    """What the engine thread saw: whether batches joined running ones, or found it empty."""

    batches: int = 0  # batches whose first request was added
    joined_running: int = 0  # ... while requests of earlier batches were still unfinished
    drained: int = 0  # times the engine ran out of requests (nothing queued behind them)
    steps: int = 0


@dataclass(eq=False, slots=True)
class _Batch:
    images: list
    prompts: list[str]
    params: object
    future: Future = field(default_factory=Future)
    captions: list[Caption | None] = field(default_factory=list)
    outputs: dict[int, object] = field(default_factory=dict)
    next_add: int = 0
    unfinished: int = 0
    started: float = 0.0

    def __post_init__(self) -> None:
        self.captions = [None] * len(self.images)
        self.unfinished = len(self.images)


class _Fatal(Exception):
    def __init__(self, error: EngineFatalError):
        self.error = error


class VllmFeed:
    """The thread that owns vLLM's engine: batches in, futures of their captions out."""

    def __init__(self, llm, add_request: AddRequest, decode: Decode, max_num_seqs: int):
        self.llm = llm
        self._add_request = add_request
        self._decode = decode
        self._fill = max(ADD_PER_STEP, max_num_seqs)  # added at once into an empty engine
        self.counters = FeedCounters()
        self._inbox: queue.SimpleQueue[_Batch] = queue.SimpleQueue()
        self._waiting: deque[_Batch] = deque()  # submitted, some requests not added yet
        # The request id its outputs carry: (batch, index, the id vLLM aborts it by)
        self._running: dict[str, tuple[_Batch, int, str]] = {}
        self._thread = threading.Thread(target=self._serve, name="recap-vllm", daemon=True)
        self._thread.start()

    def submit(self, images: list, prompts: list[str], params) -> Future[list[Caption]]:
        batch = _Batch(images, prompts, params)
        if not images:
            batch.future.set_result([])
        else:
            self._inbox.put(batch)
        return batch.future

    # -- the engine thread -------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            self._take(block=not (self._waiting or self._running))
            try:
                self._add_some()
                if self._running:
                    self._step()
            except _Fatal as fatal:
                self._fail_all(fatal.error)
            except BaseException as error:  # a bug here must not leave callers waiting forever
                log.exception("the vLLM feed failed")
                self._fail_all(EngineFatalError(f"vLLM feed failed: {describe(error, 300)}"))

    def _take(self, block: bool) -> None:
        if block:
            self._waiting.append(self._inbox.get())
        while True:
            try:
                self._waiting.append(self._inbox.get_nowait())
            except queue.Empty:
                return

    def _add_some(self) -> None:
        budget = ADD_PER_STEP if self._running else self._fill
        while self._waiting and budget:
            batch = self._waiting[0]
            i = batch.next_add
            batch.next_add += 1
            if batch.next_add == len(batch.images):
                self._waiting.popleft()
            if i == 0:
                self._count_start(batch)
            self._add(batch, i)
            budget -= 1

    def _count_start(self, batch: _Batch) -> None:
        batch.started = time.perf_counter()
        self.counters.batches += 1
        if self._running:
            self.counters.joined_running += 1

    def _add(self, batch: _Batch, i: int) -> None:
        """One item into vLLM (its processor runs now); a refused item fails alone."""
        try:
            request_id = self._add_request(batch.images[i], batch.prompts[i], batch.params)
        except Exception as error:
            if is_fatal(error):
                raise _Fatal(EngineFatalError(describe(error, 300))) from error
            log.warning("item %d failed alone: %s", i, describe(error, 300))
            batch.captions[i] = failed_caption(describe(error, 300))
            self._finished_one(batch)
            return
        self._running[_external_id(request_id)] = (batch, i, request_id)

    def _step(self) -> None:
        """One step of the engine; a failed step leaves it in an unknown state: fatal."""
        try:
            outputs = self.llm.llm_engine.step()
        except Exception as error:
            raise _Fatal(EngineFatalError(f"vLLM engine step failed: {describe(error, 300)}")) from error
        self.counters.steps += 1
        for output in outputs:
            if not output.finished:
                continue
            owner = self._running.pop(output.request_id, None)
            if owner is None:  # not ours: nothing else adds requests to this engine
                log.warning("vLLM finished request %s, which no batch added", output.request_id)
                continue
            batch, i, _ = owner
            batch.outputs[i] = output
            self._finished_one(batch)
        if not self._running and not self._waiting and self._inbox.empty():
            self.counters.drained += 1

    def _finished_one(self, batch: _Batch) -> None:
        batch.unfinished -= 1
        if batch.unfinished:
            return
        # The batch's time in the engine, shared by its images (as a synchronous call's).
        per_item_ms = (time.perf_counter() - batch.started) * 1000.0 / len(batch.images)
        try:
            for i, output in batch.outputs.items():
                batch.captions[i] = self._decode(output, per_item_ms)
        except Exception as error:  # decoding is ours: the batch fails, the engine is fine
            batch.future.set_exception(error)
            return
        batch.future.set_result(batch.captions)  # type: ignore[arg-type]

    def _fail_all(self, error: EngineFatalError) -> None:
        """Abort every request and fail every batch not finished: none of them is to blame."""
        if self._running:
            try:
                internal = [request_id for _, _, request_id in self._running.values()]
                self.llm.llm_engine.abort_request(internal, internal=True)
            except Exception:  # the engine is broken anyway; the error that broke it matters
                log.exception("could not abort %d vLLM requests", len(self._running))
        batches = {id(b): b for b, _, _ in self._running.values()} | {id(b): b for b in self._waiting}
        self._running.clear()
        self._waiting.clear()
        for batch in batches.values():
            if not batch.future.done():
                batch.future.set_exception(error)


def _external_id(request_id: str) -> str:
    """The id a request's outputs carry: `LLM` numbers its requests ("7") and its engine
    returns them made unique ("7-1a2b3c4d"), the id that aborting takes."""
    return request_id.split("-", 1)[0]
