"""The load stage end to end: http(s), file:// and tar:// items in, one result per item out."""

from __future__ import annotations

import gzip
import io
import tarfile
import threading
import time
from pathlib import Path

import pytest

from recap.errors import ErrorClass as E
from recap.records import ImageSpec, InputItem, Prepared, Rejected
from recap.settings import Settings
from tests.support import http_server as srv
from workers import sources
from workers.fetch import Fetcher
from workers.load_result import Failed, Fetched
from workers.loader import ImageLoader
from workers.sources import read_local

SPEC = ImageSpec(64, "pad")


def make_settings(**overrides) -> Settings:
    base = {
        "fetch_timeout_s": 3.0,
        "fetch_connect_timeout_s": 1.0,
        "fetch_retries": 1,
        "fetch_backoff_s": 0.01,
        "fetch_max_bytes": 300_000,
        "fetch_concurrency": 8,
        "fetch_allow_cidrs": ["127.0.0.1/32"],
        "min_side": 8,
    }
    return Settings(**{**base, **overrides})


@pytest.fixture(scope="module")
def loader():
    with ImageLoader(make_settings(), SPEC) as stage:
        yield stage


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    """A small webdataset-style shard: images plus their caption files."""
    path = tmp_path_factory.mktemp("shards") / "000000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [
            ("000001.jpg", srv.render_image(50, 40, "JPEG", 1)),
            ("000001.txt", b"a caption"),
            ("sub/000002.png", srv.render_image(40, 50, "PNG", 2, mode="RGBA")),
            ("./000003.webp", srv.render_image(30, 30, "WEBP", 3)),
            ("000004.jpg", b"<html>not really</html>"),
            ("000005.jpg", srv.render_image(400, 400, "PNG", 5)),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def by_key(results) -> dict[str, Prepared | Rejected]:
    out = {}
    for r in results:
        assert r.item.key not in out, f"two results for {r.item.key}"
        out[r.item.key] = r
    return out


def error_of(result) -> E:
    assert isinstance(result, Rejected), result
    return result.failure.error_class


def failed_class(result) -> E:
    assert isinstance(result, Failed), result
    return result.failure.error_class


# ---------------------------------------------------------------------------- mixed input


def test_one_result_per_item_with_the_right_class(loader, image_server, shard, tmp_path):
    picture = tmp_path / "photo one.png"
    picture.write_bytes(srv.render_image(60, 40, "PNG", 7))
    url = image_server.url
    items = {
        "jpg": (url("/img/80x60.jpg"), None),
        "png-rgba": (url("/img/80x60.png?mode=RGBA"), None),
        "redirected": (url("/redirect/2"), None),
        "file": (picture.as_uri(), None),
        "tar": (f"tar://000001.jpg::{shard}", None),
        "tar-sub": (f"tar://sub/000002.png::{shard}", None),
        "tar-dot": (f"tar://000003.webp::file://{shard}", None),
        "missing-file": ((tmp_path / "nope.jpg").as_uri(), E.SOURCE_ERROR),
        "missing-member": (f"tar://999.jpg::{shard}", E.SOURCE_ERROR),
        "missing-shard": (f"tar://000001.jpg::{tmp_path / 'none.tar'}", E.SOURCE_ERROR),
        "tar-html": (f"tar://000004.jpg::{shard}", E.NOT_IMAGE),
        "404": (url("/status/404"), E.HTTP_4XX),
        "html": (url("/html"), E.NOT_IMAGE),
        "svg": (url("/svg"), E.NOT_IMAGE),
        "empty": (url("/empty"), E.NOT_IMAGE),
        "truncated": (url("/truncated.jpg"), E.DECODE_ERROR),
        "corrupt": (url("/corrupt.png"), E.DECODE_ERROR),
        "bomb": (url("/bomb.png"), E.TOO_MANY_PIXELS),
        "tiny": (url("/tiny.png"), E.TOO_SMALL),
        "wide": (url("/wide.png"), E.BAD_ASPECT),
        "big": (url("/big?bytes=400000"), E.TOO_LARGE),
        "opted-out": (url("/robots?tag=recap%3A%20noai"), E.OPTED_OUT),
        "scheme": ("ftp://127.0.0.1/x.jpg", E.BAD_SCHEME),
        "invalid": ("not a url", E.INVALID_URL),
        "blocked": ("http://127.0.0.2:9/x.jpg", E.BLOCKED_ADDRESS),
    }
    local = {
        "file",
        "tar",
        "tar-sub",
        "tar-dot",
        "missing-file",
        "missing-member",
        "missing-shard",
        "tar-html",
    }
    results = by_key(loader.load(InputItem(k, u, local=k in local) for k, (u, _) in items.items()))
    assert set(results) == set(items)
    for key, (_, expected) in items.items():
        result = results[key]
        if expected is None:
            assert isinstance(result, Prepared), (key, result)
            assert result.image.size == (64, 64) and result.image.mode == "RGB"
            assert len(result.sha256) == 64 and result.fetch_ms >= 0
        else:
            assert error_of(result) is expected, (key, result.failure)
    assert (results["tar-sub"].width, results["tar-sub"].height) == (40, 50)
    assert results["html"].sha256 is not None  # the bytes' hash is kept for the export


def test_expected_sha256_comes_from_the_item(loader, image_server):
    import hashlib

    data = srv.render_image(64, 48, "JPEG", 6)
    right = hashlib.sha256(data).hexdigest()
    url = image_server.url("/robots")  # serves exactly those bytes
    results = by_key(
        loader.load(
            [
                InputItem("right", url, expected_sha256=right),
                InputItem("wrong", url, expected_sha256="ab" * 32),
            ]
        )
    )
    assert isinstance(results["right"], Prepared)
    assert error_of(results["wrong"]) is E.HASH_MISMATCH
    assert results["wrong"].sha256 == right


# ---------------------------------------------------------------------------- ordering, memory


def test_results_come_as_they_complete(loader, image_server):
    items = [InputItem("slow", image_server.url("/slow?delay=1"))]
    items += [InputItem(f"fast{i}", image_server.url(f"/img/40x40.jpg?seed={i}")) for i in range(5)]
    keys = [r.item.key for r in loader.load(items)]
    assert keys[-1] == "slow"
    assert sorted(keys) == sorted(i.key for i in items)


def test_in_flight_is_bounded_for_any_input_length(image_server):
    taken = 0
    worst = 0

    def endless_enough():
        nonlocal taken
        for i in range(60):
            taken += 1
            yield InputItem(str(i), image_server.url(f"/img/16x16.png?seed={i % 5}"))

    with ImageLoader(make_settings(fetch_concurrency=4), SPEC) as stage:
        count = 0
        for _ in stage.load(endless_enough()):
            count += 1
            worst = max(worst, taken - count)
    assert count == 60
    assert worst <= 4


def test_local_items_need_no_fetcher_traffic(loader, image_server, shard):
    image_server.reset_hits()
    members = ["000001.jpg", "sub/000002.png", "000003.webp"] * 4
    items = [InputItem(str(i), f"tar://{m}::{shard}", local=True) for i, m in enumerate(members)]
    assert all(isinstance(r, Prepared) for r in loader.load(items))
    assert sum(image_server.hits.values()) == 0


def test_a_url_list_cannot_make_a_worker_read_local_files(loader, shard, tmp_path):
    """file:// and tar:// in a URL list are refused like any other non-http scheme: only the
    shard and folder readers mark items local."""
    picture = tmp_path / "secret.png"
    picture.write_bytes(srv.render_image(60, 40, "PNG", 1))
    items = [
        InputItem("file", picture.as_uri()),
        InputItem("tar", f"tar://000001.jpg::{shard}"),
        InputItem("etc", "file:///etc/hostname"),
    ]
    results = by_key(loader.load(items))
    assert all(isinstance(r, Rejected) for r in results.values())
    assert results["file"].failure.error_class is E.BAD_SCHEME
    assert results["etc"].failure.error_class is E.BAD_SCHEME
    assert results["tar"].failure.error_class in (E.BAD_SCHEME, E.INVALID_URL)


# ---------------------------------------------------------------------------- isolation, stopping


class ExplodingFetcher(Fetcher):
    """A real fetcher with one planted bug: it raises for URLs that ask for it."""

    def fetch(self, url, **kwargs):
        if "boom" in url:
            raise RuntimeError("planted bug")
        return super().fetch(url, **kwargs)


def test_an_exception_in_one_item_becomes_its_rejection(image_server):
    settings = make_settings()
    with ExplodingFetcher(settings) as fetcher, ImageLoader(settings, SPEC, fetcher) as stage:
        results = by_key(
            stage.load(
                [
                    InputItem("boom", image_server.url("/img/20x20.jpg?boom=1")),
                    InputItem("fine", image_server.url("/img/20x20.jpg")),
                ]
            )
        )
    assert error_of(results["boom"]) is E.NETWORK_ERROR
    assert "planted bug" in results["boom"].failure.message
    assert isinstance(results["fine"], Prepared)


def test_stopping_early_does_not_hang(loader, image_server):
    items = (InputItem(str(i), image_server.url(f"/img/20x20.jpg?seed={i}")) for i in range(50))
    first = next(iter(loader.load(items)))
    assert first is not None
    # The loader is still usable afterwards.
    (again,) = loader.load([InputItem("again", image_server.url("/tiny.png"))])
    assert error_of(again) is E.TOO_SMALL


def test_close_cuts_work_in_flight(image_server):
    stage = ImageLoader(make_settings(fetch_timeout_s=30, fetch_retries=0), SPEC)
    results = stage.load([InputItem("drip", image_server.url("/drip?bytes_per_s=2000"))])
    got = []
    thread = threading.Thread(target=lambda: got.extend(results))
    thread.start()
    time.sleep(0.3)
    start = time.monotonic()
    stage.close()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert time.monotonic() - start < 2.0  # not the 30 s deadline
    assert error_of(got[0]) is E.TIMEOUT


# ---------------------------------------------------------------------------- sources


def test_read_local_limits_and_errors(shard, tmp_path):
    picture = tmp_path / "p.jpg"
    picture.write_bytes(b"x" * 1000)
    assert read_local(picture.as_uri(), 1000) == Fetched(b"x" * 1000)
    assert failed_class(read_local(picture.as_uri(), 999)) is E.TOO_LARGE
    assert failed_class(read_local(f"tar://000005.jpg::{shard}", 100)) is E.TOO_LARGE
    assert read_local(f"tar://000001.txt::{shard}", 100) == Fetched(b"a caption")
    assert failed_class(read_local("file://otherhost/etc/passwd", 100)) is E.SOURCE_ERROR
    assert failed_class(read_local("tar://nothing-after", 100)) is E.SOURCE_ERROR
    assert failed_class(read_local(f"tar://sub::{shard}", 100)) is E.SOURCE_ERROR  # not a file


def test_a_shard_is_indexed_once_for_many_members(shard, monkeypatch):
    calls = []
    real = sources._index_tar
    monkeypatch.setattr(sources, "_index_tar", lambda path: calls.append(path) or real(path))
    sources._SHARDS.clear()
    for _ in range(50):
        assert read_local(f"tar://000001.txt::{shard}", 100) == Fetched(b"a caption")
    assert len(calls) == 1


def test_compressed_shard_through_fsspec(tmp_path):
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as tar:
        data = srv.render_image(20, 20, "PNG", 1)
        info = tarfile.TarInfo("a.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "shard.tar.gz"
    path.write_bytes(gzip.compress(plain.getvalue()))
    assert read_local(f"tar://a.png::{path}", 10_000) == Fetched(data)
    assert failed_class(read_local(f"tar://b.png::{path}", 10_000)) is E.SOURCE_ERROR
