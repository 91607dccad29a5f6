"""Job operations with a real fleet (`recap worker` subprocesses, Redis, PostgreSQL, the
loopback image server, the tiny model): pause and resume, cancel, priorities, GPU time,
and migration 0005 from 0004 on a database holding a job."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
import sqlalchemy as sa

from recap.db import normalise_url
from tests.support.fleet import Fleet, fleet_env, wait_until
from tests.support.pg_cluster import free_port
from tests.test_fleet import good_urls, recap, write_urls

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def fleet(pg_url, redis_url, tiny_model_dir, tmp_path):
    env = fleet_env(
        pg_url,
        redis_url,
        tiny_model_dir,
        tmp_path / "cache",
        RECAP_CHUNK_SIZE="5",
        RECAP_MAX_QUEUED_CHUNKS="2",
        RECAP_LEASE_S="4",
        RECAP_BATCH_SIZE="5",
        RECAP_DB_RETRY_S="60",
    )
    fleet = Fleet(env=env, log_dir=tmp_path)
    yield fleet
    fleet.stop_all()


def query(pg_url: str, sql: str, **params) -> list[dict]:
    engine = sa.create_engine(normalise_url(pg_url))
    try:
        with engine.connect() as conn:
            return [dict(r) for r in conn.execute(sa.text(sql), params).mappings()]
    finally:
        engine.dispose()


def statuses(pg_url: str, job: str) -> dict[str, int]:
    rows = query(
        pg_url,
        "SELECT i.status, count(*) AS n FROM items i JOIN jobs j ON j.id = i.job_id "
        "WHERE j.name = :job GROUP BY i.status",
        job=job,
    )
    return {r["status"]: r["n"] for r in rows}


def full_status(fleet: Fleet, job: str, **env: str) -> dict:
    result = recap(fleet, "status", "--job", job, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def slow_urls(server, n: int) -> list[str]:
    """Images that take 0.3 s each to arrive: a job that lasts long enough to act on."""
    return [server.url(f"/slow?delay=0.3&seed={i}") for i in range(n)]


def submit(fleet: Fleet, tmp_path, urls: list[str], job: str, *args: str) -> None:
    result = recap(fleet, "submit", str(write_urls(tmp_path, urls, f"{job}.txt")), "--job", job, *args)
    assert result.returncode == 0, result.stderr


def test_a_paused_job_waits_while_another_advances_and_resume_finishes_it(
    fleet, control_app, pg_url, image_server, tmp_path
):
    metrics_port = free_port()
    submit(fleet, tmp_path, good_urls(image_server, 20), "held")  # its chunks are queued now
    paused = recap(fleet, "pause", "--job", "held")
    assert paused.returncode == 0, paused.stderr
    submit(fleet, tmp_path, good_urls(image_server, 15, start=100), "other")
    fleet.start_worker(extra_env={"RECAP_METRICS_PORT": str(metrics_port)})
    fleet.wait_ready(control_app, 1)

    wait_until(lambda: statuses(pg_url, "other") == {"done": 15}, 120, what="the other job")
    assert statuses(pg_url, "held") == {"pending": 20}  # its queued messages were skipped
    held = full_status(fleet, "held")
    assert (held["state"], held["items"]["pending"]) == ("paused", 20)
    chunks = query(
        pg_url,
        "SELECT c.state, c.attempts FROM chunks c JOIN jobs j ON j.id = c.job_id WHERE j.name = 'held'",
    )
    assert all(c["attempts"] == 0 and c["state"] == "pending" for c in chunks), chunks

    resumed = recap(fleet, "resume", "--job", "held")
    assert resumed.returncode == 0, resumed.stderr
    wait_until(lambda: statuses(pg_url, "held") == {"done": 20}, 120, what="the resumed job")
    held = full_status(fleet, "held", RECAP_GPU_HOUR_COST="3.6")
    assert (held["state"], held["items"]["pending"], held["items"]["done"]) == ("running", 0, 20)

    # GPU time: the job's engine seconds are the engine time its workers logged per item
    # (infer_ms, each caption's share of its batch), and what the worker's Prometheus
    # counter says, series by series.
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    for job in ("held", "other"):
        logged = query(
            pg_url,
            "SELECT sum(i.infer_ms) / 1000.0 AS s FROM items i JOIN jobs j ON j.id = i.job_id "
            "WHERE j.name = :job",
            job=job,
        )[0]["s"]
        payload = full_status(fleet, job, RECAP_GPU_HOUR_COST="3.6")
        assert logged > 0 and payload["engine_seconds"] == pytest.approx(logged, rel=1e-6, abs=1e-3)
        assert payload["gpu_hours"] * 3600 == pytest.approx(logged, rel=1e-6, abs=1e-3)
        assert payload["cost_so_far"] == pytest.approx(payload["engine_seconds"] / 1000, abs=1e-3)
        assert payload["cost_to_finish"] == 0
        exported = re.search(rf'recap_engine_seconds_total{{job="{job}"}} (\S+)', body)
        assert exported and float(exported.group(1)) == pytest.approx(logged, rel=1e-6, abs=1e-3)


def test_cancel_keeps_done_items_and_ends_pending_ones_cancelled(
    fleet, control_app, pg_url, image_server, tmp_path
):
    submit(fleet, tmp_path, slow_urls(image_server, 150), "ended")
    fleet.start_worker()
    fleet.wait_ready(control_app, 1)
    wait_until(lambda: statuses(pg_url, "ended").get("done", 0) >= 10, 120, what="progress")

    cancelled = recap(fleet, "cancel", "--job", "ended")
    assert cancelled.returncode == 0, cancelled.stderr
    wait_until(
        lambda: not query(pg_url, "SELECT 1 FROM chunks WHERE state IN ('running', 'queued', 'pending')"),
        60,
        what="the running chunk to stop",
    )
    counts = statuses(pg_url, "ended")
    assert "pending" not in counts and counts["cancelled"] >= 20 and counts["done"] >= 10, counts
    payload = full_status(fleet, "ended")
    assert payload["state"] == "cancelled"
    assert payload["items"]["cancelled"] == counts["cancelled"]
    assert payload["items"]["pending"] == 0
    assert payload["items"]["done"] == counts["done"]
    plain = json.loads(recap(fleet, "status", "--job", "ended", "--json").stdout)
    assert set(plain) >= {"job", "model", "items", "state", "gpu_hours"}  # one documented shape

    out = tmp_path / "ended.jsonl"
    exported = recap(fleet, "export", "--job", "ended", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == counts["done"] and all(r["re_caption"] for r in rows)


def test_a_high_priority_job_overtakes_a_large_one_within_one_chunk(
    fleet, control_app, pg_url, image_server, tmp_path
):
    fleet.env["RECAP_MAX_QUEUED_CHUNKS"] = "20"  # the queue holds 100 of the crawl's items
    submit(fleet, tmp_path, slow_urls(image_server, 150), "crawl")
    fleet.start_worker()
    fleet.wait_ready(control_app, 1)
    wait_until(lambda: statuses(pg_url, "crawl").get("done", 0) >= 5, 120, what="the crawl to start")

    submit(fleet, tmp_path, good_urls(image_server, 5, start=500), "rush", "--priority", "5")
    crawl_at_submit = statuses(pg_url, "crawl").get("pending", 0)
    wait_until(lambda: statuses(pg_url, "rush") == {"done": 5}, 120, what="the rush job")
    crawl = statuses(pg_url, "crawl")
    # The worker took the rush job's chunk next, not the 20 crawl chunks queued before it:
    # at most the chunk in flight (and one a finisher ends) of the crawl ran meanwhile.
    assert crawl_at_submit - crawl.get("pending", 0) <= 10, (crawl_at_submit, crawl)
    assert full_status(fleet, "rush")["priority"] == 5
    table = recap(fleet, "status", env={"COLUMNS": "120"}).stdout
    assert table.index("rush") < table.index("crawl")  # shown in the order the fleet serves them
    wait_until(lambda: statuses(pg_url, "crawl") == {"done": 150}, 180, what="the crawl to finish")
    assert not query(pg_url, "SELECT 1 FROM chunks WHERE state <> 'done'")


def test_migration_0005_from_0004_on_a_database_holding_a_job(pg_url):
    from alembic import command
    from recap.db import alembic_config

    config = alembic_config(pg_url)
    command.downgrade(config, "0004")  # the fixture's database is at head: back to 0004's schema
    engine = sa.create_engine(normalise_url(pg_url))
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO jobs (name, model, prompt, generation, chunk_size) "
                "VALUES ('old', 'tiny', 'p', '{}', 5)"
            )
        )
        job_id = conn.execute(sa.text("SELECT id FROM jobs")).scalar_one()
        conn.execute(sa.text(f"CREATE TABLE items_p{job_id} PARTITION OF items FOR VALUES IN ({job_id})"))
        conn.execute(
            sa.text(
                "INSERT INTO chunks (job_id, chunk_no, state, item_count, done_count, failed_count, "
                "attempts) VALUES (:j, 0, 'pending', 1, 0, 0, 0)"
            ),
            {"j": job_id},
        )
        conn.execute(
            sa.text(
                "INSERT INTO items (job_id, key, chunk_no, url, status, attempts) "
                "VALUES (:j, 'k', 0, 'http://x/', 'pending', 0)"
            ),
            {"j": job_id},
        )
    engine.dispose()
    assert "priority" not in {
        c["column_name"]
        for c in query(pg_url, "SELECT column_name FROM information_schema.columns WHERE table_name = 'jobs'")
    }
    command.upgrade(config, "0005")
    job = query(pg_url, "SELECT state, priority, engine_seconds, finished_at FROM jobs")[0]
    assert job == {"state": "running", "priority": 0, "engine_seconds": 0.0, "finished_at": None}
    assert query(pg_url, "SELECT cancelled_count FROM chunks") == [{"cancelled_count": 0}]
    command.downgrade(config, "0004")
    command.upgrade(config, "head")

    from recap.store import Store

    store = Store(pg_url)
    status = store.job_status(store.get_job("old"))
    assert (status.items.pending, status.state.value, status.priority) == (1, "running", 0)
