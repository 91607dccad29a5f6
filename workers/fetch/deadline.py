"""Whole-request deadlines: a watchdog thread cuts the sockets of attempts that ran out of time.

Socket timeouts alone bound only one read, so a server that drip-feeds bytes could hold a
request forever. Each attempt has a deadline for connect, headers and body across its
redirects; when it passes, the watchdog shuts down the attempt's sockets, which wakes the
blocked read at once.
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from urllib3.connection import HTTPConnection

_current = threading.local()  # the Attempt of the request running on this thread


class Attempt:
    """One attempt's deadline and the connections it is using (owned by `Watchdog`)."""

    __slots__ = ("conns", "deadline", "expired", "finished")

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.expired = False
        self.finished = False
        self.conns: list[tuple[HTTPConnection, socket.socket | None]] = []

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


def current_attempt() -> Attempt | None:
    """The attempt the request on this thread serves (read by the guarded connections)."""
    return getattr(_current, "attempt", None)


def _shutdown(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        # The base-class method: on an SSLSocket it wakes the reader without tearing
        # down the SSL object under another thread's feet.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass


class Watchdog:
    """Shuts down the sockets of attempts whose deadline has passed.

    A connection records which attempt uses it now (`_recap_owner`); a pooled connection
    handed to a later request changes owner, so a late expiry never touches it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Attempt]] = []
        self._seq = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="recap-fetch-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def attempt(self, timeout_s: float) -> Iterator[Attempt]:
        """Watch a new attempt, the current one of this thread until the block ends."""
        attempt = Attempt(time.monotonic() + timeout_s)
        self._watch(attempt)
        _current.attempt = attempt
        try:
            yield attempt
        finally:
            _current.attempt = None
            self._finish(attempt)

    def adopt(self, attempt: Attempt, conn: HTTPConnection, sock: socket.socket | None) -> None:
        """`conn` now works for `attempt`. `sock`: a new connection's raw socket.

        We keep a duplicate of a new socket: the TLS handshake detaches the original
        (`conn.sock` is set only once it is done), and shutting down any descriptor of a
        socket ends the connection for all of them, so a stalled handshake is cut too.
        """
        spare = sock.dup() if sock is not None else None
        with self._cond:
            conn._recap_owner = attempt
            attempt.conns.append((conn, spare))
            if attempt.expired:  # the deadline passed while we were connecting
                _shutdown(spare or conn.sock)

    def stop(self) -> None:
        """Stop watching, and cut every request still in flight: nothing outlives close()."""
        with self._cond:
            self._stopped = True
            for _, _, attempt in self._heap:
                if not attempt.finished:
                    self._expire(attempt)
            self._heap.clear()
            self._cond.notify()
        self._thread.join(timeout=2)

    def _watch(self, attempt: Attempt) -> None:
        with self._cond:
            if self._stopped:  # closing: whatever starts now ends at its first read
                attempt.expired = True
                return
            heapq.heappush(self._heap, (attempt.deadline, next(self._seq), attempt))
            if self._heap[0][2] is attempt:
                self._cond.notify()

    def _finish(self, attempt: Attempt) -> None:
        with self._cond:
            attempt.finished = True
            for conn, spare in attempt.conns:
                if getattr(conn, "_recap_owner", None) is attempt:
                    conn._recap_owner = None
                if spare is not None:
                    spare.close()
            attempt.conns.clear()

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                while self._heap and self._heap[0][2].finished:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                self._expire(heapq.heappop(self._heap)[2])

    def _expire(self, attempt: Attempt) -> None:
        attempt.expired = True
        for conn, spare in attempt.conns:
            if getattr(conn, "_recap_owner", None) is attempt:
                _shutdown(spare or conn.sock)
