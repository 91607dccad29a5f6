"""The fetch stage's checks and error classification (docs/ARCHITECTURE.md, "Error classes").

Everything here decides a class from what is known, and sends nothing: the URL before any
request (`invalid_url`, `bad_scheme`), the HTTP status, the `X-Robots-Tag` opt-out, the
size, `Retry-After`, and the exceptions a request can end with.
"""

from __future__ import annotations

import email.utils
import http.client
import logging
import re
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import NamedTuple
from urllib.parse import urlsplit

import requests
import urllib3
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from recap.clock import as_utc
from recap.errors import ErrorClass, Failure, one_line
from workers.fetch.addresses import Refused

log = logging.getLogger(__name__)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_OPT_OUT = frozenset({"noai", "noimageai", "noindex", "noimageindex", "none", "noml"})
_OPT_OUT_TOKEN = "recap"
# Directives that carry a value after a colon; their left side is not a bot name.
_VALUED = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
_BOT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")


# ---------------------------------------------------------------------------- before sending


class UrlCheck(NamedTuple):
    """What `check_url` decided: a failure, or the host to fetch from."""

    failure: Failure | None
    host: str


def check_url(url: object) -> UrlCheck:
    """`invalid_url` or `bad_scheme` before anything is sent, else the host."""
    if not isinstance(url, str) or not url.strip():
        return UrlCheck(Failure.of(ErrorClass.INVALID_URL, "empty URL"), "")
    if _CONTROL.search(url):
        return UrlCheck(Failure.of(ErrorClass.INVALID_URL, f"control characters in URL {url!r}"), "")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a bad port
        host = parts.hostname or ""
    except ValueError as exc:
        return UrlCheck(Failure.of(ErrorClass.INVALID_URL, f"cannot parse URL {url!r}: {exc}"), "")
    if not parts.scheme:
        return UrlCheck(Failure.of(ErrorClass.INVALID_URL, f"not an absolute URL: {url!r}"), "")
    if parts.scheme.lower() not in ("http", "https"):
        return UrlCheck(
            Failure.of(ErrorClass.BAD_SCHEME, f"scheme {parts.scheme}: is not http or https ({url[:200]})"),
            "",
        )
    if not host or port == 0:
        return UrlCheck(Failure.of(ErrorClass.INVALID_URL, f"no host in URL {url!r}"), "")
    return UrlCheck(None, host)


# ---------------------------------------------------------------------------- the response


def status_failure(status: int, reason: str | None, host: str | None) -> Failure | None:
    """The class of a final (not redirected) HTTP status; None for a 2xx."""
    if 200 <= status < 300:
        return None
    said = f"HTTP {status} {reason or ''}".strip() + f" from {host}"
    if status == 429:
        return Failure.of(ErrorClass.RATE_LIMITED, said)
    if status >= 500:
        return Failure.of(ErrorClass.HTTP_5XX, said)
    # 4xx, and any other non-2xx final status (e.g. a 3xx without Location).
    return Failure.of(ErrorClass.HTTP_4XX, said)


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
    return max(0.0, (as_utc(when) - datetime.now(UTC)).total_seconds())


def content_length(resp: requests.Response) -> int | None:
    value = resp.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def too_large(size: int, how: str, max_bytes: int) -> Failure:
    return Failure.of(
        ErrorClass.TOO_LARGE,
        f"body {how}{size} bytes, over the {max_bytes} byte limit (RECAP_FETCH_MAX_BYTES)",
    )


def timed_out(host: str | None, deadline_s: float) -> Failure:
    return Failure.of(ErrorClass.TIMEOUT, f"no complete response from {host} within {deadline_s:g} s")


def after_redirect(failure: Failure, original: str) -> Failure:
    return Failure.of(failure.error_class, f"{failure.message} (after a redirect from {original[:200]})")


def stopped() -> Failure:
    return Failure.of(
        ErrorClass.NETWORK_ERROR, "fetch cancelled: the fetcher is closed or the load was abandoned"
    )


# ---------------------------------------------------------------------------- exceptions


def classify_exception(exc: BaseException, host: str, deadline_s: float, expired: bool) -> Failure:
    """A requests/urllib3/socket exception as its error class.

    A URL reaches a request only after `check_url`, through our guarded connections
    (which resolve names themselves and raise `Refused` for DNS and address failures), so
    requests' schema errors and urllib3's own name-resolution error cannot occur here.
    """
    chain = list(_exception_chain(exc))
    refused = next((e for e in chain if isinstance(e, Refused)), None)
    if refused is not None:
        return refused.failure
    if expired:
        return timed_out(host, deadline_s)

    def has(*types) -> bool:
        return any(isinstance(e, types) for e in chain)

    if has(requests.exceptions.InvalidURL, urllib3.exceptions.LocationParseError, UnicodeError):
        return Failure.of(ErrorClass.INVALID_URL, f"invalid URL for {host}: {exc}")
    if has(socket.gaierror):  # getaddrinfo of a vetted address (IPv6 where the host has none)
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
    return one_line(chain[-1], 200) or type(chain[-1]).__name__
