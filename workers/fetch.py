"""Fetch stage: one URL in, the image bytes or a classified `Failure` out (DESIGN.md's table).

What it guarantees, and how:

- **Whole-request deadline.** Each attempt gets `fetch_timeout_s` for connect, headers and
  body, across its redirects (counted from when it gets a slot for its host). Socket timeouts alone bound only one read, so a server that
  drip-feeds bytes could hold a request forever; a watchdog thread shuts down the socket of
  an attempt whose deadline passed, which wakes the blocked read at once.
- **SSRF guard without a second lookup.** Our urllib3 connection classes resolve the host,
  check its addresses and connect only to a checked one (`_new_conn`), so DNS cannot
  answer differently between check and connect. HTTPS still sends SNI and verifies the
  certificate against the host name (urllib3 wraps the socket with `server_hostname`).
  Numeric odd spellings (`2130706433`, `0x7f000001`, `127.1`) are read the way the OS reads
  them and checked as the address they mean. Proxies from the environment are ignored: a
  proxy would make the check meaningless.
- **Bounded bodies.** The body is streamed and cut at `fetch_max_bytes`; a Content-Length
  over the cap fails before any of the body is read.
- **Redirects by hand** (each hop checked for scheme and address), per-host slots,
  `X-Robots-Tag` opt-out decided before the body is read.
- **Retries** of retryable failures with exponential backoff and jitter, or after the
  server's `Retry-After` when it is within `fetch_max_retry_after_s` (a longer one ends the
  fetch at once, still retryable later). Each attempt has its own deadline, so a fetch
  lasts at most (1 + fetch_retries) deadlines plus the waits between them.
"""

from __future__ import annotations

import email.utils
import heapq
import http.client
import ipaddress
import itertools
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Self
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util.connection import create_connection

from recap.errors import ErrorClass, Failure
from recap.settings import Settings

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # body read size: a typical image arrives in one or two reads
_DRAIN_MAX = 64 * 1024  # read small error/redirect bodies so the connection can be reused
_ACCEPT = "image/webp,image/jpeg,image/png,image/*;q=0.8,*/*;q=0.5"
_OPT_OUT = frozenset({"noai", "noimageai", "noindex", "noimageindex", "none", "noml"})
# Directives that carry a value after a colon; their left side is not a bot name.
_VALUED = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
_BOT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NUMERIC_HOST = re.compile(r"[0-9a-fA-FxX.]+")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_OPT_OUT_TOKEN = "recap"


@dataclass(slots=True)
class FetchOutcome:
    """What one `Fetcher.fetch` call gives back: `data` or `failure`, never both."""

    data: bytes | None
    failure: Failure | None
    attempts: int
    elapsed_ms: float
    final_url: str | None

    @property
    def ok(self) -> bool:
        return self.data is not None


class _Refused(Exception):
    """Raised inside a connection to stop a request with a decided failure.

    Deliberately not an OSError: urllib3 and requests let it through unwrapped.
    """

    def __init__(self, failure: Failure):
        super().__init__(failure.message)
        self.failure = failure


# ---------------------------------------------------------------------------- addresses


def _literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a numeric host means, including the odd IPv4 spellings inet_aton accepts."""
    bare = host.strip("[]")
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        pass
    if _NUMERIC_HOST.fullmatch(bare) and any(c.isdigit() for c in bare):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(bare))
        except OSError:
            return None
    return None


def _is_canonical(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def _why_blocked(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address is not a public unicast one, or None when it is."""
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return "an IPv4-mapped IPv6 address"
        embedded = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and _why_blocked(embedded):
            return f"an IPv6 address wrapping {embedded}"
    checks = (
        (ip.is_loopback, "a loopback address"),
        (ip.is_unspecified, "the unspecified address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_private, "a private address"),
        (ip.is_reserved, "a reserved address"),
        (not ip.is_global, "not a public address"),
    )
    return next((why for hit, why in checks if hit), None)


class AddressGuard:
    """Decides which addresses we may connect to, and resolves hosts with a deadline."""

    def __init__(self, allow_cidrs: list[str], resolver_threads: int = 8):
        self._allow = [ipaddress.ip_network(c, strict=False) for c in allow_cidrs]
        self._resolver = ThreadPoolExecutor(resolver_threads, thread_name_prefix="recap-dns")

    def close(self) -> None:
        self._resolver.shutdown(wait=False, cancel_futures=True)

    def why_blocked(self, ip) -> str | None:
        if any(ip.version == net.version and ip in net for net in self._allow):
            return None
        return _why_blocked(ip)

    def vet(self, host: str, port: int, timeout: float) -> list[str]:
        """The allowed addresses of `host`; raises `_Refused` when none is allowed.

        Only the addresses returned here are ever connected to, so a name that resolves
        to a public and a private address is used through the public one alone.
        """
        literal = _literal_address(host)
        ips = [literal] if literal is not None else self._resolve(host, port, timeout)
        allowed = [str(ip) for ip in ips if self.why_blocked(ip) is None]
        if allowed:
            return allowed
        ip = ips[0]
        spelled = "" if _is_canonical(host) else f"{host} means {ip}, and "
        raise _Refused(
            Failure.of(
                ErrorClass.BLOCKED_ADDRESS,
                f"refused to connect: {spelled}{ip} is {self.why_blocked(ip)} "
                f"(not in RECAP_FETCH_ALLOW_CIDRS)",
            )
        )

    def _resolve(self, host: str, port: int, timeout: float) -> list:
        # getaddrinfo cannot be interrupted; run it aside so the deadline still holds.
        future = self._resolver.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
        try:
            infos = future.result(timeout=max(timeout, 0.001))
        except FutureTimeout:
            raise _Refused(
                Failure.of(ErrorClass.DNS_ERROR, f"DNS lookup of {host} took longer than {timeout:.1f} s")
            ) from None
        except (OSError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise _Refused(Failure.of(ErrorClass.DNS_ERROR, f"cannot resolve {host}: {reason}")) from None
        ips = []
        for info in infos:
            ip = ipaddress.ip_address(info[4][0].split("%")[0])
            if ip not in ips:
                ips.append(ip)
        if not ips:
            raise _Refused(Failure.of(ErrorClass.DNS_ERROR, f"{host} has no address"))
        return ips


# ---------------------------------------------------------------------------- deadlines


class _Attempt:
    """One attempt's deadline and the connections it is using (owned by `_Watchdog`)."""

    __slots__ = ("conns", "deadline", "expired", "finished")

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.expired = False
        self.finished = False
        self.conns: list[tuple[HTTPConnection, socket.socket | None]] = []

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


_current = threading.local()  # the _Attempt of the request running on this thread


def _shutdown(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        # The base-class method: on an SSLSocket it wakes the reader without tearing
        # down the SSL object under another thread's feet.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass


class _Watchdog:
    """Shuts down the sockets of attempts whose deadline has passed.

    A connection records which attempt uses it now (`_recap_owner`); a pooled connection
    handed to a later request changes owner, so a late expiry never touches it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Attempt]] = []
        self._seq = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="recap-fetch-watchdog", daemon=True)
        self._thread.start()

    def watch(self, attempt: _Attempt) -> None:
        with self._cond:
            if self._stopped:  # closing: whatever starts now ends at its first read
                attempt.expired = True
                return
            heapq.heappush(self._heap, (attempt.deadline, next(self._seq), attempt))
            if self._heap[0][2] is attempt:
                self._cond.notify()

    def adopt(self, attempt: _Attempt, conn: HTTPConnection, sock: socket.socket | None) -> None:
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

    def finish(self, attempt: _Attempt) -> None:
        with self._cond:
            attempt.finished = True
            for conn, spare in attempt.conns:
                if getattr(conn, "_recap_owner", None) is attempt:
                    conn._recap_owner = None
                if spare is not None:
                    spare.close()
            attempt.conns.clear()

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

    def _expire(self, attempt: _Attempt) -> None:
        attempt.expired = True
        for conn, spare in attempt.conns:
            if getattr(conn, "_recap_owner", None) is attempt:
                _shutdown(spare or conn.sock)


# ---------------------------------------------------------------------------- connections


class _GuardedConnectionMixin:
    """Resolve, check and connect to the checked address; report sockets to the watchdog."""

    _recap_guard: AddressGuard
    _recap_watchdog: _Watchdog
    _recap_owner: _Attempt | None = None

    def _new_conn(self) -> socket.socket:
        attempt: _Attempt | None = getattr(_current, "attempt", None)
        timeout = self.timeout if isinstance(self.timeout, (int, float)) else 10.0
        if attempt is not None:
            timeout = min(timeout, max(attempt.remaining(), 0.001))
        addresses = self._recap_guard.vet(self.host, self.port, timeout)
        last: OSError | None = None
        for address in addresses:
            try:
                sock = create_connection(
                    (address, self.port),
                    timeout,
                    source_address=self.source_address,
                    socket_options=self.socket_options,
                )
                break
            except TimeoutError as exc:
                raise ConnectTimeoutError(
                    self, f"connection to {self.host} timed out after {timeout:.1f} s"
                ) from exc
            except OSError as exc:
                last = exc
        else:
            raise NewConnectionError(
                self, f"cannot connect to {self.host}:{self.port}: {getattr(last, 'strerror', None) or last}"
            ) from last
        if attempt is not None:
            self._recap_watchdog.adopt(attempt, self, sock)
        return sock

    def request(self, *args, **kwargs):
        attempt = getattr(_current, "attempt", None)
        if attempt is not None and self.sock is not None:  # a reused pooled connection
            self._recap_watchdog.adopt(attempt, self, None)
        return super().request(*args, **kwargs)


class _GuardedAdapter(HTTPAdapter):
    """requests' adapter whose pools make guarded connections."""

    def __init__(self, guard: AddressGuard, watchdog: _Watchdog, pools: int, maxsize: int):
        attrs = {"_recap_guard": guard, "_recap_watchdog": watchdog}
        http_conn = type("GuardedHTTPConnection", (_GuardedConnectionMixin, HTTPConnection), attrs)
        https_conn = type("GuardedHTTPSConnection", (_GuardedConnectionMixin, HTTPSConnection), attrs)
        self._pool_classes = {
            "http": type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
            "https": type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
        }
        super().__init__(pool_connections=pools, pool_maxsize=maxsize, max_retries=0)

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pool_classes

    def proxy_manager_for(self, *args, **kwargs):
        raise _Refused(Failure.of(ErrorClass.BLOCKED_ADDRESS, "proxies are not used by recap"))


# ---------------------------------------------------------------------------- per host


class _HostSlots:
    """At most `per_host` requests in flight to one host; entries vanish when unused."""

    def __init__(self, per_host: int):
        self._per_host = per_host
        self._lock = threading.Lock()
        self._slots: dict[str, list] = {}  # host -> [semaphore, holders + waiters]

    def acquire(
        self, host: str, timeout: float | None, stop: threading.Event, cancel: threading.Event | None
    ) -> bool:
        with self._lock:
            entry = self._slots.setdefault(host, [threading.Semaphore(self._per_host), 0])
            entry[1] += 1
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 0.25 if end is None else min(0.25, end - time.monotonic())
            if wait > 0 and entry[0].acquire(timeout=wait):
                return True
            expired = end is not None and time.monotonic() >= end
            if expired or stop.is_set() or (cancel is not None and cancel.is_set()):
                self._leave(host, entry, release=False)
                return False

    def release(self, host: str) -> None:
        with self._lock:
            entry = self._slots[host]
        self._leave(host, entry, release=True)

    def _leave(self, host: str, entry: list, release: bool) -> None:
        with self._lock:
            if release:
                entry[0].release()
            entry[1] -= 1
            if entry[1] == 0:
                del self._slots[host]


# ---------------------------------------------------------------------------- checks


def check_url(url: object) -> tuple[Failure | None, str]:
    """(failure, host): `invalid_url` or `bad_scheme` before anything is sent."""
    if not isinstance(url, str) or not url.strip():
        return Failure.of(ErrorClass.INVALID_URL, "empty URL"), ""
    if _CONTROL.search(url):
        return Failure.of(ErrorClass.INVALID_URL, f"control characters in URL {url!r}"), ""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a bad port
        host = parts.hostname or ""
    except ValueError as exc:
        return Failure.of(ErrorClass.INVALID_URL, f"cannot parse URL {url!r}: {exc}"), ""
    if not parts.scheme:
        return Failure.of(ErrorClass.INVALID_URL, f"not an absolute URL: {url!r}"), ""
    if parts.scheme.lower() not in ("http", "https"):
        return Failure.of(
            ErrorClass.BAD_SCHEME, f"scheme {parts.scheme}: is not http or https ({url[:200]})"
        ), ""
    if not host or port == 0:
        return Failure.of(ErrorClass.INVALID_URL, f"no host in URL {url!r}"), ""
    return None, host


def opt_out_directive(values: list[str], token: str = _OPT_OUT_TOKEN) -> str | None:
    """The X-Robots-Tag directive that opts this image out for us, or None.

    Each header line starts unscoped; `bot: a, b` scopes the directives after it to
    `bot`. Unscoped directives and those scoped to our token count; others are ignored.
    """
    for value in values:
        scope = None
        for part in value.lower().split(","):
            part = part.strip()
            name, colon, rest = part.partition(":")
            name = name.strip()
            if colon and name not in _VALUED and _BOT_NAME.fullmatch(name):
                scope, part = name, rest.strip()
            if scope not in (None, token) or name in _VALUED:
                continue
            hit = next((word for word in part.split() if word in _OPT_OUT), None)
            if hit:
                return f"{scope}: {hit}" if scope else hit
    return None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything it wraps (requests -> urllib3 -> socket)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        linked = [getattr(e, "reason", None), e.__cause__, e.__context__, *getattr(e, "args", ())]
        todo.extend(x for x in linked if isinstance(x, BaseException))


def _os_reason(chain: list[BaseException]) -> str:
    for e in chain:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror.lower()
    return str(chain[-1])[:200] or type(chain[-1]).__name__


def classify_exception(exc: BaseException, host: str, deadline_s: float, expired: bool) -> Failure:
    """A requests/urllib3/socket exception as DESIGN.md's error class."""
    chain = list(_exception_chain(exc))
    refused = next((e for e in chain if isinstance(e, _Refused)), None)
    if refused is not None:
        return refused.failure
    if expired:
        return Failure.of(ErrorClass.TIMEOUT, f"no complete response from {host} within {deadline_s:g} s")

    def has(*types) -> bool:
        return any(isinstance(e, types) for e in chain)

    if has(
        requests.exceptions.InvalidURL,
        urllib3.exceptions.LocationParseError,
        UnicodeError,
        requests.exceptions.MissingSchema,
    ):
        return Failure.of(ErrorClass.INVALID_URL, f"invalid URL for {host}: {exc}")
    if has(requests.exceptions.InvalidSchema):
        return Failure.of(ErrorClass.BAD_SCHEME, f"unsupported scheme: {exc}")
    if has(urllib3.exceptions.NameResolutionError, socket.gaierror):
        return Failure.of(ErrorClass.DNS_ERROR, f"cannot resolve {host}: {_os_reason(chain)}")
    if has(urllib3.exceptions.SSLError, requests.exceptions.SSLError):
        return Failure.of(ErrorClass.CONNECT_ERROR, f"TLS failed with {host}: {_os_reason(chain)}")
    if has(NewConnectionError):
        return Failure.of(ErrorClass.CONNECT_ERROR, f"cannot connect to {host}: {_os_reason(chain)}")
    if has(ConnectTimeoutError, requests.exceptions.ConnectTimeout):
        return Failure.of(ErrorClass.CONNECT_ERROR, f"connecting to {host} timed out")
    if has(urllib3.exceptions.ReadTimeoutError, requests.exceptions.ReadTimeout, socket.timeout):
        return Failure.of(ErrorClass.TIMEOUT, f"{host} stopped sending before the {deadline_s:g} s deadline")
    if has(
        requests.exceptions.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException, OSError
    ):
        return Failure.of(ErrorClass.NETWORK_ERROR, f"connection to {host} broke: {_os_reason(chain)}")
    log.warning("unexpected fetch error for %s", host, exc_info=exc)
    return Failure.of(ErrorClass.NETWORK_ERROR, f"unexpected {type(exc).__name__} from {host}: {exc}")


# ---------------------------------------------------------------------------- fetcher


@dataclass(slots=True)
class _Hops:
    """Where an attempt is: the URL of the current hop and the host whose slot it holds."""

    url: str
    held: str


@dataclass(slots=True)
class _AttemptResult:
    data: bytes | None = None
    failure: Failure | None = None
    final_url: str | None = None
    retry_after: float | None = None


class Fetcher:
    """Fetch image bytes over http(s) safely. Thread-safe; share one per process."""

    def __init__(self, settings: Settings):
        self._s = settings
        self._closed = threading.Event()
        # A lookup waits for a resolver thread within its own deadline: one per download in
        # flight, or a few slow (dead) domains would time out lookups of healthy hosts.
        self._guard = AddressGuard(settings.fetch_allow_cidrs, resolver_threads=settings.fetch_concurrency)
        self._watchdog = _Watchdog()
        self._slots = _HostSlots(settings.fetch_per_host)
        self._adapter = _GuardedAdapter(
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

    def fetch(self, url: str, *, cancel: threading.Event | None = None) -> FetchOutcome:
        """Fetch `url`; never raises for a bad URL or a bad server."""
        start = time.monotonic()
        if isinstance(url, str):
            url = url.strip()
        failure, host = check_url(url)
        if failure is not None:
            return FetchOutcome(None, failure, 0, _ms_since(start), None)
        if self._closed.is_set():
            return FetchOutcome(None, _stopped_failure(), 0, _ms_since(start), None)
        attempts, result = 0, _AttemptResult()
        while True:
            if not self._slots.acquire(host, None, self._closed, cancel):
                result = _AttemptResult(failure=_stopped_failure(), final_url=url)
                break
            attempts += 1
            result = self._attempt(url, host)  # releases the host slot
            if result.data is not None or not result.failure.retryable:
                break
            if attempts > self._s.fetch_retries:
                break
            wait = self._retry_wait(result, attempts)
            if wait is None or self._wait(wait, cancel):
                break
        return FetchOutcome(result.data, result.failure, attempts, _ms_since(start), result.final_url)

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

    def _retry_wait(self, result: _AttemptResult, attempts: int) -> float | None:
        """Seconds to wait before the next attempt; None = give up now (Retry-After too long)."""
        cap = self._s.fetch_max_retry_after_s
        if result.retry_after is not None:
            if result.retry_after > cap:
                result.failure = Failure.of(
                    result.failure.error_class,
                    f"{result.failure.message}; asked to retry after {result.retry_after:g} s, "
                    f"more than RECAP_FETCH_MAX_RETRY_AFTER_S ({cap:g} s)",
                )
                return None
            return result.retry_after
        backoff = self._s.fetch_backoff_s * 2 ** (attempts - 1)
        return min(backoff * random.uniform(0.5, 1.5), max(cap, self._s.fetch_backoff_s))

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

    def _attempt(self, url: str, host: str) -> _AttemptResult:
        """One attempt with its own deadline, following redirects; releases the host slot."""
        attempt = _Attempt(time.monotonic() + self._s.fetch_timeout_s)
        self._watchdog.watch(attempt)
        _current.attempt = attempt  # seen by our connections: whose deadline they serve
        hops = _Hops(url=url, held=host)
        try:
            return self._follow(hops, attempt)
        except Exception as exc:
            failure = classify_exception(
                exc, urlsplit(hops.url).hostname or host, self._s.fetch_timeout_s, attempt.expired
            )
            if hops.url != url:
                failure = _after_redirect(failure, url)
            return _AttemptResult(failure=failure, final_url=hops.url)
        finally:
            _current.attempt = None
            self._watchdog.finish(attempt)
            if hops.held:
                self._slots.release(hops.held)

    def _follow(self, hops: _Hops, attempt: _Attempt) -> _AttemptResult:
        """Request, and follow redirects by hand: each hop is checked like the first URL."""
        first, seen = hops.url, {hops.url}
        for hop in itertools.count():
            result, location = self._hop(hops.url, attempt)
            if location is None:
                return result
            hops.url = urljoin(hops.url, location)
            failure = self._next_hop(
                hops, attempt, first, seen, past_limit=hop >= self._s.fetch_max_redirects
            )
            if failure is not None:
                return _AttemptResult(failure=failure, final_url=hops.url)
            seen.add(hops.url)
        raise AssertionError("unreachable")

    def _next_hop(
        self, hops: _Hops, attempt: _Attempt, first: str, seen: set[str], past_limit: bool
    ) -> Failure | None:
        """Check a redirect target, in DESIGN.md's order (a bad URL outranks the redirect
        limit), then move the host slot to its host (within the deadline)."""
        failure, host = check_url(hops.url)
        if failure is not None:
            return _after_redirect(failure, first)
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
            return _after_redirect(self._timeout(host), first)
        hops.held = host
        return None

    def _hop(self, url: str, attempt: _Attempt) -> tuple[_AttemptResult, str | None]:
        """One request: (result, None) or (unused, Location) for a redirect."""
        remaining = attempt.remaining()
        if remaining <= 0:
            return _AttemptResult(failure=self._timeout(urlsplit(url).hostname), final_url=url), None
        timeout = (min(self._s.fetch_connect_timeout_s, remaining), remaining)
        resp = self._send(url, timeout)
        ok = False
        try:
            status = resp.status_code
            location = resp.headers.get("Location")
            if 300 <= status < 400 and location:
                return _AttemptResult(final_url=url), _header_text(location)
            result = self._response(resp, url, attempt)
            ok = result.data is not None
            return result, None
        finally:
            if not ok:
                _discard(resp)
            resp.close()

    def _send(self, url: str, timeout: tuple[float, float]) -> requests.Response:
        """One GET through the pooled adapter (no redirects followed, body not read)."""
        request = requests.PreparedRequest()
        request.prepare_method("GET")
        request.prepare_url(url, None)
        request.prepare_headers(self._headers)
        request.body = None
        return self._adapter.send(request, stream=True, timeout=timeout, verify=self._verify)

    def _response(self, resp: requests.Response, url: str, attempt: _Attempt) -> _AttemptResult:
        status, host = resp.status_code, urlsplit(url).hostname
        if attempt.expired:  # headers cut short by the watchdog
            return _AttemptResult(failure=self._timeout(host), final_url=url)
        failure = _status_failure(status, resp.reason, host)
        if failure is not None:
            retry_after = None
            if failure.retryable:
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            return _AttemptResult(failure=failure, final_url=url, retry_after=retry_after)
        directive = opt_out_directive(resp.raw.headers.getlist("X-Robots-Tag"))
        if directive:
            return _AttemptResult(
                failure=Failure.of(ErrorClass.OPTED_OUT, f"{host} opts out with X-Robots-Tag: {directive}"),
                final_url=url,
            )
        announced = _content_length(resp)
        if announced is not None and announced > self._s.fetch_max_bytes:
            return _AttemptResult(failure=self._too_large(announced, "announced "), final_url=url)
        return self._read_body(resp, url, attempt)

    def _read_body(self, resp: requests.Response, url: str, attempt: _Attempt) -> _AttemptResult:
        limit = self._s.fetch_max_bytes
        chunks, total = [], 0
        while True:
            chunk = resp.raw.read(min(_CHUNK, limit - total + 1), decode_content=True)
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                return _AttemptResult(failure=self._too_large(total, "over "), final_url=url)
            chunks.append(chunk)
            if attempt.expired:
                break
        if attempt.expired:
            # The watchdog's shutdown reads as end-of-stream: a body (or headers) cut
            # at the deadline can look complete. Past the deadline nothing counts.
            return _AttemptResult(failure=self._timeout(urlsplit(url).hostname), final_url=url)
        return _AttemptResult(data=b"".join(chunks), final_url=url)

    # -- failures

    def _timeout(self, host: str | None) -> Failure:
        return Failure.of(
            ErrorClass.TIMEOUT, f"no complete response from {host} within {self._s.fetch_timeout_s:g} s"
        )

    def _too_large(self, size: int, how: str) -> Failure:
        return Failure.of(
            ErrorClass.TOO_LARGE,
            f"body {how}{size} bytes, over the {self._s.fetch_max_bytes} byte limit (RECAP_FETCH_MAX_BYTES)",
        )


def _status_failure(status: int, reason: str | None, host: str | None) -> Failure | None:
    if 200 <= status < 300:
        return None
    said = f"HTTP {status} {reason or ''}".strip() + f" from {host}"
    if status == 429:
        return Failure.of(ErrorClass.RATE_LIMITED, said)
    if status >= 500:
        return Failure.of(ErrorClass.HTTP_5XX, said)
    # 4xx, and any other non-2xx final status (e.g. a 3xx without Location).
    return Failure.of(ErrorClass.HTTP_4XX, said)


def _header_text(value: str) -> str:
    """http.client reads headers as latin-1; servers send UTF-8 URLs (as requests does)."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def _content_length(resp: requests.Response) -> int | None:
    value = resp.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _discard(resp: requests.Response) -> None:
    """Read a small unwanted body so its connection goes back to the pool; else drop it."""
    length = _content_length(resp)
    if (
        length is not None
        and length <= _DRAIN_MAX
        and "chunked" not in (resp.headers.get("Transfer-Encoding") or "")
    ):
        try:
            resp.raw.drain_conn()
            return
        except Exception:
            pass
    resp.raw.close()


def _after_redirect(failure: Failure, original: str) -> Failure:
    return Failure.of(failure.error_class, f"{failure.message} (after a redirect from {original[:200]})")


def _stopped_failure() -> Failure:
    return Failure.of(
        ErrorClass.NETWORK_ERROR, "fetch cancelled: the fetcher is closed or the load was abandoned"
    )


def _ms_since(start: float) -> float:
    return (time.monotonic() - start) * 1000.0
