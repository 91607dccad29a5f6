"""One HTTP response read into `Fetched`, `Failed` (or `TryLater`) or a `Redirect` to follow.

The status, `X-Robots-Tag` and Content-Length are decided before any of the body is read;
the body is streamed and cut at `fetch_max_bytes`, and nothing read past the attempt's
deadline counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

import requests

from recap.errors import ErrorClass, Failure
from recap.settings import Settings
from workers.fetch.checks import (
    content_length,
    opt_out_directive,
    parse_retry_after,
    status_failure,
    timed_out,
    too_large,
)
from workers.fetch.deadline import Attempt
from workers.load_result import Failed, Fetched

_CHUNK = 1 << 20  # body read size: a typical image arrives in one or two reads
_DRAIN_MAX = 64 * 1024  # read small error/redirect bodies so the connection can be reused


@dataclass(frozen=True, slots=True)
class TryLater(Failed):
    """A retryable answer that said when to come back (Retry-After, in seconds)."""

    retry_after_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Redirect:
    location: str  # as the server sent it: relative or absolute


def read_response(
    resp: requests.Response, url: str, attempt: Attempt, settings: Settings
) -> Fetched | Failed | Redirect:
    """What `resp` (to a GET of `url`) says; the response is closed, its connection reused
    where a small unwanted body lets it be."""
    result: Fetched | Failed | Redirect | None = None
    try:
        location = resp.headers.get("Location")
        if 300 <= resp.status_code < 400 and location:
            result = Redirect(_header_text(location))
        else:
            result = _answer(resp, url, attempt, settings)
        return result
    finally:
        if not isinstance(result, Fetched):
            _discard(resp)
        resp.close()


def _answer(resp: requests.Response, url: str, attempt: Attempt, settings: Settings) -> Fetched | Failed:
    status, host = resp.status_code, urlsplit(url).hostname
    if attempt.expired:  # headers cut short by the watchdog
        return Failed(timed_out(host, settings.fetch_timeout_s))
    failure = status_failure(status, resp.reason, host)
    if failure is not None:
        retry_after = parse_retry_after(resp.headers.get("Retry-After")) if failure.retryable else None
        return Failed(failure) if retry_after is None else TryLater(failure, retry_after_s=retry_after)
    directive = opt_out_directive(resp.raw.headers.getlist("X-Robots-Tag"))
    if directive:
        return Failed(Failure.of(ErrorClass.OPTED_OUT, f"{host} opts out with X-Robots-Tag: {directive}"))
    announced = content_length(resp)
    if announced is not None and announced > settings.fetch_max_bytes:
        return Failed(too_large(announced, "announced ", settings.fetch_max_bytes))
    return _read_body(resp, host, attempt, settings)


def _read_body(
    resp: requests.Response, host: str | None, attempt: Attempt, settings: Settings
) -> Fetched | Failed:
    limit = settings.fetch_max_bytes
    chunks, total = [], 0
    while True:
        chunk = resp.raw.read(min(_CHUNK, limit - total + 1), decode_content=True)
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            return Failed(too_large(total, "over ", limit))
        chunks.append(chunk)
        if attempt.expired:
            break
    if attempt.expired:
        # The watchdog's shutdown reads as end-of-stream: a body (or headers) cut
        # at the deadline can look complete. Past the deadline nothing counts.
        return Failed(timed_out(host, settings.fetch_timeout_s))
    return Fetched(b"".join(chunks))


def _header_text(value: str) -> str:
    """http.client reads headers as latin-1; servers send UTF-8 URLs (as requests does)."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def _discard(resp: requests.Response) -> None:
    """Read a small unwanted body so its connection goes back to the pool; else drop it."""
    length = content_length(resp)
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
