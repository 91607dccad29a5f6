"""Image files already on disk or in object storage, with their .txt/.json sidecar captions."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from producer.readers.columns import ColumnOptions, Sidecars, image_item
from producer.readers.source import Source
from producer.readers.stats import ReadStats
from recap.records import InputItem

# Every raster format Pillow reads by default (AVIF since Pillow 11.2); the workers decide
# what they decode, a reader only must not pass an image by.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif"})
TXT, JSON = ".txt", ".json"
SIDECAR_EXTENSIONS = (TXT, JSON)
# Sidecars and shard .txt/.json members are small; a bigger one is not a caption.
MAX_SIDECAR_BYTES = 1 << 20


def read_image(
    src: Source, options: ColumnOptions, stats: ReadStats, batch_rows: int
) -> Iterator[list[InputItem]]:
    """One image file; key = path relative to the folder given; sidecars give the caption."""
    sidecars = Sidecars()
    for ext, path in ((TXT, src.sidecars.txt), (JSON, src.sidecars.json)):
        if path is not None:
            read_sidecar(sidecars, ext, src.fs.cat_file(path), stats)
    key = posixpath.relpath(src.path, src.root) if src.root else posixpath.basename(src.path)
    url = Path(src.path).as_uri() if src.is_local else src.location  # quoted: '#', '?', '%'
    stats.keep()
    yield [image_item(key, url, sidecars, options, key_field=None)]


def read_sidecar(sidecars: Sidecars, ext: str, data: bytes, stats: ReadStats) -> None:
    """A .txt sidecar is the caption, a .json one the fields; a bad one is counted, not fatal."""
    if ext == TXT:
        sidecars.txt = _sidecar_text(data, stats)
    else:
        sidecars.meta = _sidecar_json(data, stats)


def _sidecar_text(data: bytes, stats: ReadStats) -> str | None:
    if len(data) > MAX_SIDECAR_BYTES:
        stats.bad_sidecar()
        return None
    return data.decode("utf-8", errors="replace").strip()


def _sidecar_json(data: bytes, stats: ReadStats) -> dict[str, Any]:
    text = _sidecar_text(data, stats)
    try:
        meta = json.loads(text) if text else {}
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        stats.bad_sidecar()
        return {}
    return meta
