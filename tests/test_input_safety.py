"""Inputs, job identity and `recap run` (issue 14, items 2, 5, 6, 7, 9, 12, 15 and 18's exit
code): a run exports exactly its input as it is now, failed items can be retried on one
machine, input errors leave no half-registered job, recap's own exports are not read back,
NUL bytes do not stop a submit, one job-name rule, and two runs of one job share it."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from producer.input_job import job_for_input, successor_name
from producer.input_keys import InputKeys
from producer.jobs import MAX_JOB_NAME, check_job_name, derive_job_name, job_name_problem
from producer.readers import ColumnOptions, ReadStats, read_items
from recap.errors import RecapError
from recap.records import InputItem
from recap.settings import Settings
from tests.support.fleet import REPO, wait_until

pytestmark = pytest.mark.timeout(300)


# ----------------------------------------------------------------------------- helpers


def recap(*args, cwd, env=None, timeout=200) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recap.cli", *args],
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_env(tmp_path, model_dir, **extra) -> dict[str, str]:
    return {
        "RECAP_DATABASE_URL": f"sqlite:///{tmp_path}/recap.db",
        "RECAP_MODEL": str(model_dir),
        "RECAP_CHUNK_SIZE": "25",
        "RECAP_BATCH_SIZE": "8",
        "RECAP_MAX_NEW_TOKENS": "4",
        "RECAP_FETCH_RETRIES": "0",
        **extra,
    }


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a failed command (and no traceback)."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def exported(path) -> list[dict]:
    if str(path).endswith(".jsonl"):
        return [json.loads(line) for line in open(path)]
    return pq.read_table(path).to_pylist()


def jobs_in(url: str) -> dict[str, int]:
    """Job name -> number of items, read straight from the database."""
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT j.name, count(i.key) FROM jobs j LEFT JOIN items i ON i.job_id = j.id "
                    "GROUP BY j.name"
                )
            ).all()
    except sa.exc.OperationalError:  # no database file, or no schema: no jobs
        rows = []
    finally:
        engine.dispose()
    return dict(rows)


def export_table(rows: list[dict]) -> pa.Table:
    """A table in recap's export layout (as `recap export` writes it)."""
    from producer.export import EXPORT_SCHEMA

    columns = {name: [row.get(name) for row in rows] for name in EXPORT_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=EXPORT_SCHEMA)


def export_row(i: int) -> dict:
    return {
        "key": f"k{i}",
        "url": f"file:///data/{i}.jpg",
        "re_caption": "a caption",
        "status": "done",
        "job": "run-x",
        "flags": [],
    }


# ----------------------------------------------------------------------------- item 2


def test_run_exports_exactly_the_input_as_it_is_now(tmp_path, image_server, tiny_model_dir):
    """Replace the file's contents: the export holds the new items only (not 4 rows for 2
    URLs); append a line: only it is captioned; put the first contents back: their job is
    found again and nothing is captioned."""
    env = run_env(tmp_path, tiny_model_dir)
    urls = tmp_path / "urls.txt"
    first = [image_server.url(f"/img/64x64.jpg?seed={i}") for i in (1, 2)]
    second = [image_server.url(f"/img/64x64.jpg?seed={i}") for i in (3, 4)]
    out = tmp_path / "out.parquet"

    def run_with(lines):
        urls.write_text("\n".join(lines) + "\n")
        result = recap("run", str(urls), "--out", str(out), cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        return result, {row["url"]: row for row in exported(out)}

    _, rows = run_with(first)
    assert set(rows) == set(first)
    original_job = rows[first[0]]["job"]

    changed, rows = run_with(second)
    assert set(rows) == set(second), "an input whose contents changed still exports its old items"
    assert rows[second[0]]["job"] == successor_name(original_job, 2)
    assert f"no longer holds every item of job {original_job}" in changed.stderr

    appended, rows = run_with([*second, first[0]])
    assert set(rows) == {*second, first[0]}
    assert rows[second[0]]["job"] == successor_name(original_job, 2)
    assert "registered 1 new items" in appended.stderr

    back, rows = run_with(first)
    assert set(rows) == set(first) and rows[first[0]]["job"] == original_job
    assert "nothing left to caption" in back.stderr
    assert jobs_in(env["RECAP_DATABASE_URL"]) == {original_job: 2, successor_name(original_job, 2): 3}


def test_the_derived_name_of_an_unchanged_input_is_what_it_was():
    """A job made before the input rule resumes after it: the name is the same recipe."""
    settings = Settings()
    recipe = json.dumps(
        ["tiny", settings.prompt, settings.generation().to_json(), ["a.txt", "b.txt"]], sort_keys=True
    )
    before = f"run-tiny-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}"
    assert derive_job_name(["b.txt", "a.txt"], settings, "tiny") == before


def register(store, name: str, keys: list[str]):
    from producer.jobs import open_job

    job = open_job(store, Settings(), name, "tiny")
    store.register_items(job, [[InputItem(k, f"http://x/{k}") for k in keys]])
    return job


def input_keys(scratch: InputKeys, keys: list[str]) -> InputKeys:
    scratch.add(InputItem(k, f"http://x/{k}") for k in keys)
    return scratch


def test_the_job_of_an_input_is_the_biggest_whose_items_it_all_holds(store):
    with InputKeys.scratch() as fresh:
        assert job_for_input(store, "j", input_keys(fresh, ["a"])).name == "j"  # no job yet
    register(store, "j", ["a", "b"])
    with InputKeys.scratch() as same:
        assert job_for_input(store, "j", input_keys(same, ["a", "b", "b"])).name == "j"
    with InputKeys.scratch() as appended:
        assert job_for_input(store, "j", input_keys(appended, ["a", "b", "c"])).name == "j"
    with InputKeys.scratch() as cut:
        chosen = job_for_input(store, "j", input_keys(cut, ["a"]))
        assert (chosen.name, chosen.replaces) == ("j~2", "j")
    register(store, "j~2", ["a", "c", "d"])
    with InputKeys.scratch() as both:  # both fit: the one with more captions to reuse
        assert job_for_input(store, "j", input_keys(both, ["a", "b", "c", "d"])).name == "j~2"
    with InputKeys.scratch() as other:
        chosen = job_for_input(store, "j", input_keys(other, ["z"]))
        assert (chosen.name, chosen.replaces) == ("j~3", "j~2")


def test_successor_names_keep_the_name_rule():
    long = "n" * MAX_JOB_NAME
    assert len(successor_name(long, 12)) == MAX_JOB_NAME and successor_name(long, 12).endswith("~12")
    assert job_name_problem(successor_name(long, 12)) is None


# ----------------------------------------------------------------------------- items 5 and 18


def test_failed_items_of_a_run_can_be_retried_and_all_failed_exits_1(tmp_path, image_server, tiny_model_dir):
    """Every item fails the first time (503 once): exit 1 with one line; `recap retry` on
    SQLite puts one class back and the next run captions it; `--retry-errors` does the same."""
    env = run_env(tmp_path, tiny_model_dir)
    tag = os.urandom(4).hex()
    flaky = image_server.url(f"/flaky/a{tag}?fail=1&code=503")
    gone = image_server.url(f"/flaky/b{tag}?fail=1&code=429")
    urls = tmp_path / "urls.txt"
    urls.write_text(f"{flaky}\n{gone}\n")
    argv = ["run", str(urls), "--out", str(tmp_path / "out.parquet")]

    failed = recap(*argv, cwd=tmp_path, env=env)
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "every item failed (2: http_5xx 1, rate_limited 1)" in error_line(failed)
    job = jobs_in(env["RECAP_DATABASE_URL"]).popitem()[0]

    again = recap(*argv, cwd=tmp_path, env=env)
    assert again.returncode == 1 and "nothing left to caption" in again.stderr

    retried = recap("retry", "--job", job, "--errors", "http_5xx", cwd=tmp_path, env=env)
    assert retried.returncode == 0, retried.stderr
    assert "1 item(s) back to pending" in retried.stdout
    after_retry = recap(*argv, cwd=tmp_path, env=env)
    assert after_retry.returncode == 0, after_retry.stderr[-3000:]
    assert [row["url"] for row in exported(tmp_path / "out.parquet")] == [flaky]

    with_option = recap(*argv, "--retry-errors", "rate_limited", cwd=tmp_path, env=env)
    assert with_option.returncode == 0, with_option.stderr[-3000:]
    assert "1 failed item(s) of rate_limited back to pending" in with_option.stderr
    assert {row["url"] for row in exported(tmp_path / "out.parquet")} == {flaky, gone}

    bad = recap(*argv, "--retry-errors", "timeout,bogus", cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "--retry-errors: unknown error class(es) bogus" in error_line(bad)


# ----------------------------------------------------------------------------- item 6


def bad_inputs(tmp_path) -> dict[str, str]:
    """Inputs that cannot be registered, each with what the error must name."""
    lines = "".join(f"http://127.0.0.1:9/{i}.jpg\n" for i in range(20_000)).encode()
    data = gzip.compress(lines)
    (tmp_path / "cut.txt.gz").write_bytes(data[: len(data) // 2])  # ends midway
    (tmp_path / "nourl.csv").write_text("a,b\n1,2\n")
    (tmp_path / "fake.tar").write_text("this is not a tar file\n" * 10)
    (tmp_path / "nourl.parquet").write_bytes(b"PAR1 not really")
    return {"cut.txt.gz": "cannot read", "nourl.csv": "no column 'url'", "fake.tar": "cannot read"}


def test_run_input_errors_are_found_before_any_job_is_written(tmp_path):
    for name, says in bad_inputs(tmp_path).items():
        result = recap("run", name, "--out", "o.parquet", cwd=tmp_path, env={"RECAP_MODEL": "tiny"})
        assert result.returncode == 2, result.stderr
        line = error_line(result)
        assert name in line and says in line
    assert not (tmp_path / "recap.db").exists()


def test_submit_input_errors_leave_no_half_registered_job(tmp_path, pg_url):
    env = {"RECAP_DATABASE_URL": pg_url, "RECAP_MODEL": "tiny"}
    cases = bad_inputs(tmp_path)
    for name in ("nourl.csv", "fake.tar", "nourl.parquet"):
        result = recap("submit", name, "--job", f"j-{name}", cwd=tmp_path, env=env)
        assert result.returncode == 2, result.stderr
        assert name in error_line(result) and cases.get(name, "cannot read") in error_line(result)
    assert jobs_in(pg_url) == {}

    # A .gz cut short shows only when read to its end: the message says what was
    # registered and how to remove it.
    cut = recap("submit", "cut.txt.gz", "--job", "cut [1]", cwd=tmp_path, env=env)
    assert cut.returncode == 2
    line = error_line(cut)
    registered = jobs_in(pg_url)["cut [1]"]
    assert registered > 0
    assert "input cut.txt.gz: cannot read" in line
    assert f"{registered:,} items read before it were registered in job cut [1]" in line
    assert line.endswith("recap drop --job 'cut [1]' --yes")
    dropped = recap("drop", "--job", "cut [1]", "--yes", cwd=tmp_path, env=env)
    assert dropped.returncode == 0 and jobs_in(pg_url) == {}


# ----------------------------------------------------------------------------- item 7


def test_recap_exports_found_in_folders_and_globs_are_skipped_and_counted(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0fake\xff\xd9")
    pq.write_table(export_table([export_row(1), export_row(2)]), data / "captions.parquet")
    (data / "captions.jsonl").write_text(json.dumps(export_table([export_row(3)]).to_pylist()[0]) + "\n")
    shards = data / "captions"  # a folder export: its manifest marks it
    shards.mkdir()
    (shards / "_recap_export.json").write_text("{}")
    (shards / "part-00000.csv").write_text("url\nhttp://127.0.0.1/x.jpg\n")
    # The published Recap-DataComp-1B layout (no status, no job): an input like any other.
    pq.write_table(
        pa.table({"key": ["p"], "url": ["http://127.0.0.1/p.jpg"], "re_caption": ["c"]}), data / "dc.parquet"
    )

    stats = ReadStats()
    items = [i for batch in read_items([str(data)], ColumnOptions(), stats=stats) for i in batch]
    assert sorted(i.key for i in items) == ["a.jpg", hashlib.sha256(b"http://127.0.0.1/p.jpg").hexdigest()]
    assert stats.files == 2 and stats.files_skipped == {"(recap export)": 4}
    assert "skipped files: (recap export) 4" in stats.summary()

    globbed = ReadStats()
    assert not list(read_items([str(data / "captions.*")], ColumnOptions(), stats=globbed))
    assert globbed.files_skipped == {"(recap export)": 2}

    named = [i for batch in read_items([str(data / "captions.parquet")]) for i in batch]
    assert len(named) == 2  # a file named on the command line is read as given


def test_run_of_a_folder_does_not_caption_its_own_export(tmp_path, tiny_model_dir):
    folder = tmp_path / "images"
    folder.mkdir()
    for image in (REPO / "examples" / "images").iterdir():
        (folder / image.name).write_bytes(image.read_bytes())
    env = run_env(tmp_path, tiny_model_dir)
    for out in ("captions/", "captions/", "one.jsonl", "one.jsonl"):
        result = recap("run", ".", "--out", out, cwd=folder, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "bad_scheme" not in result.stdout
    rows = exported(folder / "one.jsonl")
    assert len(rows) == 6 and all(row["status"] == "done" for row in rows)
    assert "skipped files: (recap export)" in result.stderr
    assert list(jobs_in(env["RECAP_DATABASE_URL"]).values()) == [6]


# ----------------------------------------------------------------------------- item 9


def test_nul_bytes_in_urls_and_captions_read(tmp_path):
    (tmp_path / "u.txt").write_text("http://127.0.0.1/a.jpg\nhttp://127.0.0.1/b\x00.jpg\n")
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"url": "http://127.0.0.1/c.jpg", "text": "x\x00y", "id": "k\x001"})
        + "\n"
        + json.dumps({"url": "http://127.0.0.1/\x00", "text": "t", "id": "k2"})
        + "\n"
    )
    stats = ReadStats()
    items = [i for batch in read_items([str(tmp_path / "u.txt")], stats=stats) for i in batch]
    assert [i.url for i in items] == ["http://127.0.0.1/a.jpg"] and stats.rows_skipped == {"invalid_url": 1}
    stats = ReadStats()
    keyed = ColumnOptions(id_col="id")
    items = [i for batch in read_items([str(tmp_path / "c.jsonl")], keyed, stats=stats) for i in batch]
    assert [(i.key, i.org_caption) for i in items] == [("k1", "xy")]
    assert "skipped rows: invalid_url 1" in stats.summary()


def test_submit_with_nul_bytes_registers_the_rest_on_postgres(tmp_path, pg_url, redis_url):
    (tmp_path / "u.txt").write_text(
        "http://127.0.0.1:9/a.jpg\nhttp://127.0.0.1:9/b\x00.jpg\nhttp://127.0.0.1:9/c.jpg\n"
    )
    with open(tmp_path / "c.csv", "w", newline="") as f:
        f.write('url,text,id\nhttp://127.0.0.1:9/d.jpg,"cap\x00tion",k\x00d\nhttp://127.0.0.1:9/e.jpg,ok,e\n')
    env = {"RECAP_DATABASE_URL": pg_url, "RECAP_BROKER_URL": redis_url, "RECAP_MODEL": "tiny"}
    urls = recap("submit", "u.txt", "--job", "nul urls", cwd=tmp_path, env=env)
    assert urls.returncode == 0, urls.stderr[-3000:]
    assert "skipped rows: invalid_url 1" in urls.stderr and "job nul urls: 2 items" in urls.stdout
    captions = recap("submit", "c.csv", "--job", "nul captions", "--id-col", "id", cwd=tmp_path, env=env)
    assert captions.returncode == 0, captions.stderr[-3000:]
    engine = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT key, org_caption FROM items i JOIN jobs j ON j.id = i.job_id "
                "WHERE j.name = 'nul captions'"
            )
        ).all()
    engine.dispose()
    assert sorted(rows) == [("e", "ok"), ("kd", "caption")]


# ----------------------------------------------------------------------------- item 12

BAD_NAMES = {
    "": "is empty",
    " lead": "starts or ends with whitespace",
    "trail\t": "starts or ends with whitespace",
    "two\nlines": "holds a control character (U+000A)",
    "bell\x07": "holds a control character (U+0007)",
    "n" * 201: "has 201 characters",
    "x" * 500: "has 500 characters",
}
GOOD_NAMES = ["[/] \"quoted\" 'single' ünïcødé 名前 {x}", "n" * MAX_JOB_NAME, "a"]


@pytest.mark.parametrize("name", list(BAD_NAMES), ids=lambda n: repr(n[:12]))
def test_the_job_name_rule(name):
    assert BAD_NAMES[name] in job_name_problem(name)
    with pytest.raises(RecapError) as raised:
        check_job_name(name)
    assert "\n" not in str(raised.value)


def test_good_job_names_pass_the_rule():
    assert all(job_name_problem(name) is None for name in GOOD_NAMES)


def test_bad_job_names_are_refused_before_anything_is_written(tmp_path, pg_url):
    (tmp_path / "u.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    sqlite_env = {"RECAP_DATABASE_URL": f"sqlite:///{tmp_path}/recap.db", "RECAP_MODEL": "tiny"}
    pg_env = {"RECAP_DATABASE_URL": pg_url, "RECAP_MODEL": "tiny"}
    for name, says in BAD_NAMES.items():
        ran = recap("run", "u.txt", "--out", "o.parquet", "--job", name, cwd=tmp_path, env=sqlite_env)
        assert ran.returncode == 2 and says in error_line(ran)
        submitted = recap("submit", "u.txt", "--job", name, cwd=tmp_path, env=pg_env)
        assert submitted.returncode == 2 and says in error_line(submitted)
    assert not (tmp_path / "recap.db").exists() and jobs_in(pg_url) == {}


def test_every_other_character_makes_a_job_on_postgres(tmp_path, pg_url, redis_url):
    (tmp_path / "u.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    env = {"RECAP_DATABASE_URL": pg_url, "RECAP_BROKER_URL": redis_url, "RECAP_MODEL": "tiny"}
    for name in GOOD_NAMES:
        submitted = recap("submit", "u.txt", "--job", name, cwd=tmp_path, env=env)
        assert submitted.returncode == 0, submitted.stderr[-3000:]
    assert jobs_in(pg_url) == dict.fromkeys(GOOD_NAMES, 1)


# ----------------------------------------------------------------------------- item 15


class GatedImage:
    """A loopback server whose one image is answered only once the test opens the gate:
    a chunk held by a first run for exactly as long as the test needs."""

    def __init__(self):
        from tests.support.http_server import render_image

        body = render_image(64, 64, "JPEG", seed=7)
        gate = self.gate = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                gate.wait(240)
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/gated.jpg"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


def test_two_runs_of_one_job_both_export_every_item(tmp_path, image_server, tiny_model_dir):
    """The second run finishes its share while the first still holds a chunk (its image is
    held back): the second waits for it, and says so, rather than exporting without it."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        **run_env(tmp_path, tiny_model_dir, RECAP_CHUNK_SIZE="5", RECAP_FETCH_TIMEOUT_S="300"),
        "RECAP_STRAGGLER_GRACE_S": "600",  # the first run keeps its chunk while the image is held
    }
    gated = GatedImage()
    lines = [gated.url] + [image_server.url(f"/img/64x64.jpg?seed={1500 + i}") for i in range(1, 10)]
    (tmp_path / "urls.txt").write_text("\n".join(lines) + "\n")

    def start(out: str) -> subprocess.Popen:
        argv = [sys.executable, "-m", "recap.cli", "run", "urls.txt", "--out", out]
        with open(tmp_path / f"{out}.err", "w") as err:
            return subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err)

    def stderr_of(out: str) -> str:
        return (tmp_path / f"{out}.err").read_text()

    first = start("first.parquet")
    second = None
    try:
        db = sa.create_engine(env["RECAP_DATABASE_URL"])

        def first_holds_chunk_0() -> bool:
            try:
                with db.connect() as conn:
                    query = "SELECT count(*) FROM chunks WHERE chunk_no = 0 AND state = 'running'"
                    return bool(conn.execute(sa.text(query)).scalar())
            except sa.exc.OperationalError:
                return False

        wait_until(first_holds_chunk_0, 150, what="the first run holding chunk 0")
        db.dispose()
        second = start("second.parquet")
        wait_until(
            lambda: "waiting for" in stderr_of("second.parquet") or second.poll() is not None,
            150,
            what="the second run waiting for chunk 0",
        )
        gated.gate.set()
        assert second.wait(150) == 0, stderr_of("second.parquet")[-3000:]
        assert first.wait(150) == 0, stderr_of("first.parquet")[-3000:]
    finally:
        gated.close()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    said = stderr_of("second.parquet")
    assert "waiting for 5 items that another process is captioning (recap-local-" in said
    for out in ("first.parquet", "second.parquet"):
        rows = exported(tmp_path / out)
        assert sorted(row["url"] for row in rows) == sorted(lines), out
        assert all(row["status"] == "done" for row in rows)
