"""A job's items as record batches in the export schema, streamed from the store."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import datetime

import pyarrow as pa

from producer.export.schema import EXPORT_SCHEMA
from recap.errors import RecapError
from recap.quality import word_count
from recap.states import ItemStatus
from recap.store import ItemColumns, JobInfo, Store

STATUS_CHOICES = {
    "done": [ItemStatus.DONE],
    "failed": [ItemStatus.FAILED],
    "all": list(ItemStatus),
}


def statuses(status: str) -> list[ItemStatus]:
    if status not in STATUS_CHOICES:
        raise RecapError(f"unknown --status {status!r}: use done, failed or all")
    return STATUS_CHOICES[status]


def export_batches(
    store: Store,
    job: JobInfo,
    wanted: list[ItemStatus],
    exclude_flags: Iterable[str],
    since: datetime | None,
) -> Iterator[pa.RecordBatch]:
    exclude = set(exclude_flags)
    static = {
        "model": job.model,
        "prompt": job.prompt,
        "generation": json.dumps(job.generation.to_json(), sort_keys=True),
        "job": job.name,
    }
    provenance = _ProvenanceLookup(store)
    for columns in store.iter_items(job, wanted, since=since):
        if exclude:
            columns = _without_flags(columns, exclude)
        if len(columns):
            yield _record_batch(columns, provenance.json(columns.provenance_id), static)


class _ProvenanceLookup:
    """Provenance ids to their JSON text; a job names a handful, each read once."""

    def __init__(self, store: Store):
        self.store = store
        self.known: dict[int | None, str | None] = {None: None}

    def json(self, ids: list) -> list:
        missing = set(ids) - self.known.keys()
        if missing:
            found = self.store.provenances(missing)
            self.known.update(
                {i: json.dumps(found[i], sort_keys=True) if i in found else None for i in missing}
            )
        return [self.known[i] for i in ids]


def _without_flags(columns: ItemColumns, exclude: set[str]) -> ItemColumns:
    return columns.take([i for i, flags in enumerate(columns.flags) if not exclude.intersection(flags or ())])


def _record_batch(columns: ItemColumns, provenance: list, static: dict[str, str]) -> pa.RecordBatch:
    """Column by column: no per-row dict on a path that moves a billion rows."""
    data = {
        "key": columns.key,
        "url": columns.url,
        "re_caption": columns.caption,
        "org_caption": columns.org_caption,
        "sha256": columns.sha256,
        "re_length": _word_counts(columns.caption),
        "org_length": _word_counts(columns.org_caption),
        "re_clip_score": columns.re_clip_score,
        "org_clip_score": columns.org_clip_score,
        "status": columns.status,
        "error_class": columns.error_class,
        "error": columns.error,
        "width": columns.width,
        "height": columns.height,
        "model_revision": columns.model_revision,
        "provenance": provenance,
        "flags": [flags or [] for flags in columns.flags],
        "updated_at": columns.updated_at,
        **{name: [value] * len(columns) for name, value in static.items()},
    }
    arrays = [pa.array(data[field.name], type=field.type) for field in EXPORT_SCHEMA]
    return pa.RecordBatch.from_arrays(arrays, schema=EXPORT_SCHEMA)


def _word_counts(texts: list) -> list:
    return [None if text is None else word_count(text) for text in texts]
