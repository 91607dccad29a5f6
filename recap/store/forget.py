"""Removal on request (`recap forget`): the blocklist, and removed items scrubbed down to
what refuses them again.

A removed item keeps its row: its key (so registering the same input again finds it and
registers nothing), status `failed`, error class `opted_out` and the error "removed on
request"; its URL becomes '' (the column is NOT NULL) and every other piece of data about
the image (caption, original caption, hashes, size, flags, scores, provenance) is nulled.
The blocklist keeps domains, image sha256s, the sha256 of removed URLs (never the URL) and
removed keys, so `submit`, `run` and the workers refuse them in later jobs.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from urllib.parse import urlsplit

from sqlalchemy import null, select, update
from sqlalchemy.engine import Connection

from recap.errors import ErrorClass
from recap.schema import BlocklistEntry
from recap.states import ItemStatus
from recap.store.core import StoreCore, chunked, items_t, now_sql
from recap.store.jobs import JobInfo

blocklist_t = BlocklistEntry.__table__

REMOVED = "removed on request"  # the error of an item `recap forget` removed
BLOCKED = "blocked on request"  # the error of an item refused because it is on the blocklist


class BlockKind(str, Enum):
    DOMAIN = "domain"
    SHA256 = "sha256"
    URL_HASH = "url_hash"  # the sha256 of the URL's text: the URL itself is not kept
    KEY = "key"


def url_hash(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()


def host_of(url: str) -> str | None:
    """The URL's host, lower case, without a trailing dot, IDNA-encoded; None when it has none."""
    try:
        host = (urlsplit(url).hostname or "").rstrip(".")
    except ValueError:
        return None
    return normalise_domain(host) or None


def normalise_domain(host: str) -> str:
    """Lower case, no trailing dot, non-ASCII names as IDNA (xn--...), as hosts are compared."""
    host = host.strip().rstrip(".").lower()
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            pass
    return host


@dataclass(frozen=True, slots=True)
class Blocklist:
    """Values by kind. A domain also blocks its subdomains."""

    domains: frozenset[str] = field(default_factory=frozenset)
    sha256s: frozenset[str] = field(default_factory=frozenset)
    url_hashes: frozenset[str] = field(default_factory=frozenset)
    keys: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def of(cls, kind: BlockKind, values: Iterable[str]) -> Blocklist:
        return cls(**{_FIELDS[kind]: frozenset(values)})

    def __bool__(self) -> bool:
        return bool(self.domains or self.sha256s or self.url_hashes or self.keys)

    def blocks_domain(self, url: str) -> bool:
        host = host_of(url) if self.domains else None
        if host is None:
            return False
        parts = host.split(".")
        return any(".".join(parts[i:]) in self.domains for i in range(len(parts)))

    def blocks_input(self, key: str, url: str, expected_sha256: str | None) -> bool:
        """Known before any request: the key, the URL's domain or hash, the input's hash."""
        return (
            key in self.keys
            or (expected_sha256 is not None and expected_sha256.lower() in self.sha256s)
            or self.blocks_domain(url)
            or (bool(self.url_hashes) and url_hash(url) in self.url_hashes)
        )

    def blocks_image(self, sha256: str | None) -> bool:
        return sha256 is not None and sha256 in self.sha256s


_FIELDS = {
    BlockKind.DOMAIN: "domains",
    BlockKind.SHA256: "sha256s",
    BlockKind.URL_HASH: "url_hashes",
    BlockKind.KEY: "keys",
}


@dataclass(frozen=True, slots=True)
class Forgotten:
    """How many items `forget` removed from one job."""

    job: str
    items: int


@dataclass(frozen=True, slots=True)
class _Match:
    chunk_no: int
    key: str
    sha256: str | None


class Forget(StoreCore):
    def block(self, kind: BlockKind, values: Iterable[str], reason: str) -> None:
        """Add entries to the blocklist (those already there keep their reason and time)."""
        rows = [{"kind": kind.value, "value": v, "reason": reason} for v in sorted(set(values))]
        for part in chunked(rows, 1000):
            with self.writer.begin() as conn:
                stmt = self._insert(blocklist_t).on_conflict_do_nothing(index_elements=["kind", "value"])
                conn.execute(stmt, part)

    def blocklist(self) -> Blocklist:
        """The whole blocklist: read once per chunk (workers) or per registration."""
        values: dict[str, set[str]] = defaultdict(set)
        with self.engine.connect() as conn:
            for kind, value in conn.execute(select(blocklist_t.c.kind, blocklist_t.c.value)):
                values[_FIELDS[BlockKind(kind)]].add(value)
        return Blocklist(**{name: frozenset(found) for name, found in values.items()})

    def forget(self, selection: Blocklist, jobs: list[JobInfo]) -> list[Forgotten]:
        """Remove the items `selection` matches from these jobs; the removed images' sha256s
        join the blocklist, so the same image under another URL is refused too."""
        removed = []
        for job in jobs:
            matches = self._matching(job, selection)
            image_hashes = {m.sha256 for m in matches if m.sha256}
            self.block(BlockKind.SHA256, image_hashes, f"{REMOVED} (job {job.name})")
            removed.append(Forgotten(job.name, self._remove(job.id, matches, REMOVED, only_pending=False)))
        return removed

    def refuse_blocked(self, job: JobInfo, keys: list[str]) -> int:
        """Pending items of `job` found on the blocklist at registration: failed
        `opted_out` "blocked on request", scrubbed like removed ones, never fetched."""
        with self.engine.connect() as conn:
            found = []
            for part in chunked(keys):
                found += conn.execute(
                    select(items_t.c.chunk_no, items_t.c.key).where(
                        items_t.c.job_id == job.id,
                        items_t.c.key.in_(part),
                        items_t.c.status == ItemStatus.PENDING,
                    )
                ).all()
        return self._remove(
            job.id, [_Match(r.chunk_no, r.key, None) for r in found], BLOCKED, only_pending=True
        )

    def _matching(self, job: JobInfo, selection: Blocklist) -> list[_Match]:
        """The job's items the selection matches, read over a server-side cursor (a scan:
        there is no index on URLs or hashes; keys alone could use the primary key)."""
        columns = (
            items_t.c.chunk_no,
            items_t.c.key,
            items_t.c.url,
            items_t.c.sha256,
            items_t.c.expected_sha256,
        )
        query = select(*columns).where(items_t.c.job_id == job.id, items_t.c.url != "")
        found = []
        with self.engine.connect() as conn:
            for row in conn.execution_options(stream_results=True, yield_per=10_000).execute(query):
                if selection.blocks_input(row.key, row.url, row.expected_sha256) or selection.blocks_image(
                    row.sha256
                ):
                    found.append(_Match(row.chunk_no, row.key, row.sha256))
        return found

    def _remove(self, job_id: int, matches: list[_Match], error: str, only_pending: bool) -> int:
        by_chunk: dict[int, list[str]] = defaultdict(list)
        for m in matches:
            by_chunk[m.chunk_no].append(m.key)
        total = 0
        for chunk_no, keys in sorted(by_chunk.items()):
            # One short transaction per chunk, chunk row locked first as everywhere.
            with self.writer.begin() as conn:
                total += self._remove_in_chunk(conn, job_id, chunk_no, keys, error, only_pending)
        return total

    def _remove_in_chunk(
        self, conn: Connection, job_id: int, chunk_no: int, keys: list[str], error: str, only_pending: bool
    ) -> int:
        chunk = self._lock_chunk(conn, job_id, chunk_no)
        if chunk is None:
            return 0
        done, failed, cancelled = chunk["done_count"], chunk["failed_count"], chunk["cancelled_count"]
        errors = Counter(chunk["error_counts"] or {})
        removed = 0
        for part in chunked(keys):
            where = [items_t.c.job_id == job_id, items_t.c.key.in_(part)]
            if only_pending:
                where.append(items_t.c.status == ItemStatus.PENDING)
            before = conn.execute(
                select(items_t.c.key, items_t.c.status, items_t.c.error_class).where(*where).with_for_update()
            ).all()
            for row in before:
                if row.status == ItemStatus.DONE:
                    done -= 1
                elif row.status == ItemStatus.CANCELLED:
                    cancelled -= 1
                elif row.status == ItemStatus.FAILED:
                    failed -= 1
                    errors[row.error_class] -= 1
            conn.execute(update(items_t).where(*where).values(**_scrubbed(conn, error)))
            failed += len(before)
            errors[ErrorClass.OPTED_OUT.value] += len(before)
            removed += len(before)
        self._set_chunk(
            conn,
            job_id,
            chunk_no,
            done_count=done,
            failed_count=failed,
            cancelled_count=cancelled,
            error_counts={k: v for k, v in errors.items() if v > 0} or None,
        )
        return removed


def _scrubbed(conn: Connection, error: str) -> dict:
    """An item's row reduced to its key and why it is gone."""
    nulls = (
        *("org_caption", "expected_sha256", "caption", "flags", "sha256", "width", "height"),
        *("model_revision", "provenance_id", "fetch_ms", "infer_ms", "re_clip_score", "org_clip_score"),
        "worker",
    )
    return {
        **dict.fromkeys(nulls, null()),  # SQL NULL, not JSON 'null', in the JSON columns too
        "url": "",
        "status": ItemStatus.FAILED,
        "error_class": ErrorClass.OPTED_OUT.value,
        "error": error,
        "updated_at": now_sql(conn),
    }
