"""Fetch stage: one URL in, `Fetched` bytes or `Failed` with a classified failure out.

The classes are those of docs/ARCHITECTURE.md ("Error classes"). What the stage guarantees,
and where:

- **SSRF guard without a second lookup** (addresses.py: the policy and the resolver;
  connections.py: connecting only to a vetted address, no proxies).
- **Whole-request deadline** for connect, headers and body across redirects (deadline.py).
- **Checks and classification** of the URL, the status, `X-Robots-Tag`, `Retry-After`,
  the size and the exceptions a request ends with (checks.py).
- **Bounded bodies**, cut at `fetch_max_bytes`, an announced oversize refused unread (response.py).
- **Redirects by hand, per-host slots, retries** (fetcher.py, hosts.py).
"""

from workers.fetch.addresses import AddressGuard
from workers.fetch.checks import check_url, opt_out_directive, parse_retry_after
from workers.fetch.fetcher import Fetcher

__all__ = ["AddressGuard", "Fetcher", "check_url", "opt_out_directive", "parse_retry_after"]
