"""Exports and output paths (issue 14, items 3, 4 and 11): a failed export leaves the previous
output intact, a folder export replaces exactly what recap left there and refuses a folder it
did not write, and a bad `--out` is one line and exit 2, before anything is written (for
`recap run`, before any captioning)."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from producer.export import EXPORT_COLUMNS, TEMP_MARK, export_format, export_job
from recap.errors import RecapError
from recap.generation import GenerationSettings
from recap.records import InputItem, ItemResult
from recap.store import Store


def _job(sqlite_url, items: int = 6, caption_chars: int = 8):
    """A job whose items are all done; captions of random hex compress badly, so that
    `caption_chars` sets the export's size."""
    store = Store(sqlite_url)
    job = store.ensure_job("J", "tiny", "describe", GenerationSettings.from_json({}), items)
    store.register_items(job, [[InputItem(f"k{i}", f"http://127.0.0.1/{i}.jpg") for i in range(items)]])
    store.claim_chunk(job.id, 0, "w", 60, 3)
    results = [
        ItemResult(f"k{i}", "done", caption=secrets.token_hex(caption_chars // 2)) for i in range(items)
    ]
    store.write_results(job.id, 0, results)
    store.finish_chunk(job.id, 0, "w")
    return store, job


def _limit_file_size(limit: int):
    """In the child: files may not grow past `limit` bytes, as under `ulimit -f`; a write past
    it fails with EFBIG instead of the default SIGXFSZ kill."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _recap(*args: str, cwd: Path, db: str, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recap.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, "RECAP_DATABASE_URL": db, "COLUMNS": "200"},
        preexec_fn=preexec_fn,
    )


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) with the sha256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# -- 3: atomic exports ------------------------------------------------------------------------


def test_an_export_past_a_file_size_limit_leaves_the_previous_file_intact(sqlite_url, tmp_path):
    """The issue's repro: export, then the same export under `ulimit -f`."""
    _job(sqlite_url, items=2000, caption_chars=400)  # about 450 kB of parquet
    work = tmp_path / "work"
    work.mkdir()
    assert _recap("export", "--job", "J", "--out", "good.parquet", cwd=work, db=sqlite_url).returncode == 0
    before = _snapshot(work)

    limited = _recap(
        "export",
        "--job",
        "J",
        "--out",
        "good.parquet",
        cwd=work,
        db=sqlite_url,
        preexec_fn=_limit_file_size(100_000),
    )
    line = _one_line_error(limited)
    assert "good.parquet" in line and "File too large" in line
    assert _snapshot(work) == before  # the old file as it was, no temporary file left
    assert pq.read_table(work / "good.parquet").num_rows == 2000


def test_a_shard_folder_past_a_file_size_limit_keeps_its_previous_shards(sqlite_url, tmp_path):
    _job(sqlite_url, items=2000, caption_chars=400)
    work = tmp_path / "work"
    work.mkdir()
    first = _recap(
        "export", "--job", "J", "--out", "shards", "--rows-per-shard", "300", cwd=work, db=sqlite_url
    )
    assert first.returncode == 0, first.stderr
    before = _snapshot(work / "shards")
    assert len(before) == 7

    limited = _recap(
        "export",
        "--job",
        "J",
        "--out",
        "shards",
        "--rows-per-shard",
        "1000",
        cwd=work,
        db=sqlite_url,
        preexec_fn=_limit_file_size(100_000),
    )
    assert "shards" in _one_line_error(limited)
    assert _snapshot(work / "shards") == before
    assert ds.dataset(work / "shards", format="parquet").count_rows() == 2000


class _FailingMidway(Store):
    """The real store, whose item stream breaks after its first batch (a database gone away
    halfway through a long export)."""

    def iter_items(self, job, statuses, batch_rows=10_000, since=None):
        stream = super().iter_items(job, statuses, batch_rows=2, since=since)
        try:
            yield next(stream)
        finally:
            stream.close()
        raise RuntimeError("connection lost midway")


@pytest.mark.parametrize("out", ["one.parquet", "one.jsonl", "shards"])
def test_an_exception_midway_leaves_the_previous_output_and_no_temporary_files(sqlite_url, tmp_path, out):
    store, job = _job(sqlite_url, items=6)
    export_job(store, job, str(tmp_path / out), rows_per_shard=3)  # the failing one shards by 1
    before = _snapshot(tmp_path)

    failing = _FailingMidway(sqlite_url)
    with pytest.raises(RuntimeError, match="midway"):
        export_job(failing, job, str(tmp_path / out), rows_per_shard=1, status="all")
    assert _snapshot(tmp_path) == before
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(TEMP_MARK)]


def test_fsspec_urls_export_atomically_and_replace_their_stale_shards(sqlite_url):
    import fsspec

    store, job = _job(sqlite_url, items=6)
    memory = fsspec.filesystem("memory")
    base = f"memory://recap-test-{secrets.token_hex(4)}"
    assert export_job(store, job, f"{base}/one.parquet").rows == 6
    with memory.open(f"{base}/one.parquet", "rb") as file:
        assert pq.read_table(file).num_rows == 6
    assert export_job(store, job, f"{base}/shards", rows_per_shard=2).files == 3
    assert export_job(store, job, f"{base}/shards", rows_per_shard=4).files == 2
    names = sorted(p.rsplit("/", 1)[-1] for p in memory.ls(f"{base}/shards", detail=False))
    assert names == ["part-00000.parquet", "part-00001.parquet"]
    memory.rm(base, recursive=True)


# -- 4: a folder export replaces recap's previous one, and only that ---------------------------


def test_a_folder_export_replaces_the_shards_of_the_previous_one(sqlite_url, tmp_path):
    """The issue's repro: --rows-per-shard 2, then 10: the folder reads as exactly the job."""
    _job(sqlite_url, items=6)
    for rows_per_shard in ("2", "10"):
        result = _recap(
            "export",
            "--job",
            "J",
            "--out",
            "shards",
            "--rows-per-shard",
            rows_per_shard,
            cwd=tmp_path,
            db=sqlite_url,
        )
        assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["part-00000.parquet"]
    table = ds.dataset(tmp_path / "shards", format="parquet").to_table()
    assert sorted(table.column("key").to_pylist()) == [f"k{i}" for i in range(6)]

    # Another format into the same folder replaces the parquet shards too.
    again = _recap(
        "export", "--job", "J", "--out", "shards", "--format", "jsonl", cwd=tmp_path, db=sqlite_url
    )
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["part-00000.jsonl"]


def test_a_folder_recap_did_not_write_is_refused_unless_overwrite(sqlite_url, tmp_path):
    _job(sqlite_url, items=6)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("someone's notes")
    # A shard name of recap's with someone else's columns is not recap's either.
    pq.write_table(pa.table({"id": [1, 2]}), theirs / "part-00000.parquet")
    before = _snapshot(theirs)

    refused = _recap("export", "--job", "J", "--out", "theirs", cwd=tmp_path, db=sqlite_url)
    line = _one_line_error(refused)
    assert "theirs" in line and "--overwrite" in line
    assert _snapshot(theirs) == before

    replaced = _recap("export", "--job", "J", "--out", "theirs", "--overwrite", cwd=tmp_path, db=sqlite_url)
    assert replaced.returncode == 0, replaced.stderr
    assert sorted(p.name for p in theirs.iterdir()) == ["part-00000.parquet"]
    assert pq.read_table(theirs / "part-00000.parquet").column_names == EXPORT_COLUMNS


def test_what_an_interrupted_export_left_is_recaps_own_and_cleared(sqlite_url, tmp_path):
    """A SIGKILLed export leaves only hidden temporary files: they do not make the folder
    someone else's, and the next export removes them."""
    store, job = _job(sqlite_url, items=6)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / f"{TEMP_MARK}0123abcd-part-00000.parquet").write_bytes(b"PAR1 half a shard")
    assert export_job(store, job, str(shards), rows_per_shard=3).files == 2
    assert sorted(p.name for p in shards.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]


def test_a_file_export_clears_what_killed_exports_of_it_left(sqlite_url, tmp_path):
    store, job = _job(sqlite_url, items=6)
    (tmp_path / f"{TEMP_MARK}0123456789ab-good.parquet").write_bytes(b"PAR1 half a file")
    (tmp_path / f"{TEMP_MARK}0123456789ab-other.parquet").write_bytes(b"another export's")
    export_job(store, job, str(tmp_path / "good.parquet"))
    assert sorted(p.name for p in tmp_path.iterdir() if "parquet" in p.name) == [
        f"{TEMP_MARK}0123456789ab-other.parquet",
        "good.parquet",
    ]


def test_an_export_folder_of_jsonl_from_before_is_recognised_as_recaps(sqlite_url, tmp_path):
    """Exports made before this change carry no mark but their names and columns."""
    store, job = _job(sqlite_url, items=6)
    shards = tmp_path / "shards"
    shards.mkdir()
    row = dict.fromkeys(EXPORT_COLUMNS)
    for n in range(3):
        (shards / f"part-{n:05d}.jsonl").write_text(json.dumps(row) + "\n")
    assert export_job(store, job, str(shards), fmt="jsonl").files == 1
    assert sorted(p.name for p in shards.iterdir()) == ["part-00000.jsonl"]
    assert len((shards / "part-00000.jsonl").read_text().splitlines()) == 6


# -- 11: output paths ------------------------------------------------------------------------


def _bad_outputs(tmp_path: Path) -> dict[str, str]:
    """--out values that cannot be exported to, each with what the error must name."""
    (tmp_path / "plainfile").write_text("not a folder")
    (tmp_path / "d.parquet").mkdir()
    os.mkfifo(tmp_path / "pipe.parquet")
    return {
        "": "--out is empty",
        "plainfile": "plainfile",  # an existing non-folder without a suffix
        "d.parquet": "d.parquet",  # a folder named like a file
        "/dev/full": "/dev/full",
        "pipe.parquet": "pipe.parquet",
        "plainfile/sub.parquet": "plainfile/sub.parquet",  # under a regular file: root cannot
        "/proc/recap-out.parquet": "/proc/recap-out.parquet",  # nor here
        "/proc/recap-shards": "/proc/recap-shards",
        "nosuch://bucket/x.parquet": "nosuch://bucket/x.parquet",
    }


def test_bad_output_paths_are_one_line_and_exit_2_and_write_nothing(sqlite_url, tmp_path):
    _job(sqlite_url, items=6)
    work = tmp_path / "work"
    work.mkdir()
    for out, named in _bad_outputs(work).items():
        before = _snapshot(work)
        line = _one_line_error(_recap("export", "--job", "J", "--out", out, cwd=work, db=sqlite_url))
        assert named in line, (out, line)
        assert _snapshot(work) == before, out  # nothing written (for "": not into the working folder)
        assert sorted(os.listdir(work)) == ["d.parquet", "pipe.parquet", "plainfile"], out


def test_export_format_checks_the_path_before_any_work(tmp_path):
    """`recap run` calls export_format before captioning: it must refuse what export refuses."""
    for out, named in _bad_outputs(tmp_path).items():
        if out and not out.startswith("/") and "://" not in out:
            out = str(tmp_path / out)
        with pytest.raises(RecapError, match="--out") as refused:
            export_format(out, None)
        assert named in str(refused.value)
    assert export_format(str(tmp_path / "new" / "out.jsonl"), None) == "jsonl"
    assert export_format("memory://bucket/out", None) == "parquet"
    assert not (tmp_path / "new").exists()  # checking writes nothing


def test_recap_run_refuses_an_unwritable_out_before_captioning(tmp_path):
    """Before: every item was captioned, then the export raised a traceback."""
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:9/a.jpg\nhttp://127.0.0.1:9/b.jpg\n")
    db = tmp_path / "run.db"
    result = _recap(
        "run",
        str(urls),
        "--model",
        "tiny",
        "--out",
        "/proc/recap-run.parquet",
        cwd=tmp_path,
        db=f"sqlite:///{db}",
    )
    assert "/proc/recap-run.parquet" in _one_line_error(result)
    assert not db.exists()  # refused before the job was even registered


def test_a_symlinked_output_file_is_replaced_through_its_link(sqlite_url, tmp_path):
    store, job = _job(sqlite_url, items=6)
    export_job(store, job, str(tmp_path / "real.parquet"))  # an earlier export of recap's
    (tmp_path / "link.parquet").symlink_to("real.parquet")
    export_job(store, job, str(tmp_path / "link.parquet"))
    assert (tmp_path / "link.parquet").is_symlink()
    assert pq.read_table(tmp_path / "real.parquet").num_rows == 6


def test_an_existing_file_recap_did_not_export_is_kept_unless_overwrite(sqlite_url, tmp_path):
    _job(sqlite_url)
    mine = tmp_path / "notes.jsonl"
    mine.write_text("precious\n")
    data = tmp_path / "input.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1/a.jpg"], "text": ["a"], "mydata": [1]}), data)
    for target in (mine, data):
        before = target.read_bytes()
        result = _recap("export", "--job", "J", "--out", str(target), cwd=tmp_path, db=sqlite_url)
        assert result.returncode == 2 and "recap did not export" in _one_line_error(result)
        assert target.read_bytes() == before
    forced = _recap("export", "--job", "J", "--out", str(mine), "--overwrite", cwd=tmp_path, db=sqlite_url)
    assert forced.returncode == 0, forced.stderr
    again = _recap("export", "--job", "J", "--out", str(mine), cwd=tmp_path, db=sqlite_url)
    assert again.returncode == 0, again.stderr  # recap's own export: replaced without asking


def test_a_folder_of_the_published_dataset_is_not_taken_for_recaps(sqlite_url, tmp_path):
    """Recap-DataComp-1B's files share recap's leading columns, not its own (status, job)."""
    _job(sqlite_url)
    folder = tmp_path / "dc1b"
    folder.mkdir()
    names = ["key", "url", "re_caption", "org_caption", "sha256", "re_length", "org_length"]
    pq.write_table(pa.table({name: ["x"] for name in names}), folder / "part-00000.parquet")
    before = _snapshot(folder)
    result = _recap("export", "--job", "J", "--out", str(folder), cwd=tmp_path, db=sqlite_url)
    assert result.returncode == 2 and "recap did not export" in _one_line_error(result)
    assert _snapshot(folder) == before
