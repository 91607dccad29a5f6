"""Per-host politeness: at most `fetch_per_host` requests in flight to one host."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass(slots=True)
class _Slot:
    free: threading.Semaphore
    users: int = 0  # holders and waiters: the entry goes when the last one leaves


class HostSlots:
    """At most `per_host` requests in flight to one host; entries vanish when unused."""

    def __init__(self, per_host: int):
        self._per_host = per_host
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}

    def acquire(
        self, host: str, timeout: float | None, stop: threading.Event, cancel: threading.Event | None
    ) -> bool:
        """Wait for a slot of `host`; False when `timeout` passes or `stop`/`cancel` is set."""
        with self._lock:
            slot = self._slots.setdefault(host, _Slot(threading.Semaphore(self._per_host)))
            slot.users += 1
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 0.25 if end is None else min(0.25, end - time.monotonic())
            if wait > 0 and slot.free.acquire(timeout=wait):
                return True
            expired = end is not None and time.monotonic() >= end
            if expired or stop.is_set() or (cancel is not None and cancel.is_set()):
                self._leave(host, slot, release=False)
                return False

    def release(self, host: str) -> None:
        with self._lock:
            slot = self._slots[host]
        self._leave(host, slot, release=True)

    def _leave(self, host: str, slot: _Slot, release: bool) -> None:
        with self._lock:
            if release:
                slot.free.release()
            slot.users -= 1
            if slot.users == 0:
                del self._slots[host]
