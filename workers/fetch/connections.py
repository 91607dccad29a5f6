"""The SSRF guard at connection time: urllib3 connections that connect only to vetted addresses.

`_new_conn` asks the `AddressGuard` for the allowed addresses of the host (resolving it
once, within the attempt's deadline) and connects to one of them; there is no second lookup
for DNS to answer differently. HTTPS still sends SNI and verifies the certificate against
the host name (urllib3 wraps the socket with `server_hostname`). Each socket is reported to
the `Watchdog`, so the attempt's deadline can cut it. Proxies are never used: a proxy would
make the address check meaningless.
"""

from __future__ import annotations

import socket

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util.connection import create_connection

from recap.errors import ErrorClass, Failure
from workers.fetch.addresses import AddressGuard, Refused
from workers.fetch.deadline import Attempt, Watchdog, current_attempt


class _GuardedConnectionMixin:
    """Resolve, check and connect to the checked address; report sockets to the watchdog."""

    _recap_guard: AddressGuard
    _recap_watchdog: Watchdog
    _recap_owner: Attempt | None = None

    def _new_conn(self) -> socket.socket:
        attempt = current_attempt()
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
        attempt = current_attempt()
        if attempt is not None and self.sock is not None:  # a reused pooled connection
            self._recap_watchdog.adopt(attempt, self, None)
        return super().request(*args, **kwargs)


class GuardedAdapter(HTTPAdapter):
    """requests' adapter whose pools make guarded connections."""

    def __init__(self, guard: AddressGuard, watchdog: Watchdog, pools: int, maxsize: int):
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
        raise Refused(Failure.of(ErrorClass.BLOCKED_ADDRESS, "proxies are not used by recap"))
