"""Input readers: every format and compression, folders, globs, fsspec URLs, shards, images."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from producer.readers import (
    ColumnOptions,
    InputError,
    ReadStats,
    expand_inputs,
    read_items,
    url_key,
)
from recap.errors import RecapError

JPEG = b"\xff\xd8\xff\xe0fake-jpeg-bytes\xff\xd9"
PNG = b"\x89PNG\r\n\x1a\nfake-png-bytes"


def read_all(inputs, columns=None, batch_rows=8192, stats=None):
    columns = columns or ColumnOptions()
    stats = stats if stats is not None else ReadStats()
    items = [item for batch in read_items(inputs, columns, batch_rows, stats) for item in batch]
    # Every row is either an item or a counted skip.
    assert stats.rows_read == stats.items + sum(stats.rows_skipped.values())
    assert stats.items == len(items)
    return items


def sha(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


def write(path: Path, text: str, compress: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def write_parquet(path: Path, columns: dict, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, **kwargs)
    return path


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def shard_bytes(members: list[tuple[str, bytes]], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in members:
            add_member(tar, name, data)
    return buffer.getvalue()


SHARD_MEMBERS = [
    # img2dataset's layout: json with key/url/caption, txt with the caption
    ("000000000.jpg", JPEG),
    ("000000000.txt", b"a dog on a beach\n"),
    (
        "000000000.json",
        json.dumps({"key": "k0", "url": "http://web/0.jpg", "caption": "json cap"}).encode(),
    ),
    # no json: key from the member name; caption from the json-less txt
    ("000000001.png", PNG),
    ("000000001.txt", b"a cat"),
    # json caption only ("text" wins over "caption", as for tables), in a sub-directory
    ("sub/000000002.webp", b"RIFFwebp"),
    ("sub/000000002.json", json.dumps({"text": "from json", "caption": "other"}).encode()),
    # a sample without an image: counted, not an item
    ("000000003.txt", b"orphan caption"),
    # an image with a mask: the first image is the item
    ("./000000004.jpg", JPEG + b"4"),
    ("./000000004.seg.png", PNG),
]


# ----------------------------------------------------------------------------- URL lists


@pytest.mark.parametrize("compress", [False, True], ids=["txt", "txt.gz"])
def test_txt_one_url_a_line_blank_and_comments_counted(tmp_path, compress):
    text = "# a comment\nhttp://a/1.jpg\n\n  https://a/2.jpg  \n   \n#another\nhttp://a/3.jpg#frag\n"
    path = write(tmp_path / ("urls.txt.gz" if compress else "urls.txt"), text, compress)
    stats = ReadStats()
    items = read_all([str(path)], stats=stats)
    assert [i.url for i in items] == ["http://a/1.jpg", "https://a/2.jpg", "http://a/3.jpg#frag"]
    assert [i.key for i in items] == [sha(i.url) for i in items] == [url_key(i.url) for i in items]
    assert all(i.org_caption is None and i.expected_sha256 is None for i in items)
    assert stats.rows_skipped == {"comment": 2, "blank_line": 2}
    assert stats.files == 1 and stats.rows_read == 7


@pytest.mark.parametrize("compress", [False, True], ids=["csv", "csv.gz"])
def test_csv_quoted_fields_default_caption_text_and_bad_rows(tmp_path, compress):
    text = (
        "\ufeffuid,url,text,caption\n"  # a spreadsheet's BOM
        '1,http://a/1.jpg,"cap, with comma",other\n'
        '2,http://a/2.jpg,"two\nlines",other\n'
        "3,,no url,x\n"
        "4,http://a/4.jpg\n"  # too few fields
        "5,http://a/5.jpg,,x\n"
    )
    path = write(tmp_path / ("t.csv.gz" if compress else "t.csv"), text, compress)
    stats = ReadStats()
    items = read_all([str(path)], ColumnOptions(id_col="uid"), stats=stats)
    assert [(i.key, i.url, i.org_caption) for i in items] == [
        ("1", "http://a/1.jpg", "cap, with comma"),
        ("2", "http://a/2.jpg", "two\nlines"),
        ("5", "http://a/5.jpg", ""),
    ]
    assert stats.rows_skipped == {"no_url": 1, "bad_row": 1}


def test_csv_ids_stay_strings(tmp_path):
    path = write(tmp_path / "t.csv", "id,url\n000123,http://a/1.jpg\n")
    [item] = read_all([str(path)], ColumnOptions(id_col="id"))
    assert item.key == "000123"


def test_tsv_with_header_and_quotes_left_alone(tmp_path):
    path = write(tmp_path / "t.tsv", 'url\tcaption\nhttp://a/1.jpg\t"quoted start\nhttp://a/2.jpg\tplain\n')
    items = read_all([str(path)])
    assert [(i.url, i.org_caption) for i in items] == [
        ("http://a/1.jpg", '"quoted start'),
        ("http://a/2.jpg", "plain"),
    ]


@pytest.mark.parametrize(
    "line_of", [lambda u, c: f"{u}\t{c}", lambda u, c: f"{c}\t{u}"], ids=["cc12m", "cc3m"]
)
def test_headerless_tsv_found_by_its_url_field(tmp_path, line_of):
    rows = [("https://a/1.jpg", "first caption"), ("https://a/2.jpg", "second")]
    path = write(tmp_path / "cc.tsv", "".join(line_of(u, c) + "\n" for u, c in rows))
    items = read_all([str(path)])
    assert [(i.url, i.org_caption) for i in items] == rows


@pytest.mark.parametrize("compress", [False, True], ids=["jsonl", "jsonl.gz"])
def test_jsonl_fields_per_row_and_bad_lines_counted(tmp_path, compress):
    lines = [
        {"id": 7, "url": "http://a/1.jpg", "text": "t1", "sha256": "AB" * 32},
        {"id": 8, "url": "http://a/2.jpg", "caption": "c2"},  # this row's default: caption
        {"id": 9, "url": None},
        "not json",
        [1, 2],
        "",
        {"id": None, "url": "http://a/4.jpg"},
        {"id": 10.0, "url": " http://a/5.jpg "},
    ]
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    path = write(tmp_path / ("r.jsonl.gz" if compress else "r.jsonl"), text, compress)
    stats = ReadStats()
    items = read_all([str(path)], ColumnOptions(id_col="id", sha256_col="sha256"), stats=stats)
    assert [(i.key, i.url, i.org_caption, i.expected_sha256) for i in items] == [
        ("7", "http://a/1.jpg", "t1", "ab" * 32),
        ("8", "http://a/2.jpg", "c2", None),
        ("10", "http://a/5.jpg", None, None),
    ]
    assert stats.rows_skipped == {"no_url": 1, "bad_json": 2, "blank_line": 1, "no_id": 1}


# ----------------------------------------------------------------------------- parquet, columns


def test_parquet_column_options(tmp_path):
    path = write_parquet(
        tmp_path / "a.parquet",
        {
            "uid": [1, 2, 3],
            "image_url": ["http://a/1.jpg", "http://a/2.jpg", "http://a/3.jpg"],
            "alt": ["x", None, "z"],
            "text": ["t1", "t2", "t3"],
            "hash": ["ABCD", None, ""],
        },
    )
    cols = ColumnOptions(url_col="image_url", caption_col="alt", id_col="uid", sha256_col="hash")
    items = read_all([str(path)], cols)
    assert [(i.key, i.url, i.org_caption, i.expected_sha256) for i in items] == [
        ("1", "http://a/1.jpg", "x", "abcd"),
        ("2", "http://a/2.jpg", None, None),
        ("3", "http://a/3.jpg", "z", None),
    ]


def test_default_caption_is_text_else_caption_else_none(tmp_path):
    url = ["http://a/1.jpg"]
    both = write_parquet(tmp_path / "both.parquet", {"url": url, "caption": ["c"], "text": ["t"]})
    only_caption = write_parquet(tmp_path / "cap.parquet", {"url": url, "caption": ["c"]})
    neither = write_parquet(tmp_path / "none.parquet", {"url": url, "alt": ["a"]})
    assert [i.org_caption for i in read_all([str(both), str(only_caption), str(neither)])] == [
        "t",
        "c",
        None,
    ]


def test_laion_upper_case_columns_found(tmp_path):
    path = write_parquet(
        tmp_path / "laion.parquet",
        {
            "SAMPLE_ID": [12.0, 13.0],
            "URL": ["http://a/1.jpg", "http://a/2.jpg"],
            "TEXT": ["a", "b"],
        },
    )
    items = read_all([str(path)], ColumnOptions(id_col="SAMPLE_ID"))
    assert [(i.key, i.org_caption) for i in items] == [("12", "a"), ("13", "b")]


def test_missing_column_error_names_the_columns_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_parquet(
        tmp_path / "data" / "a.parquet",
        {"uid": ["u"], "image_url": ["http://a/1.jpg"], "text": ["t"]},
    )
    with pytest.raises(InputError) as caught:
        read_all(["data/a.parquet"])
    assert str(caught.value) == (
        "input data/a.parquet has no column 'url' (columns: uid, image_url, text); pass --url-col"
    )
    assert isinstance(caught.value, RecapError)
    with pytest.raises(InputError, match=r"no column 'title' .*; pass --caption-col"):
        read_all(["data/a.parquet"], ColumnOptions(url_col="image_url", caption_col="title"))
    write(tmp_path / "b.csv", "link,alt\nhttp://a/1.jpg,x\n")
    with pytest.raises(InputError, match=r"input b.csv has no column 'url' \(columns: link, alt\)"):
        read_all(["b.csv"])


def test_null_and_empty_urls_skipped_and_counted(tmp_path):
    path = write_parquet(
        tmp_path / "n.parquet", {"url": ["http://a/1.jpg", None, "", "   ", "http://a/5.jpg"]}
    )
    stats = ReadStats()
    items = read_all([str(path)], stats=stats)
    assert [i.url for i in items] == ["http://a/1.jpg", "http://a/5.jpg"]
    assert stats.rows_skipped == {"no_url": 3} and stats.rows_read == 5


def test_large_parquet_streams_in_batches(tmp_path):
    n = 200_000
    urls = pa.array([f"http://example.com/images/{i:08d}.jpg" for i in range(n)])
    path = write_parquet(
        tmp_path / "big.parquet",
        {
            "url": urls,
            "text": pa.array(["a caption of some length"] * n),
            "unused": pa.array(range(n)),
        },
        row_group_size=25_000,
    )
    whole = pq.read_table(path, columns=["url", "text"])
    table_bytes = whole.nbytes
    del whole
    baseline = pa.total_allocated_bytes()
    stats = ReadStats()
    batches = read_items([str(path)], batch_rows=10_000, stats=stats)
    first = next(batches)
    # Lazy: the first batch arrives before the file is read through.
    assert len(first) == 10_000 and stats.rows_read <= 30_000
    peak = pa.total_allocated_bytes() - baseline
    sizes = [len(first)]
    for batch in batches:
        sizes.append(len(batch))
        peak = max(peak, pa.total_allocated_bytes() - baseline)
    assert sizes == [10_000] * 20
    assert stats.items == n
    # Arrow never held more than a fraction of the needed columns (about one row group).
    assert peak < table_bytes / 3


def test_batches_span_files_and_keep_input_order(tmp_path):
    a = write(tmp_path / "a.txt", "http://a/1\nhttp://a/2\n")
    b = write(tmp_path / "b.txt", "http://b/1\nhttp://b/2\n")
    batches = list(read_items([str(b), str(a)], batch_rows=3))
    assert [[i.url for i in batch] for batch in batches] == [
        ["http://b/1", "http://b/2", "http://a/1"],
        ["http://a/2"],
    ]


def test_corrupt_file_is_an_input_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not a parquet file at all")
    with pytest.raises(InputError, match=r"broken.parquet: cannot read"):
        read_all([str(path)])
    gz = tmp_path / "broken.txt.gz"
    gz.write_bytes(gzip.compress(b"http://a/1\n" * 1000)[:50])
    with pytest.raises(InputError, match=r"broken.txt.gz: cannot read"):
        read_all([str(gz)])


# ----------------------------------------------------------------------------- inputs


def test_folders_recursive_sorted_and_globs(tmp_path):
    write(tmp_path / "d" / "b.txt", "http://b\n")
    write(tmp_path / "d" / "a" / "z.txt", "http://az\n")
    write(tmp_path / "d" / "c.csv", "url\nhttp://c\n")
    write(tmp_path / "d" / ".hidden" / "h.txt", "http://hidden\n")
    write(tmp_path / "d" / "notes.md", "# not an input\n")
    write(tmp_path / "d" / "_SUCCESS", "")
    stats = ReadStats()
    items = read_all([str(tmp_path / "d")], stats=stats)
    assert [i.url for i in items] == ["http://az", "http://b", "http://c"]
    assert stats.files == 3 and stats.files_skipped == {".md": 1, "(no extension)": 1}
    assert expand_inputs([str(tmp_path / "d")]) == [
        str(tmp_path / "d" / "a" / "z.txt"),
        str(tmp_path / "d" / "b.txt"),
        str(tmp_path / "d" / "c.csv"),
    ]
    assert [i.url for i in read_all([str(tmp_path / "d" / "*.txt")])] == ["http://b"]
    assert [i.url for i in read_all([str(tmp_path / "d" / "**" / "*.txt")])] == [
        "http://az",
        "http://b",
    ]


def test_missing_inputs_are_input_errors(tmp_path):
    with pytest.raises(InputError, match=r"does not exist"):
        expand_inputs([str(tmp_path / "nope.parquet")])
    with pytest.raises(InputError, match=r"matches nothing"):
        expand_inputs([str(tmp_path / "*.parquet")])
    # Checked before anything is read: the first input yields nothing.
    good = write(tmp_path / "good.txt", "http://a/1\n")
    stats = ReadStats()
    with pytest.raises(InputError, match=r"missing.txt does not exist"):
        next(read_items([str(good), str(tmp_path / "missing.txt")], stats=stats))
    assert stats.items == 0


def test_explicit_unsupported_file_names_supported_formats(tmp_path):
    doc = write(tmp_path / "notes.md", "x")
    with pytest.raises(InputError, match=r"unsupported format \.md \(supported: .*\.parquet.*\.tar"):
        expand_inputs([str(doc)])
    zipped = tmp_path / "a.parquet.gz"
    zipped.write_bytes(b"x")
    with pytest.raises(InputError, match=r"unsupported format \.parquet\.gz"):
        list(read_items([str(zipped)]))


def test_memory_fsspec_urls_files_and_globs():
    root = f"memory://recap-test-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{root}/lists/a.csv", b"url,caption\nhttp://m/1.jpg,one\n")
    fs.pipe(f"{root}/lists/b.txt.gz", gzip.compress(b"http://m/2.jpg\n"))
    buffer = io.BytesIO()
    pq.write_table(pa.table({"url": ["http://m/3.jpg"]}), buffer)
    fs.pipe(f"{root}/lists/c.parquet", buffer.getvalue())
    items = read_all([root])
    assert [(i.url, i.org_caption) for i in items] == [
        ("http://m/1.jpg", "one"),
        ("http://m/2.jpg", None),
        ("http://m/3.jpg", None),
    ]
    assert [i.url for i in read_all([f"{root}/lists/*.csv"])] == ["http://m/1.jpg"]
    # fsspec spells memory paths with a root slash: memory:///name/...
    assert expand_inputs([f"{root}/lists/c.parquet"]) == [f"memory:///{root[9:]}/lists/c.parquet"]


# ----------------------------------------------------------------------------- shards


def open_ref(ref: str) -> bytes:
    with fsspec.open(ref) as f:
        return f.read()


def check_shard_items(items, shard: str) -> None:
    assert [(i.key, i.org_caption) for i in items] == [
        ("k0", "a dog on a beach"),  # json key; .txt caption before the json's
        ("000000001", "a cat"),
        ("sub/000000002", "from json"),
        ("000000004", None),
    ]
    assert [i.url for i in items] == [
        f"tar://000000000.jpg::{shard}",
        f"tar://000000001.png::{shard}",
        f"tar://sub/000000002.webp::{shard}",
        f"tar://./000000004.jpg::{shard}",
    ]
    assert [open_ref(i.url) for i in items] == [JPEG, PNG, b"RIFFwebp", JPEG + b"4"]
    assert all(i.expected_sha256 is None for i in items)


@pytest.mark.parametrize("mode", ["w", "w:gz"], ids=["tar", "tar.gz"])
def test_webdataset_shard(tmp_path, mode):
    shard = tmp_path / ("000000.tar" if mode == "w" else "000000.tar.gz")
    shard.write_bytes(shard_bytes(SHARD_MEMBERS, mode))
    stats = ReadStats()
    items = read_all([str(shard)], stats=stats)
    check_shard_items(items, str(shard))
    assert stats.rows_skipped == {"no_image": 1}


def test_webdataset_shard_on_fsspec_url_streams():
    url = f"memory://recap-test-{uuid.uuid4().hex}/shards/000000.tar"
    fsspec.filesystem("memory").pipe(url, shard_bytes(SHARD_MEMBERS))
    items = read_all([url])
    check_shard_items(items, url.replace("memory://", "memory:///"))


def test_webdataset_shard_column_options_read_the_json(tmp_path):
    shard = tmp_path / "s.tar"
    meta = {"key": "k0", "uid": "u0", "alt": "alt text", "sha256": "AA" * 32}
    shard.write_bytes(
        shard_bytes([("0.jpg", JPEG), ("0.txt", b"txt cap"), ("0.json", json.dumps(meta).encode())])
    )
    [item] = read_all([str(shard)], ColumnOptions(id_col="uid", caption_col="alt", sha256_col="sha256"))
    assert (item.key, item.org_caption, item.expected_sha256) == ("u0", "alt text", "aa" * 32)


# ----------------------------------------------------------------------------- image folders


def make_image_folder(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(JPEG)
    (root / "a.txt").write_text("caption of a\n")
    (root / "b.PNG").write_bytes(PNG)
    (root / "sub" / "c.webp").write_bytes(b"RIFFwebp")
    (root / "sub" / "c.json").write_text(json.dumps({"caption": "c from json", "url": "http://web/c"}))
    (root / ".DS_Store").write_bytes(b"junk")
    (root / "._a.jpg").write_bytes(b"appledouble")


def test_image_folder_with_sidecar_captions(tmp_path):
    make_image_folder(tmp_path / "imgs")
    stats = ReadStats()
    items = read_all([str(tmp_path / "imgs")], stats=stats)
    assert [(i.key, i.org_caption) for i in items] == [
        ("a.jpg", "caption of a"),
        ("b.PNG", None),
        ("sub/c.webp", "c from json"),
    ]
    assert items[0].url == f"file://{tmp_path}/imgs/a.jpg"
    assert [open_ref(i.url) for i in items] == [JPEG, PNG, b"RIFFwebp"]
    assert stats.files_skipped == {"(hidden)": 2}
    # An image named alone keys by its name; a glob's keys are relative to its folder.
    [one] = read_all([str(tmp_path / "imgs" / "a.jpg")])
    assert (one.key, one.org_caption) == ("a.jpg", "caption of a")
    globbed = read_all([str(tmp_path / "imgs" / "*" / "*.webp")])
    assert [(i.key, i.org_caption) for i in globbed] == [("sub/c.webp", "c from json")]


def test_image_folder_on_fsspec_url():
    root = f"memory://recap-test-{uuid.uuid4().hex}/imgs"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{root}/x/1.jpg", JPEG)
    fs.pipe(f"{root}/x/1.txt", b"one")
    [item] = read_all([root])
    assert (item.key, item.org_caption) == ("x/1.jpg", "one")
    assert item.url.startswith("memory://") and open_ref(item.url) == JPEG


def test_mixed_folder_each_file_to_its_reader(tmp_path):
    mixed = tmp_path / "mixed"
    write(mixed / "urls.txt", "http://a/1.jpg\n")
    write(mixed / "table.csv.gz", "url\nhttp://a/2.jpg\n", compress=True)
    (mixed / "shard.tar").write_bytes(shard_bytes([("s0.jpg", JPEG), ("s0.txt", b"shard cap")]))
    (mixed / "photo.jpg").write_bytes(JPEG)
    write(mixed / "photo.txt", "photo caption")  # a sidecar, not a URL list
    write(mixed / "readme.md", "skip me")
    write(mixed / "meta.json", "{}")
    stats = ReadStats()
    items = read_all([str(mixed)], stats=stats)
    assert [(i.key, i.url, i.org_caption) for i in items] == [
        ("photo.jpg", f"file://{mixed}/photo.jpg", "photo caption"),
        ("s0", f"tar://s0.jpg::{mixed}/shard.tar", "shard cap"),
        (sha("http://a/2.jpg"), "http://a/2.jpg", None),
        (sha("http://a/1.jpg"), "http://a/1.jpg", None),
    ]
    assert stats.files == 4 and stats.files_skipped == {".md": 1, ".json": 1}
    assert stats.summary() == ("4 items from 4 files (4 rows); skipped files: .json 1, .md 1")


def test_image_folder_names_with_url_characters_are_read_back(tmp_path):
    """'#', '?' and '%' in file names survive the trip through a file:// reference."""
    from PIL import Image

    from workers.load_result import Fetched
    from workers.sources import read_local

    for name in ("cat #1.jpg", "what?.jpg", "100%25.jpg"):
        Image.new("RGB", (40, 40)).save(tmp_path / name)
    items = [item for batch in read_items([str(tmp_path)]) for item in batch]
    assert sorted(i.key for i in items) == ["100%25.jpg", "cat #1.jpg", "what?.jpg"]
    # read_local gives the bytes as `Fetched` (workers/load_result.py), failures as `Failed`.
    assert all(
        i.local and read_local(i.url, 10**7) == Fetched((tmp_path / i.key).read_bytes()) for i in items
    )


IMAGE_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".webp": "WEBP",
    ".gif": "GIF",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".avif": "AVIF",
}


def image_bytes(fmt: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("ext", sorted(IMAGE_FORMATS))
def test_every_image_format_pillow_reads_is_an_item_in_folders_and_shards(tmp_path, ext):
    """AVIF included: a folder image or shard member Pillow can decode is never passed by."""
    from PIL import Image, features

    if IMAGE_FORMATS[ext] == "AVIF" and not features.check("avif"):
        pytest.skip("this Pillow has no AVIF codec")
    data = image_bytes(IMAGE_FORMATS[ext])
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / f"photo{ext}").write_bytes(data)
    write(tmp_path / "imgs" / "photo.txt", "folder caption")
    shard = tmp_path / "000.tar"
    shard.write_bytes(shard_bytes([(f"s0{ext}", data), ("s0.txt", b"shard caption")]))
    stats = ReadStats()
    items = read_all([str(tmp_path / "imgs"), str(shard)], stats=stats)
    assert [(i.key, i.org_caption, i.local) for i in items] == [
        (f"photo{ext}", "folder caption", True),
        ("s0", "shard caption", True),
    ]
    assert stats.files_skipped == {} and stats.rows_skipped == {}
    for item in items:
        with Image.open(io.BytesIO(open_ref(item.url))) as image:
            assert image.format == IMAGE_FORMATS[ext]


def test_unreadable_sidecars_are_counted_and_their_images_kept(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "a.jpg").write_bytes(JPEG)
    (imgs / "a.txt").write_bytes(b"x" * ((1 << 20) + 1))  # too big to be a caption
    (imgs / "b.jpg").write_bytes(JPEG)
    (imgs / "b.json").write_text("[1, 2]")  # JSON, but not an object
    shard = tmp_path / "000.tar"
    shard.write_bytes(shard_bytes([("s0.jpg", JPEG), ("s0.json", b"{not json"), ("s0.txt", b"kept")]))
    stats = ReadStats()
    items = read_all([str(imgs), str(shard)], stats=stats)
    assert [(i.key, i.org_caption) for i in items] == [("a.jpg", None), ("b.jpg", None), ("s0", "kept")]
    assert stats.bad_sidecars == 3
    assert stats.summary() == "3 items from 3 files (3 rows); unreadable captions: 3"
