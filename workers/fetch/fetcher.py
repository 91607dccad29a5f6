"""The `Fetcher`: one URL in, `Fetched` bytes or `Failed` out, retried when it may help.

One attempt follows redirects by hand (each hop checked like the first URL), holds a slot
of the host it is talking to (hosts.py), lives within one deadline (deadline.py) and reads
each response with response.py. Retryable failures are retried with exponential backoff
and jitter, or after the server's `Retry-After` when it is within `fetch_max_retry_after_s`
(a longer one ends the fetch at once, still retryable later), so a fetch lasts at most
(1 + fetch_retries) deadlines plus the waits between them.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from dataclasses import dataclass
from typing import Self
from urllib.parse import urljoin, urlsplit

import requests

from recap.errors import ErrorClass, Failure
from recap.settings import Settings
from workers.fetch.addresses import AddressGuard
from workers.fetch.checks import after_redirect, check_url, classify_exception, stopped, timed_out
from workers.fetch.connections import GuardedAdapter
from workers.fetch.deadline import Attempt, Watchdog
from workers.fetch.hosts import HostSlots
from workers.fetch.response import Redirect, TryLater, read_response
from workers.load_result import Failed, Fetched

_ACCEPT = "image/webp,image/jpeg,image/png,image/*;q=0.8,*/*;q=0.5"


@dataclass(slots=True)
class _Hops:
    """Where an attempt is: the URL of the current hop and the host whose slot it holds."""

    url: str
    held: str


class Fetcher:
    """Fetch image bytes over http(s) safely. Thread-safe; share one per process."""

    def __init__(self, settings: Settings):
        self._s = settings
        self._closed = threading.Event()
        # A lookup waits for a resolver thread within its own deadline: one per download in
        # flight, or a few slow (dead) domains would time out lookups of healthy hosts.
        self._guard = AddressGuard(settings.fetch_allow_cidrs, resolver_threads=settings.fetch_concurrency)
        self._watchdog = Watchdog()
        self._slots = HostSlots(settings.fetch_per_host)
        self._adapter = GuardedAdapter(
            self._guard,
            self._watchdog,
            pools=max(64, 4 * settings.fetch_concurrency),
            maxsize=settings.fetch_concurrency,
        )
        # The adapter is the connection pool, shared by all threads. Requests go to it
        # directly: a Session adds nothing we use (cookies, auth, proxies, redirects)
        # and costs CPU on every request. Nothing is read from the environment (proxies).
        self._headers = {
            "User-Agent": settings.user_agent,
            "Accept": _ACCEPT,
            # Images are compressed already; asking for gzip only invites gzip bombs.
            "Accept-Encoding": "identity",
        }
        self._verify: bool | str = True  # certificate verification is always on

    # -- public

    def fetch(self, url: str, *, cancel: threading.Event | None = None) -> Fetched | Failed:
        """Fetch `url`; never raises for a bad URL or a bad server."""
        if isinstance(url, str):
            url = url.strip()
        failure, host = check_url(url)
        if failure is not None:
            return Failed(failure, attempts=0)
        if self._closed.is_set():
            return Failed(stopped(), attempts=0)
        attempts = 0
        while True:
            if not self._slots.acquire(host, None, self._closed, cancel):
                return Failed(stopped(), attempts)
            attempts += 1
            result = self._attempt(url, host)  # releases the host slot
            if isinstance(result, Fetched):
                return Fetched(result.data, attempts)
            if not result.failure.retryable or attempts > self._s.fetch_retries:
                return Failed(result.failure, attempts)
            cap = self._s.fetch_max_retry_after_s
            if isinstance(result, TryLater) and result.retry_after_s > cap:
                return Failed(_wont_wait(result.failure, result.retry_after_s, cap), attempts)
            if self._wait(self._retry_wait(result, attempts), cancel):
                return Failed(result.failure, attempts)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._adapter.close()
        self._watchdog.stop()
        self._guard.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- retries

    def _retry_wait(self, result: Failed, attempts: int) -> float:
        """Seconds to wait before the next attempt: the server's word, else backoff."""
        if isinstance(result, TryLater):
            return result.retry_after_s
        backoff = self._s.fetch_backoff_s * 2 ** (attempts - 1)
        longest = max(self._s.fetch_max_retry_after_s, self._s.fetch_backoff_s)
        return min(backoff * random.uniform(0.5, 1.5), longest)

    def _wait(self, seconds: float, cancel: threading.Event | None) -> bool:
        """Sleep; True when closed or cancelled meanwhile."""
        if cancel is None:
            return self._closed.wait(seconds)
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if cancel.wait(min(left, 0.1)) or self._closed.is_set():
                return True
        return cancel.is_set() or self._closed.is_set()

    # -- one attempt

    def _attempt(self, url: str, host: str) -> Fetched | Failed:
        """One attempt with its own deadline, following redirects; releases the host slot."""
        hops = _Hops(url=url, held=host)
        try:
            with self._watchdog.attempt(self._s.fetch_timeout_s) as attempt:
                try:
                    return self._follow(hops, attempt)
                except Exception as exc:
                    failure = classify_exception(
                        exc, urlsplit(hops.url).hostname or host, self._s.fetch_timeout_s, attempt.expired
                    )
                    return Failed(after_redirect(failure, url) if hops.url != url else failure)
        finally:
            if hops.held:
                self._slots.release(hops.held)

    def _follow(self, hops: _Hops, attempt: Attempt) -> Fetched | Failed:
        """Request, and follow redirects by hand: each hop is checked like the first URL."""
        first, seen = hops.url, {hops.url}
        for hop in itertools.count():
            result = self._hop(hops.url, attempt)
            if not isinstance(result, Redirect):
                return result
            hops.url = urljoin(hops.url, result.location)
            failure = self._next_hop(
                hops, attempt, first, seen, past_limit=hop >= self._s.fetch_max_redirects
            )
            if failure is not None:
                return Failed(failure)
            seen.add(hops.url)
        raise AssertionError("unreachable")

    def _next_hop(
        self, hops: _Hops, attempt: Attempt, first: str, seen: set[str], past_limit: bool
    ) -> Failure | None:
        """Check a redirect target in the precedence of docs/ARCHITECTURE.md ("Error classes":
        a bad URL outranks the redirect limit), then move the host slot to its host (within
        the deadline)."""
        failure, host = check_url(hops.url)
        if failure is not None:
            return after_redirect(failure, first)
        if hops.url in seen:
            return Failure.of(ErrorClass.TOO_MANY_REDIRECTS, f"redirect loop back to {hops.url[:200]}")
        if past_limit:
            return Failure.of(
                ErrorClass.TOO_MANY_REDIRECTS,
                f"more than {self._s.fetch_max_redirects} redirects (RECAP_FETCH_MAX_REDIRECTS)",
            )
        if host == hops.held:
            return None
        # Let go of the old host first: holding one slot while waiting for another
        # could deadlock two redirects pointing at each other's hosts.
        self._slots.release(hops.held)
        hops.held = ""
        if not self._slots.acquire(host, max(attempt.remaining(), 0), self._closed, None):
            return after_redirect(timed_out(host, self._s.fetch_timeout_s), first)
        hops.held = host
        return None

    def _hop(self, url: str, attempt: Attempt) -> Fetched | Failed | Redirect:
        """One request: the body, a failure, or where a redirect points."""
        remaining = attempt.remaining()
        if remaining <= 0:
            return Failed(timed_out(urlsplit(url).hostname, self._s.fetch_timeout_s))
        timeout = (min(self._s.fetch_connect_timeout_s, remaining), remaining)
        return read_response(self._send(url, timeout), url, attempt, self._s)

    def _send(self, url: str, timeout: tuple[float, float]) -> requests.Response:
        """One GET through the pooled adapter (no redirects followed, body not read)."""
        request = requests.PreparedRequest()
        request.prepare_method("GET")
        request.prepare_url(url, None)
        request.prepare_headers(self._headers)
        request.body = None
        return self._adapter.send(request, stream=True, timeout=timeout, verify=self._verify)


def _wont_wait(failure: Failure, retry_after_s: float, cap: float) -> Failure:
    return Failure.of(
        failure.error_class,
        f"{failure.message}; asked to retry after {retry_after_s:g} s, "
        f"more than RECAP_FETCH_MAX_RETRY_AFTER_S ({cap:g} s)",
    )
