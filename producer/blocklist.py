"""The FILE of `recap forget` read into a `Blocklist` selection, and the blocklist applied
to items as they are registered (`submit` and `run`)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from recap.errors import RecapError
from recap.records import InputItem
from recap.store.forget import BlockKind, Blocklist, normalise_domain, url_hash

_SHA256 = re.compile(r"[0-9a-f]{64}")


def read_selection(path: Path, kind: BlockKind) -> tuple[Blocklist, list[str]]:
    """One value a line (blank lines and lines starting with # are skipped): the selection
    to remove, and the values to keep on the blocklist (URLs as their sha256 only)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecapError(f"cannot read {path}: {exc}") from None
    values = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not values:
        raise RecapError(f"{path} lists nothing to forget")
    if kind == BlockKind.URL_HASH:
        values = [url_hash(url) for url in values]
    elif kind == BlockKind.DOMAIN:
        values = [domain_of(v) for v in values]
    elif kind == BlockKind.SHA256:
        values = [_sha256(v, path) for v in values]
    return Blocklist.of(kind, values), sorted(set(values))


def domain_of(text: str) -> str:
    """`Example.COM`, `*.example.com`, `example.com.` or `https://example.com/a.jpg`:
    `example.com` (a domain also blocks its subdomains)."""
    text = text.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.split("/", 1)[0].rsplit("@", 1)[-1].split(":", 1)[0]
    domain = normalise_domain(text.removeprefix("*."))
    if not domain or " " in domain:
        raise RecapError(f"not a domain: {text!r}")
    return domain


def _sha256(text: str, path: Path) -> str:
    value = text.lower()
    if not _SHA256.fullmatch(value):
        raise RecapError(f"{path}: not a sha256 (64 hex digits): {text[:80]!r}")
    return value


class Screen:
    """Notes the keys of blocked items as the batches pass on to registration; they are
    registered like the others, then refused (`Store.refuse_blocked`) before any request."""

    def __init__(self, blocklist: Blocklist):
        self.blocklist = blocklist
        self.blocked: list[str] = []

    def batches(self, batches: Iterable[list[InputItem]]) -> Iterator[list[InputItem]]:
        for batch in batches:
            if self.blocklist:
                self.blocked += [i.key for i in batch if self.blocks(i)]
            yield batch

    def blocks(self, item: InputItem) -> bool:
        return self.blocklist.blocks_input(item.key, item.url, item.expected_sha256)
