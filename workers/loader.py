"""Load stage: input items in, `Prepared` or `Rejected` records out, as they complete.

Each item is read (http/https via the `Fetcher`, `file://`/`tar://` via `read_local`) and
prepared on the same worker thread, so decoding one image overlaps the network waits of the
others. At most `fetch_concurrency` items are taken from the input and not yet handed back,
so memory stays flat however long the input is (and however slow the consumer: a new item
starts only when a result has been taken). See docs/ARCHITECTURE.md, "The walk of one item".
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
from recap.store.forget import BLOCKED, Blocklist
from workers.fetch import Fetcher
from workers.load_result import Failed, Fetched
from workers.prepare import ImageLimits, PreparedImage, prepare_hashed
from workers.sources import read_local

log = logging.getLogger(__name__)

Loaded = Prepared | Rejected
_BLOCKED = Failure.of(ErrorClass.OPTED_OUT, BLOCKED)
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

    def load(self, items: Iterable[InputItem], blocklist: Blocklist | None = None) -> Iterator[Loaded]:
        """One result per item taken, in completion order. Items on the `blocklist` (read
        once per chunk) are refused `opted_out`: a blocked domain or URL before any request,
        a blocked image sha256 after download, before it is decoded or captioned.

        Closing the generator early abandons the items in flight (their work stops at the
        next check).
        """
        done: queue.SimpleQueue[tuple[int, Loaded]] = queue.SimpleQueue()
        cancel = threading.Event()
        in_flight: dict[int, InputItem] = {}
        source, tickets = iter(items), itertools.count()
        try:
            while True:
                while len(in_flight) < self._width:
                    item = next(source, _END)
                    if item is _END:
                        break
                    ticket = next(tickets)
                    in_flight[ticket] = item
                    self._pool.submit(self._run, ticket, item, done, cancel, blocklist or Blocklist())
                if not in_flight:
                    return
                ticket, result = done.get()
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

    def _run(
        self,
        ticket: int,
        item: InputItem,
        done: queue.SimpleQueue,
        cancel: threading.Event,
        blocklist: Blocklist,
    ) -> None:
        result: Loaded | None = None
        try:
            result = self._load_one(item, cancel, blocklist)
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

    def _load_one(self, item: InputItem, cancel: threading.Event, blocklist: Blocklist) -> Loaded:
        if cancel.is_set():  # load() was abandoned: nobody reads this answer
            return Rejected(item, Failure.of(ErrorClass.NETWORK_ERROR, "load abandoned before it started"))
        if blocklist.blocks_input(item.key, item.url, item.expected_sha256):
            return Rejected(item, _BLOCKED)
        start = time.monotonic()
        got = self._read(item, cancel)
        fetch_ms = (time.monotonic() - start) * 1000.0
        if isinstance(got, Failed):
            return Rejected(item, got.failure, fetch_ms=fetch_ms)
        sha256 = hashlib.sha256(got.data).hexdigest()
        if blocklist.blocks_image(sha256):  # the hash is not kept: it identifies the image
            return Rejected(item, _BLOCKED, fetch_ms=fetch_ms)
        prepared = self._prepare(item, got.data, sha256)
        if isinstance(prepared, Failed):
            return Rejected(item, prepared.failure, fetch_ms=fetch_ms, sha256=sha256)
        return Prepared(
            item,
            prepared.image,
            prepared.sha256,
            prepared.width,
            prepared.height,
            fetch_ms=fetch_ms,
            clip_image=prepared.clip_image,
        )

    def _read(self, item: InputItem, cancel: threading.Event) -> Fetched | Failed:
        """The item's bytes from the network or a local source."""
        url = item.url if isinstance(item.url, str) else ""
        if not item.local:
            return self._fetcher.fetch(url, cancel=cancel)  # never raises; _run catches bugs
        try:
            return read_local(url, self._max_bytes)
        except Exception as exc:
            log.warning("unexpected error reading %s", url, exc_info=exc)
            return Failed(Failure.of(ErrorClass.SOURCE_ERROR, f"unexpected {type(exc).__name__}: {exc}"))

    def _prepare(self, item: InputItem, data: bytes, sha256: str) -> PreparedImage | Failed:
        try:
            return prepare_hashed(data, sha256, self.spec, self.limits, item.expected_sha256)
        except Exception as exc:
            log.warning("unexpected error preparing %s", item.key, exc_info=exc)
            return Failed(Failure.of(ErrorClass.DECODE_ERROR, f"unexpected {type(exc).__name__}: {exc}"))
