"""Input readers: URL lists, tables, webdataset shards and image folders, as batches of
`InputItem`: the first step of docs/ARCHITECTURE.md, "The walk of one item".

One interface for every format (like img2dataset's interchangeable readers): a reader is a
generator `read(source, columns, stats, batch_rows) -> Iterator[list[InputItem]]`
(`reader.py`), found by file extension in `registry.READERS`; adding a format is one entry
there. `read_items` (`batches.py`) expands the inputs (files, folders, globs; local paths or
fsspec URLs; `discovery.py`), sends each file to its reader and re-cuts what they yield into
batches of `batch_rows` items. `columns.py` holds which field is the url, caption, id and
sha256 for every format; `stats.py` counts what was read and what was left out, and why.

Everything streams: tables are read block by block (parquet row-group batches of only the
needed columns, CSV blocks, JSONL lines), tar shards by walking their headers, folders one
directory listing at a time, so memory stays flat whatever the input size.

Before a job is registered, `probe_inputs` (`probe.py`) opens every file and reads its
header or first rows, so a file that cannot be read as asked fails while nothing is written.
recap's own exports found by a folder walk or a glob are skipped and counted (`outputs.py`);
a file named on the command line is read as given. A URL holding a NUL byte is left out as
`invalid_url` (no database stores it); a NUL in a caption, key or hash is removed.

Keys: the `--id-col` value (numbers stringified) or the sha256 hex of the URL; for shard
members the json `key` (else the webdataset key), for image files the path relative to the
folder given. Duplicates are NOT removed here: the database deduplicates by (job, key), so
a key seen twice registers once (the first reading wins).

References for images already on disk or in object storage (`InputItem.url`):
  image file:    `file:///abs/dir/a.jpg` (local) or the fsspec URL (`s3://bucket/a.jpg`)
  shard member:  `tar://<member path>::<shard>` (fsspec's chained form); <shard> is the
                 absolute local path or the fsspec URL (`s3://bucket/000.tar`).
Open them with `with fsspec.open(ref) as f:` (fsspec's tar filesystem is not cached, so a
fetcher reading many members of one shard should keep one `fsspec.filesystem("tar",
fo=shard)` per shard rather than re-indexing the shard for every member).
"""

from producer.readers.batches import read_items
from producer.readers.columns import ColumnOptions, url_key
from producer.readers.discovery import CheckedInput, check_inputs, expand_inputs
from producer.readers.probe import probe_inputs
from producer.readers.registry import supported_formats
from producer.readers.source import InputError
from producer.readers.stats import ReadStats, SkipReason

__all__ = [
    "CheckedInput",
    "ColumnOptions",
    "InputError",
    "ReadStats",
    "SkipReason",
    "check_inputs",
    "expand_inputs",
    "probe_inputs",
    "read_items",
    "supported_formats",
    "url_key",
]
