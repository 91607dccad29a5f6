"""Error classes (docs/ARCHITECTURE.md, "Error classes"): failures travel as values, never as free text."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class ErrorClass(str, Enum):
    """Why an item failed. The order of definition is precedence in docs/ARCHITECTURE.md."""

    INVALID_URL = "invalid_url"
    BAD_SCHEME = "bad_scheme"
    BLOCKED_ADDRESS = "blocked_address"
    DNS_ERROR = "dns_error"
    CONNECT_ERROR = "connect_error"
    NETWORK_ERROR = "network_error"
    TIMEOUT = "timeout"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    RATE_LIMITED = "rate_limited"
    HTTP_5XX = "http_5xx"
    HTTP_4XX = "http_4xx"
    OPTED_OUT = "opted_out"
    TOO_LARGE = "too_large"
    HASH_MISMATCH = "hash_mismatch"
    NOT_IMAGE = "not_image"
    TOO_MANY_PIXELS = "too_many_pixels"
    TOO_SMALL = "too_small"
    BAD_ASPECT = "bad_aspect"
    DECODE_ERROR = "decode_error"
    INFERENCE_ERROR = "inference_error"
    # Not in the fetch table: a local file or shard member that cannot be read.
    SOURCE_ERROR = "source_error"

    @property
    def retryable(self) -> bool:
        return self in _RETRYABLE


_RETRYABLE = frozenset(
    {
        ErrorClass.DNS_ERROR,
        ErrorClass.CONNECT_ERROR,
        ErrorClass.NETWORK_ERROR,
        ErrorClass.TIMEOUT,
        ErrorClass.RATE_LIMITED,
        ErrorClass.HTTP_5XX,
        ErrorClass.INFERENCE_ERROR,
    }
)


@dataclass(frozen=True, slots=True)
class Failure:
    """A classified failure of one item, with a one-line message a person understands."""

    error_class: ErrorClass
    message: str

    @classmethod
    def of(cls, error_class: ErrorClass, message: str) -> Failure:
        return cls(error_class, one_line(message, 500))

    @property
    def retryable(self) -> bool:
        return self.error_class.retryable


def one_line(text: object, limit: int | None = None) -> str:
    """`text` on one line (runs of whitespace, newlines included, become one space)."""
    flat = " ".join(str(text).split())
    return flat if limit is None else flat[:limit]


def describe(error: BaseException, limit: int | None = None) -> str:
    """An exception as one line: its type and message (the type alone when it has none)."""
    return one_line(f"{type(error).__name__}: {error}" if str(error).strip() else type(error).__name__, limit)


class RecapError(Exception):
    """A problem the user can fix (bad input, bad setting): one-line reason, exit code 2."""


class ServiceUnavailable(Exception):
    """The database or the broker cannot be reached: one-line reason, exit code 1."""


class FleetConfigError(RecapError):
    """A fleet command was run without a PostgreSQL database."""
