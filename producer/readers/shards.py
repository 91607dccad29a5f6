"""Webdataset tar shards: one item per sample that has an image, read header by header."""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from producer.readers.columns import ColumnOptions, Sidecars, image_item
from producer.readers.images import IMAGE_EXTENSIONS, MAX_SIDECAR_BYTES, SIDECAR_EXTENSIONS, read_sidecar
from producer.readers.reader import batched
from producer.readers.source import Source
from producer.readers.stats import ReadStats, SkipReason
from recap.records import InputItem


@dataclass(frozen=True)
class _MemberName:
    """webdataset's rule: key = path up to the first dot of the basename, in its directory;
    suffix = the rest, lower-cased ("seg.png")."""

    key: str
    suffix: str

    @classmethod
    def parse(cls, name: str) -> _MemberName | None:
        """None for a name without a suffix, or a dotfile: not a sample part."""
        directory, base = posixpath.split(name)
        stem, dot, suffix = base.partition(".")
        if not stem or not dot:
            return None
        return cls(posixpath.join(directory, stem), suffix.lower())


@dataclass
class _Sample:
    """The members of one webdataset sample seen so far."""

    key: str
    image: str | None = None  # member name of its first image
    sidecars: Sidecars = field(default_factory=Sidecars)


def read_tar(
    src: Source, options: ColumnOptions, stats: ReadStats, batch_rows: int
) -> Iterator[list[InputItem]]:
    """A webdataset shard: one item per sample (contiguous members sharing a key) that has
    an image. Only headers and the small .txt/.json members are read, never image bytes."""
    # A local uncompressed shard is read by seeking from header to header (image bytes are
    # never read); anything else streams once through (remote reads stay sequential).
    mode = "r:" if src.is_local and src.fmt.compression is None else "r|*"
    with src.open_binary(decompress=False) as f, tarfile.open(fileobj=f, mode=mode) as tf:
        yield from batched(_shard_items(tf, src.location, options, stats), batch_rows)


def _shard_items(
    tf: tarfile.TarFile, shard: str, options: ColumnOptions, stats: ReadStats
) -> Iterator[InputItem]:
    for sample in _samples(tf, stats):
        if (item := _shard_item(shard, sample, options, stats)) is not None:
            yield item


def _samples(tf: tarfile.TarFile, stats: ReadStats) -> Iterator[_Sample]:
    sample: _Sample | None = None
    for info in _tar_members(tf):
        name = _MemberName.parse(info.name.removeprefix("./")) if info.isfile() else None
        if name is None:
            continue
        if sample is None or name.key != sample.key:
            if sample is not None:
                yield sample
            sample = _Sample(name.key)
        _add_member(tf, info, name.suffix, sample, stats)
    if sample is not None:
        yield sample


def _tar_members(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while (info := tf.next()) is not None:
        yield info
        # TarFile remembers every member it has seen; a million-member shard would grow.
        tf.members.clear()


def _add_member(
    tf: tarfile.TarFile, info: tarfile.TarInfo, suffix: str, sample: _Sample, stats: ReadStats
) -> None:
    ext = "." + suffix
    if ext in IMAGE_EXTENSIONS:
        sample.image = sample.image or info.name  # a second image (e.g. a mask) is ignored
    elif ext in SIDECAR_EXTENSIONS:
        if info.size > MAX_SIDECAR_BYTES:
            stats.bad_sidecar()
            return
        member = tf.extractfile(info)
        read_sidecar(sample.sidecars, ext, member.read() if member is not None else b"", stats)


def _shard_item(shard: str, sample: _Sample, options: ColumnOptions, stats: ReadStats) -> InputItem | None:
    if sample.image is None:
        stats.skip(SkipReason.NO_IMAGE)
        return None
    # fsspec splits chained URLs on "::" and its tar filesystem drops a leading "/".
    if "::" in sample.image or sample.image.startswith("/"):
        stats.skip(SkipReason.BAD_MEMBER_NAME)
        return None
    stats.keep()
    url = f"tar://{sample.image}::{shard}"
    return image_item(sample.key, url, sample.sidecars, options, key_field="key")
