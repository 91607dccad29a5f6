"""`recap forget` and the blocklist, on SQLite and PostgreSQL: removed items lose their
captions and metadata, exports and report samples no longer show them, and later `submit`
and `run` refuse blocked domains before any request and blocked images before captioning."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import urllib.request

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from producer.blocklist import domain_of, read_selection
from recap.errors import ErrorClass, RecapError
from recap.generation import GenerationSettings
from recap.records import InputItem, ItemResult, Rejected
from recap.states import ItemStatus
from recap.store.forget import BLOCKED, REMOVED, BlockKind, Blocklist
from tests.support.fleet import wait_until
from tests.test_fleet import finished, fleet, recap, write_urls  # noqa: F401  (fixtures used)
from tests.test_fleet import items as fleet_items
from tests.test_run import run_env

pytestmark = pytest.mark.timeout(300)


def _job(store, name="j"):
    return store.ensure_job(name, "tiny", "describe", GenerationSettings.from_json({"max_new_tokens": 8}), 4)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


ITEMS = [
    InputItem("a", "http://img.example.com/a.jpg", "a cat"),
    InputItem("b", "http://other.org/b.jpg", "a dog"),
    InputItem("c", "http://other.org/c.jpg", "a cow"),
    InputItem("d", "http://other.org/d.jpg", "a hen"),
    InputItem("e", "http://other.org/e.jpg", "an owl"),
]


def _captioned(store, name="j"):
    job = _job(store, name)
    store.register_items(job, [ITEMS])
    results = [
        ItemResult(i.key, ItemStatus.DONE, caption=f"new {i.key}", sha256=_sha(i.key), width=9, height=9)
        for i in ITEMS
    ]
    store.write_results(job.id, 0, results[:4])  # chunks of 4
    store.write_results(job.id, 1, results[4:])
    return job


def _done_keys(store, job) -> set[str]:
    return {k for batch in store.iter_items(job, [ItemStatus.DONE]) for k in batch.key}


@pytest.mark.parametrize(
    ("kind", "line", "removed"),
    [
        (BlockKind.URL_HASH, "http://other.org/b.jpg", "b"),
        (BlockKind.KEY, "c", "c"),
        (BlockKind.SHA256, _sha("d").upper(), "d"),
        (BlockKind.DOMAIN, "https://EXAMPLE.com/whatever", "a"),  # a subdomain is blocked too
    ],
)
def test_forget_removes_items_from_every_job_and_keeps_only_what_refuses_them(
    store, tmp_path, kind, line, removed
):
    jobs = [_captioned(store, "j1"), _captioned(store, "j2")]
    listing = tmp_path / "forget.txt"
    listing.write_text(f"# removal requests\n\n{line}\n")
    selection, values = read_selection(listing, kind)
    store.block(kind, values, "test")

    assert [(f.job, f.items) for f in store.forget(selection, jobs)] == [("j1", 1), ("j2", 1)]

    for job in jobs:
        assert _done_keys(store, job) == set("abcde") - {removed}
        assert removed not in {s.key for s in store.sample_items(job, 10, 5)}  # `recap report`
        status = store.job_status(job)
        assert (status.items.done, status.items.failed) == (4, 1)
        assert status.errors == {"opted_out": 1}
    with store.engine.connect() as conn:
        row = conn.execute(sa.text(f"SELECT * FROM items WHERE key = '{removed}'")).mappings().first()
    assert (row["status"], row["error_class"], row["error"], row["url"]) == (
        "failed",
        "opted_out",
        REMOVED,
        "",
    )
    for column in ("caption", "org_caption", "sha256", "width", "height", "flags", "provenance_id"):
        assert row[column] is None, column
    # The removed image's hash is kept: the same image under another address is refused.
    assert store.blocklist().blocks_image(_sha(removed))
    if kind == BlockKind.URL_HASH:
        assert "http://other.org/b.jpg" not in str(store.blocklist())  # only its hash is kept

    # Forgetting again changes nothing; registering the same input again adds nothing.
    assert [f.items for f in store.forget(selection, jobs)] == [0, 0]
    assert store.register_items(jobs[0], [ITEMS]).new == 0


def test_registration_refuses_blocked_items_before_any_request(store, monkeypatch):
    import producer.readers
    from producer.jobs import register_inputs

    store.block(BlockKind.DOMAIN, ["example.com"], "test")
    store.block(BlockKind.SHA256, [_sha("given")], "test")
    job = _job(store)
    items = [*ITEMS, InputItem("g", "http://other.org/g.jpg", None, _sha("given").upper())]
    monkeypatch.setattr(producer.readers, "read_items", lambda inputs, columns, stats=None: iter([items]))
    register_inputs(store, job, ["unused"], None)
    status = store.job_status(job)
    assert (status.items.pending, status.items.failed, status.errors) == (4, 2, {"opted_out": 2})
    pending = {i.key for n in (0, 1) for i in store.pending_items(job.id, n)}
    assert pending == set("bcde")


def test_read_selection_normalises_and_checks(tmp_path):
    assert domain_of("*.Bücher.example.") == "xn--bcher-kva.example"
    assert domain_of("user@Host.ORG:8080/x") == "host.org"
    bad = tmp_path / "bad.txt"
    bad.write_text("not-a-hash\n")
    with pytest.raises(RecapError, match="not a sha256"):
        read_selection(bad, BlockKind.SHA256)
    bad.write_text("# nothing\n")
    with pytest.raises(RecapError, match="lists nothing"):
        read_selection(bad, BlockKind.KEY)


# -- end to end: `recap run`, `recap forget`, `recap export`, a later `recap run` -------------


def _recap(env, *args):
    result = subprocess.run(
        [sys.executable, "-m", "recap.cli", *args], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _items(url):
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT key, url, status, error_class, error, caption, sha256 FROM items")
        )
        found = {r.key: r for r in rows}
    engine.dispose()
    return found


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_forget_then_a_later_run_refuses_blocked_domains_and_images(
    request, database, tmp_path, image_server, tiny_model_dir
):
    url = request.getfixturevalue("sqlite_url" if database == "sqlite" else "pg_url")
    env = run_env(tmp_path, tiny_model_dir, RECAP_DATABASE_URL=url)
    first = [image_server.url(f"/img/{50 + i}x{41 + i}.jpg?seed={i}") for i in range(6)]
    (tmp_path / "first.txt").write_text("\n".join(first) + "\n")
    _recap(env, "run", str(tmp_path / "first.txt"), "--out", str(tmp_path / "early.parquet"))
    items = _items(url)
    assert all(r.status == "done" for r in items.values())
    by_url = {r.url: r for r in items.values()}
    gone_by_url, gone_by_hash = by_url[first[0]], by_url[first[1]]

    (tmp_path / "urls.txt").write_text(first[0] + "\n")
    (tmp_path / "hashes.txt").write_text(gone_by_hash.sha256 + "\n")
    (tmp_path / "domains.txt").write_text("localhost\n")
    said = _recap(env, "forget", "--urls", str(tmp_path / "urls.txt"))
    assert "removed 1 item" in said and "cannot be recalled" in said
    said = _recap(env, "forget", "--sha256", str(tmp_path / "hashes.txt"))
    assert "removed 1 item" in said
    said = _recap(env, "forget", "--domains", str(tmp_path / "domains.txt"))
    assert "removed 0 items" in said

    _recap(
        env, "export", "--job", _job_name(url), "--out", str(tmp_path / "after.parquet"), "--status", "all"
    )
    table = pq.read_table(tmp_path / "after.parquet").to_pylist()
    shown = {row["key"]: row for row in table}
    for gone in (gone_by_url, gone_by_hash):
        row = shown[gone.key]  # the key stays (so the input is not registered again), nothing else
        assert (row["status"], row["error_class"], row["url"], row["re_caption"]) == (
            "failed",
            "opted_out",
            "",
            None,
        )
        assert row["sha256"] is None and row["org_caption"] is None
    assert sum(1 for row in table if row["status"] == "done") == 4

    # A later run: a blocked domain is never requested, a blocked image is refused after
    # download (the same bytes under another URL), before captioning; the rest is captioned.
    blocked_domain = [f"http://localhost:{image_server.port}/img/9{i}x7{i}.jpg" for i in range(3)]
    same_image = first[1] + "&copy=1"
    fresh = image_server.url("/img/71x59.jpg?seed=9")
    (tmp_path / "second.txt").write_text("\n".join([*blocked_domain, same_image, fresh]) + "\n")
    before = image_server.hits.copy()
    _recap(env, "run", str(tmp_path / "second.txt"), "--out", str(tmp_path / "second.parquet"))
    for path in (f"/img/9{i}x7{i}.jpg" for i in range(3)):
        assert image_server.hits[path] == before[path] == 0
    assert image_server.hits["/img/51x42.jpg"] > before["/img/51x42.jpg"]  # downloaded, then refused
    second = {r.key: r for r in _items(url).values() if r.key not in items}
    refused = [r for r in second.values() if r.status == "failed"]
    assert len(refused) == 4 and all(r.error_class == "opted_out" for r in refused)
    assert all(r.caption is None and r.sha256 is None for r in refused)
    assert {r.error for r in refused} == {BLOCKED}
    assert [r.status for r in second.values()].count("done") == 1


def _job_name(url):
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        name = conn.execute(sa.text("SELECT name FROM jobs ORDER BY id LIMIT 1")).scalar_one()
    engine.dispose()
    return name


def test_forgetting_a_cancelled_or_pending_item_keeps_the_counters_true(store, tmp_path):
    job = _job(store)
    store.register_items(job, [ITEMS])
    store.cancel_pending(job)
    selection, _ = read_selection(_listing(tmp_path, "a\nb\n"), BlockKind.KEY)
    assert store.forget(selection, [job])[0].items == 2
    other = _job(store, "pending")
    store.register_items(other, [ITEMS])
    assert store.forget(selection, [other])[0].items == 2
    for j, (cancelled, pending) in ((job, (3, 0)), (other, (0, 3))):
        status = store.job_status(j)
        assert (status.items.failed, status.items.pending, status.errors) == (2, pending, {"opted_out": 2})
        with store.engine.connect() as conn:
            counters = conn.execute(
                sa.text(
                    "SELECT sum(failed_count), sum(cancelled_count), sum(done_count) "
                    "FROM chunks WHERE job_id = :j"
                ),
                {"j": j.id},
            ).one()
        assert tuple(counters) == (2, cancelled, 0)


def _listing(tmp_path, text):
    path = tmp_path / "listing.txt"
    path.write_text(text)
    return path


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_migration_0006_adds_the_blocklist_to_a_schema_holding_jobs(request, database):
    from alembic import command
    from recap.db import alembic_config
    from recap.store import Store

    url = request.getfixturevalue("sqlite_url" if database == "sqlite" else "pg_url")
    command.downgrade(alembic_config(url), "0005")
    store = Store(url)
    job = _job(store)
    store.register_items(job, [ITEMS])
    with pytest.raises(sa.exc.DBAPIError):
        store.blocklist()

    command.upgrade(alembic_config(url), "head")
    assert store.job_status(job).items.pending == 5
    store.block(BlockKind.DOMAIN, ["example.com"], "first")
    store.block(BlockKind.DOMAIN, ["example.com", "example.org"], "again")
    assert store.blocklist().domains == {"example.com", "example.org"}
    with store.engine.connect() as conn:
        reasons = dict(conn.execute(sa.text("SELECT value, reason FROM blocklist")).all())
    assert reasons == {"example.com": "first", "example.org": "again"}


# -- the worker's own check, and a fleet on PostgreSQL -------------------------------------


def test_the_loader_refuses_blocked_domains_unrequested_and_blocked_images_uncaptioned(image_server):
    from recap.records import ImageSpec
    from recap.settings import Settings
    from workers.loader import ImageLoader

    image = image_server.url("/img/87x53.jpg?seed=3")
    with urllib.request.urlopen(image) as response:
        image_sha = hashlib.sha256(response.read()).hexdigest()
    unrequested = f"http://localhost:{image_server.port}/img/89x57.jpg"
    blocklist = Blocklist(domains=frozenset({"localhost"}), sha256s=frozenset({image_sha}))
    before = image_server.hits.copy()
    items = [InputItem("domain", unrequested), InputItem("image", image + "&again=1")]
    with ImageLoader(Settings(), ImageSpec(size=32)) as loader:
        results = {r.item.key: r for r in loader.load(items, blocklist)}
    assert all(isinstance(r, Rejected) for r in results.values())
    assert {r.failure.error_class for r in results.values()} == {ErrorClass.OPTED_OUT}
    assert {r.failure.message for r in results.values()} == {BLOCKED}
    assert image_server.hits["/img/89x57.jpg"] == before["/img/89x57.jpg"] == 0
    assert image_server.hits["/img/87x53.jpg"] == before["/img/87x53.jpg"] + 1  # downloaded, then refused
    assert results["image"].sha256 is None


def test_a_fleet_worker_refuses_blocked_items_of_a_submitted_job(request, pg_url, image_server, tmp_path):
    workers, app = request.getfixturevalue("fleet"), request.getfixturevalue("control_app")
    image = image_server.url("/img/93x61.jpg?seed=4")
    with urllib.request.urlopen(image) as response:
        image_sha = hashlib.sha256(response.read()).hexdigest()
    forget_env = {"RECAP_DATABASE_URL": pg_url}
    hashes, domains = _listing(tmp_path, image_sha + "\n"), tmp_path / "domains.txt"
    domains.write_text("localhost\n")
    assert recap(workers, "forget", "--sha256", str(hashes), env=forget_env).returncode == 0
    assert recap(workers, "forget", "--domains", str(domains), env=forget_env).returncode == 0

    unrequested = [f"http://localhost:{image_server.port}/img/9{i}x6{i}.jpg" for i in range(3)]
    fresh = [image_server.url(f"/img/{60 + i}x{45 + i}.jpg?seed=7") for i in range(4)]
    urls = write_urls(tmp_path, [*unrequested, image + "&copy=1", *fresh])
    before = image_server.hits.copy()
    workers.start_worker()
    workers.wait_ready(app, 1)
    submitted = recap(workers, "submit", str(urls), "--job", "blocked")
    assert submitted.returncode == 0, submitted.stderr
    wait_until(lambda: finished(pg_url), 180, what="every item to finish")

    rows = fleet_items(pg_url).values()
    assert sorted(r["status"] for r in rows) == ["done"] * 4 + ["failed"] * 4
    refused = [r for r in rows if r["status"] == "failed"]
    assert {r["error_class"] for r in refused} == {"opted_out"}
    assert all(r["caption"] is None for r in refused)
    for i in range(3):
        assert image_server.hits[f"/img/9{i}x6{i}.jpg"] == before[f"/img/9{i}x6{i}.jpg"] == 0
    assert image_server.hits["/img/93x61.jpg"] == before["/img/93x61.jpg"] + 1  # the worker's download
