"""Thumbnails for `recap report`: each sampled item's image read again (its shard or folder
through `read_local`, the web through the guarded `Fetcher`) and made a small JPEG data URI,
or a one-line reason where the image is gone or no longer reads."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from recap.errors import one_line
from recap.settings import Settings
from recap.store.report import SampledItem
from workers.fetch import Fetcher
from workers.load_result import Failed, Fetched
from workers.prepare import READ_FORMATS
from workers.sources import read_local

THUMB_SIDE = 256
JPEG_QUALITY = 70
MAX_THREADS = 16


@dataclass(frozen=True, slots=True)
class Thumbnail:
    """An item's image as a `data:` URI, or why there is none (`data_uri` None)."""

    key: str
    data_uri: str | None
    missing: str | None = None


class Thumbnailer:
    """Reads items' images on a small thread pool; `close()` (or `with`) ends it."""

    def __init__(self, settings: Settings, side: int = THUMB_SIDE):
        self._settings = settings
        self._side = side
        self._fetcher = Fetcher(settings)
        self._pool = ThreadPoolExecutor(min(MAX_THREADS, settings.fetch_concurrency), "recap-thumb")

    def thumbnails(
        self, items: Iterable[SampledItem], progress: Callable[[int], None] | None = None
    ) -> Iterator[Thumbnail]:
        """One thumbnail per item, in the items' order; `progress(n)` after each of them."""
        futures = [self._pool.submit(self._one, item) for item in items]
        for done, future in enumerate(futures, start=1):
            yield future.result()
            if progress is not None:
                progress(done)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._fetcher.close()

    def __enter__(self) -> Thumbnailer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _one(self, item: SampledItem) -> Thumbnail:
        got = self._read(item)
        if isinstance(got, Failed):
            return Thumbnail(item.key, None, f"{got.failure.error_class.value}: {got.failure.message}")
        try:
            return Thumbnail(item.key, self._encode(got.data))
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            return Thumbnail(item.key, None, f"unreadable image: {one_line(exc)}")

    def _read(self, item: SampledItem) -> Fetched | Failed:
        if item.local:
            return read_local(item.url, self._settings.fetch_max_bytes)
        return self._fetcher.fetch(item.url)

    def _encode(self, data: bytes) -> str:
        with Image.open(io.BytesIO(data), formats=READ_FORMATS) as im:
            if im.width * im.height > self._settings.max_pixels:  # declared size, before decoding
                raise ValueError(f"{im.width}x{im.height} is over RECAP_MAX_PIXELS")
            im.draft("RGB", (self._side, self._side))  # JPEG: decode at a fraction of the size
            small = ImageOps.exif_transpose(im).convert("RGB")
        small.thumbnail((self._side, self._side))
        out = io.BytesIO()
        small.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
        return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")
