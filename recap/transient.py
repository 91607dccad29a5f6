"""The one place that decides what is transient (wait and retry) and what is not."""

from __future__ import annotations

import functools
import logging
import random
import time

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

log = logging.getLogger(__name__)


def is_transient(exc: BaseException) -> bool:
    """A lost or refused database or broker connection, a deadlock, a failover: retry.
    Anything else (a bug, a constraint violation, bad data) is not."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, (OperationalError, InterfaceError)):
        return True
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError, ConnectionError))


def backoff_delays(base: float = 0.5, cap: float = 10.0):
    """Exponential backoff with full jitter: 0.5, 1, 2, 4 … capped, each randomised."""
    delay = base
    while True:
        yield random.uniform(delay / 2, delay)
        delay = min(delay * 2, cap)


def call_with_retry(fn, budget_s: float, what: str):
    """Call `fn()`; on a transient error wait and retry until `budget_s` is spent."""
    deadline = time.monotonic() + budget_s
    for delay in backoff_delays():
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s failed (%s); retrying in %.1fs", what, type(exc).__name__, delay)
            time.sleep(delay)


def retrying(method):
    """For Store methods: retry transient errors for `self.retry_s` seconds. Every wrapped
    method is idempotent, so a retry after an ambiguous commit changes nothing twice."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if not self.retry_s:
            return method(self, *args, **kwargs)
        return call_with_retry(lambda: method(self, *args, **kwargs), self.retry_s, method.__name__)

    return wrapper
