"""Already-downloaded images: `file:///abs/path.jpg` and webdataset shard members.

Shard members use fsspec's chained form, `tar://member.jpg::/abs/shard.tar` (also
`::file:///abs/shard.tar`, or `::s3://bucket/shard.tar` and any other fsspec URL when its
filesystem is installed). A shard is indexed once (member -> offset, size) and the index
kept in a small LRU, so reading 10k members of one shard does not re-read its headers
each time. Members of a plain local tar are read with one seek and one read, without
locks; compressed or remote shards go through fsspec's tar filesystem, one read at a time.
"""

from __future__ import annotations

import os
import tarfile
import threading
from collections import OrderedDict
from urllib.parse import unquote, urlsplit

from recap.errors import ErrorClass, Failure
from workers.load_result import Failed, Fetched

SHARD_CACHE_SIZE = 8


def read_local(url: str, max_bytes: int) -> Fetched | Failed:
    """The bytes of a local image reference, or `Failed` with `source_error` or `too_large`."""
    try:
        return Fetched(_read(url, max_bytes))
    except _SourceError as exc:
        return Failed(exc.failure)
    except (OSError, tarfile.TarError, ValueError, EOFError) as exc:
        return Failed(_error(f"cannot read {url}: {_reason(exc)}"))


def _read(url: str, max_bytes: int) -> bytes:
    if url.startswith("file://"):
        return _read_file(_file_path(url), max_bytes)
    if url.startswith("tar://"):
        member, _, target = url[len("tar://") :].partition("::")
        if not member or not target:
            raise _SourceError(_error(f"expected tar://MEMBER::SHARD, got {url!r}"))
        return _SHARDS.get(target).read(_member_name(member), max_bytes)
    return _read_fsspec(url, max_bytes)  # an image folder given as an fsspec URL


class _SourceError(Exception):
    """A decided failure, raised from deep in a read and turned into `Failed` by `read_local`."""

    def __init__(self, failure: Failure):
        super().__init__(failure.message)
        self.failure = failure


def _error(message: str) -> Failure:
    return Failure.of(ErrorClass.SOURCE_ERROR, message)


def _too_large(size: int, max_bytes: int, what: str) -> _SourceError:
    return _SourceError(
        Failure.of(
            ErrorClass.TOO_LARGE,
            f"{what} is {size} bytes, over the {max_bytes} byte limit (RECAP_FETCH_MAX_BYTES)",
        )
    )


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _read_fsspec(url: str, max_bytes: int) -> bytes:
    import fsspec  # only image folders and shards given as fsspec URLs need it

    with fsspec.open(url, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _too_large(len(data), max_bytes, url)
    return data


def _file_path(url: str) -> str:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise _SourceError(_error(f"file URL names another host: {url!r}"))
    return unquote(parts.path)


def _member_name(member: str) -> str:
    return member.removeprefix("./")


def _read_file(path: str, max_bytes: int) -> bytes:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise _too_large(size, max_bytes, path)
        # Read one byte past the limit: a file that grew since fstat is still caught.
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _too_large(len(data), max_bytes, path)
    return data


# ---------------------------------------------------------------------------- shards


class _LocalShard:
    """An uncompressed local tar: an index of regular members, read by offset."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._index: dict[str, tuple[int, int]] | None = None
        self._stamp: tuple[int, int] | None = None

    def read(self, member: str, max_bytes: int) -> bytes:
        index = self._ensure_index()
        where = index.get(member)
        if where is None:
            raise _SourceError(_error(f"no member {member!r} in {self.path}"))
        offset, size = where
        if size > max_bytes:
            raise _too_large(size, max_bytes, f"{member} in {self.path}")
        with open(self.path, "rb") as f:  # own file object per read: no shared seek position
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise _SourceError(_error(f"{member} in {self.path} is cut short"))
        return data

    def _ensure_index(self) -> dict[str, tuple[int, int]]:
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if self._index is None or self._stamp != stamp:  # a rewritten shard is re-read
                self._index, self._stamp = _index_tar(self.path), stamp
            return self._index


def _index_tar(path: str) -> dict[str, tuple[int, int]]:
    index = {}
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if info.isreg() and not info.issparse():
                index[_member_name(info.name)] = (info.offset_data, info.size)
    return index


class _FsspecShard:
    """Any shard fsspec can open (compressed, remote): one read at a time."""

    def __init__(self, target: str):
        self.target = target
        self._lock = threading.Lock()
        self._fs = None

    def read(self, member: str, max_bytes: int) -> bytes:
        with self._lock:
            fs = self._filesystem()
            try:
                info = fs.info(member)
            except FileNotFoundError:
                raise _SourceError(_error(f"no member {member!r} in {self.target}")) from None
            if info.get("type") != "file":
                raise _SourceError(_error(f"{member!r} in {self.target} is not a file"))
            if info.get("size", 0) > max_bytes:
                raise _too_large(info["size"], max_bytes, f"{member} in {self.target}")
            with fs.open(member, "rb") as f:
                return f.read()

    def _filesystem(self):
        if self._fs is None:
            import fsspec  # only compressed or remote shards need it

            # Our own LRU holds the instance; fsspec's cache would keep evicted ones alive.
            self._fs = fsspec.filesystem("tar", fo=self.target, skip_instance_cache=True)
        return self._fs


def _local_path(target: str) -> str | None:
    if target.startswith("file://"):
        return _file_path(target)
    if "://" not in target and "::" not in target:
        return target
    return None


def _open_shard(target: str) -> _LocalShard | _FsspecShard:
    path = _local_path(target)
    if path is None:
        return _FsspecShard(target)
    if not os.path.isfile(path):
        raise _SourceError(_error(f"no shard at {path}"))
    try:
        with tarfile.open(path, mode="r:"):
            pass
    except tarfile.ReadError:  # compressed: no offsets to seek to
        return _FsspecShard(path)
    return _LocalShard(path)


class _ShardCache:
    """A small LRU of opened shards, keyed by the shard reference."""

    def __init__(self, size: int):
        self._size = size
        self._lock = threading.Lock()
        self._shards: OrderedDict[str, _LocalShard | _FsspecShard] = OrderedDict()

    def get(self, target: str) -> _LocalShard | _FsspecShard:
        with self._lock:
            shard = self._shards.get(target)
            if shard is not None:
                self._shards.move_to_end(target)
                return shard
        shard = _open_shard(target)  # outside the lock: opening a remote shard is slow
        with self._lock:
            shard = self._shards.setdefault(target, shard)
            self._shards.move_to_end(target)
            while len(self._shards) > self._size:
                self._shards.popitem(last=False)
        return shard

    def clear(self) -> None:
        with self._lock:
            self._shards.clear()


_SHARDS = _ShardCache(SHARD_CACHE_SIZE)
