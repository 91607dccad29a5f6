"""Load stage: input items in, `Prepared` or `Rejected` records out, as they complete.

Each item is fetched (http/https via the `Fetcher`, `file://`/`tar://` via `read_local`)
and prepared on the same worker thread, so decoding one image overlaps the network waits
of the others. At most `fetch_concurrency` items are taken from the input and not yet
handed back, so memory stays flat however long the input is (and however slow the
consumer: a new item starts only when a result has been taken).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Self

from recap.errors import ErrorClass, Failure
from recap.records import ImageSpec, InputItem, Prepared, Rejected
from recap.settings import Settings
from workers.fetch import Fetcher
from workers.prepare import ImageLimits, PreparedImage, prepare_hashed
from workers.sources import read_local

log = logging.getLogger(__name__)

Loaded = Prepared | Rejected
_END = object()


class ImageLoader:
    """Turns items into prepared images on a pool of `fetch_concurrency` threads."""

    def __init__(self, settings: Settings, spec: ImageSpec, fetcher: Fetcher | None = None):
        self.spec = spec
        self.limits = ImageLimits.from_settings(settings)
        self._max_bytes = settings.fetch_max_bytes
        self._width = settings.fetch_concurrency
        self._owns_fetcher = fetcher is None
        self._fetcher = fetcher if fetcher is not None else Fetcher(settings)
        self._pool = ThreadPoolExecutor(self._width, thread_name_prefix="recap-load")
        self._closed = False

    def load(self, items: Iterable[InputItem], *, deadline: float | None = None) -> Iterator[Loaded]:
        """One result per item taken, in completion order.

        `deadline` (a `time.monotonic()` value): when it passes, items still loading are
        yielded as `Rejected` (`timeout`, "left behind") and no further item is taken from
        `items`, so the caller still holds the untouched rest. Closing the generator early
        abandons the items in flight (their work stops at the next check).
        """
        done: queue.SimpleQueue[tuple[int, Loaded]] = queue.SimpleQueue()
        cancel = threading.Event()
        in_flight: dict[int, InputItem] = {}
        source, tickets = iter(items), itertools.count()
        try:
            while True:
                while len(in_flight) < self._width and not _past(deadline):
                    item = next(source, _END)
                    if item is _END:
                        break
                    ticket = next(tickets)
                    in_flight[ticket] = item
                    self._pool.submit(self._run, ticket, item, done, cancel)
                if not in_flight:
                    return
                got = _next_result(done, deadline)
                if got is None:  # the deadline passed with items still loading
                    cancel.set()
                    for item in in_flight.values():
                        yield _left_behind(item)
                    return
                ticket, result = got
                del in_flight[ticket]
                yield result
        finally:
            cancel.set()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._owns_fetcher:
            self._fetcher.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one item, on a pool thread

    def _run(self, ticket: int, item: InputItem, done: queue.SimpleQueue, cancel: threading.Event) -> None:
        result: Loaded | None = None
        try:
            result = self._load_one(item, cancel)
        except Exception as exc:
            log.exception("unexpected error loading %s", item.key)
            result = Rejected(
                item, Failure.of(ErrorClass.NETWORK_ERROR, f"unexpected {type(exc).__name__}: {exc}")
            )
        finally:
            # Always answer, or load() would wait for this item forever.
            if result is None:
                result = Rejected(item, Failure.of(ErrorClass.NETWORK_ERROR, "loading stopped unexpectedly"))
            done.put((ticket, result))

    def _load_one(self, item: InputItem, cancel: threading.Event) -> Loaded:
        if cancel.is_set():
            return _left_behind(item)
        start = time.monotonic()
        data, failure, attempts = self._read(item, cancel)
        fetch_ms = (time.monotonic() - start) * 1000.0
        if failure is not None:
            return Rejected(item, failure, fetch_ms=fetch_ms, attempts=attempts)
        sha256 = hashlib.sha256(data).hexdigest()
        try:
            prepared = prepare_hashed(data, sha256, self.spec, self.limits, item.expected_sha256)
        except Exception as exc:
            log.warning("unexpected error preparing %s", item.key, exc_info=exc)
            prepared = Failure.of(ErrorClass.DECODE_ERROR, f"unexpected {type(exc).__name__}: {exc}")
        if isinstance(prepared, PreparedImage):
            return Prepared(
                item,
                prepared.image,
                prepared.sha256,
                prepared.width,
                prepared.height,
                fetch_ms=fetch_ms,
                attempts=attempts,
            )
        return Rejected(item, prepared, fetch_ms=fetch_ms, attempts=attempts, sha256=sha256)

    def _read(self, item: InputItem, cancel: threading.Event) -> tuple[bytes | None, Failure | None, int]:
        """(data, failure, attempts) from the network or a local source."""
        url = item.url if isinstance(item.url, str) else ""
        if item.local:
            try:
                got = read_local(url, self._max_bytes)
            except Exception as exc:
                log.warning("unexpected error reading %s", url, exc_info=exc)
                got = Failure.of(ErrorClass.SOURCE_ERROR, f"unexpected {type(exc).__name__}: {exc}")
            return (None, got, 1) if isinstance(got, Failure) else (got, None, 1)
        outcome = self._fetcher.fetch(url, cancel=cancel)  # never raises; _run catches bugs
        return outcome.data, outcome.failure, max(outcome.attempts, 1)


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _next_result(done: queue.SimpleQueue, deadline: float | None):
    if deadline is None:
        return done.get()
    try:
        return done.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        return None


def _left_behind(item: InputItem) -> Rejected:
    return Rejected(item, Failure.of(ErrorClass.TIMEOUT, "left behind: still loading at the stage deadline"))
