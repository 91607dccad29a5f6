"""Which reader reads a file, by its extension: adding a format is one entry in `READERS`."""

from __future__ import annotations

from producer.readers.images import IMAGE_EXTENSIONS, read_image
from producer.readers.lines import read_jsonl, read_txt
from producer.readers.reader import Reader
from producer.readers.shards import read_tar
from producer.readers.source import FileFormat
from producer.readers.tables import read_csv, read_parquet, read_tsv

_TEXT = {".txt": read_txt, ".csv": read_csv, ".tsv": read_tsv, ".jsonl": read_jsonl}

READERS: dict[str, Reader] = {
    **{ext: Reader(fn, compressible=True) for ext, fn in _TEXT.items()},
    ".parquet": Reader(read_parquet, compressible=False),  # compression is inside parquet
    ".tar": Reader(read_tar, compressible=True),  # .tar.gz: tarfile and fsspec both infer it
    **{ext: Reader(read_image, compressible=False) for ext in sorted(IMAGE_EXTENSIONS)},
}


def reader_for(fmt: FileFormat) -> Reader | None:
    """The reader of a file of this format, or None when there is none."""
    reader = READERS.get(fmt.ext)
    if reader is None or (fmt.compression is not None and not reader.compressible):
        return None
    return reader


def supported_formats() -> str:
    return (
        ".txt, .csv, .tsv, .jsonl (also .gz, .bz2, .xz), .parquet, webdataset .tar (.tar.gz), "
        "image files (" + " ".join(sorted(IMAGE_EXTENSIONS)) + "), folders and globs"
    )
