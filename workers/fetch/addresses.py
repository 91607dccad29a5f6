"""The SSRF guard's policy: which addresses a fetch may connect to, and the resolver.

Only public unicast addresses are allowed, plus the CIDRs an operator opens with
`RECAP_FETCH_ALLOW_CIDRS`. Numeric odd spellings of a host (`2130706433`, `0x7f000001`,
`127.1`, octal parts) are read the way the OS reads them and checked as the address they
mean; IPv6 addresses that wrap an IPv4 one (mapped, 6to4, Teredo, NAT64) are checked as
that IPv4 address too. The guard resolves a name itself, within the request's deadline, and
hands back only the allowed addresses: workers/fetch/connections.py connects to one of
those and nothing else, so DNS cannot answer differently between the check and the connect.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from recap.errors import ErrorClass, Failure

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NUMERIC_HOST = re.compile(r"[0-9a-fA-FxX.]+")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class Refused(Exception):
    """Raised inside a connection to stop a request with a decided failure.

    Deliberately not an OSError: urllib3 and requests let it through unwrapped, and the
    classification of workers/fetch/checks.py gives back its failure as it is.
    """

    def __init__(self, failure: Failure):
        super().__init__(failure.message)
        self.failure = failure


def literal_address(host: str) -> IPAddress | None:
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


def why_not_public(ip: IPAddress) -> str | None:
    """Why an address is not a public unicast one, or None when it is."""
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return "an IPv4-mapped IPv6 address"
        embedded = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and why_not_public(embedded):
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

    def why_blocked(self, ip: IPAddress) -> str | None:
        """Why we may not connect to `ip`, or None: the allow-list first, then the policy."""
        if any(ip.version == net.version and ip in net for net in self._allow):
            return None
        return why_not_public(ip)

    def vet(self, host: str, port: int, timeout: float) -> list[str]:
        """The allowed addresses of `host`; raises `Refused` when none is allowed.

        Only the addresses returned here are ever connected to, so a name that resolves
        to a public and a private address is used through the public one alone.
        """
        literal = literal_address(host)
        ips = [literal] if literal is not None else self._resolve(host, port, timeout)
        allowed = [str(ip) for ip in ips if self.why_blocked(ip) is None]
        if allowed:
            return allowed
        ip = ips[0]
        spelled = "" if _is_canonical(host) else f"{host} means {ip}, and "
        raise Refused(
            Failure.of(
                ErrorClass.BLOCKED_ADDRESS,
                f"refused to connect: {spelled}{ip} is {self.why_blocked(ip)} "
                f"(not in RECAP_FETCH_ALLOW_CIDRS)",
            )
        )

    def _resolve(self, host: str, port: int, timeout: float) -> list[IPAddress]:
        # getaddrinfo cannot be interrupted; run it aside so the deadline still holds.
        future = self._resolver.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
        try:
            infos = future.result(timeout=max(timeout, 0.001))
        except FutureTimeout:
            raise Refused(
                Failure.of(ErrorClass.DNS_ERROR, f"DNS lookup of {host} took longer than {timeout:.1f} s")
            ) from None
        except (OSError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise Refused(Failure.of(ErrorClass.DNS_ERROR, f"cannot resolve {host}: {reason}")) from None
        ips: list[IPAddress] = []
        for info in infos:
            ip = ipaddress.ip_address(info[4][0].split("%")[0])
            if ip not in ips:
                ips.append(ip)
        if not ips:
            raise Refused(Failure.of(ErrorClass.DNS_ERROR, f"{host} has no address"))
        return ips
