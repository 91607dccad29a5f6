"""The fleet with real processes: `recap worker` subprocesses (Celery prefork), Redis,
PostgreSQL, a loopback image server and the tiny model. Each test asserts the items table."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa

from recap.generation import GenerationSettings
from tests.support.fleet import REPO, Fleet, fleet_env, wait_until
from tests.support.pg_cluster import free_port

pytestmark = pytest.mark.timeout(240)


def good_urls(server, n, start=0):
    return [server.url(f"/img/{40 + i % 23}x{36 + i % 17}.jpg?seed={start + i}") for i in range(n)]


def bad_urls(server):
    return [
        server.url("/status/404"),
        server.url("/html"),
        server.url("/truncated.jpg"),
        server.url("/tiny.png"),
        server.url("/status/500"),
    ]


@pytest.fixture
def fleet(pg_url, redis_url, tiny_model_dir, tmp_path):
    env = fleet_env(
        pg_url,
        redis_url,
        tiny_model_dir,
        tmp_path / "cache",
        RECAP_CHUNK_SIZE="20",
        RECAP_MAX_QUEUED_CHUNKS="4",
        RECAP_LEASE_S="4",
        RECAP_BATCH_SIZE="8",
        RECAP_DB_RETRY_S="60",
    )
    fleet = Fleet(env=env, log_dir=tmp_path)
    yield fleet
    fleet.stop_all()


def recap(fleet: Fleet, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recap.cli", *args],
        env={**fleet.env, **(env or {})},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def write_urls(tmp_path, urls, name="urls.txt"):
    path = tmp_path / name
    path.write_text("\n".join(urls) + "\n")
    return path


def items(pg_url):
    from recap.db import normalise_url

    engine = sa.create_engine(normalise_url(pg_url))
    with engine.connect() as conn:
        rows = (
            conn.execute(sa.text("SELECT key, status, error_class, caption, attempts, worker FROM items"))
            .mappings()
            .all()
        )
    engine.dispose()
    return {r["key"]: dict(r) for r in rows}


def chunk_rows(pg_url):
    from recap.db import normalise_url

    engine = sa.create_engine(normalise_url(pg_url))
    with engine.connect() as conn:
        rows = (
            conn.execute(sa.text("SELECT chunk_no, state, attempts, last_error FROM chunks")).mappings().all()
        )
    engine.dispose()
    return {r["chunk_no"]: dict(r) for r in rows}


def done_count(db_url) -> int:
    return sum(r["status"] == "done" for r in items(db_url).values())


def submit_and_wait_for_progress(fleet, app, db_url, tmp_path, urls, job, at_least=10) -> None:
    """One worker, a submitted job, and some items done: the moment to break something."""
    path = write_urls(tmp_path, urls)
    fleet.start_worker()
    fleet.wait_ready(app, 1)
    submitted = recap(fleet, "submit", str(path), "--job", job)
    assert submitted.returncode == 0, submitted.stderr
    wait_until(lambda: done_count(db_url) >= at_least, 120, what=f"progress in job {job}")


def slow_urls(server, n):
    return [server.url(f"/slow?delay=0.05&seed={i}") for i in range(n)]


def finished(pg_url):
    rows = items(pg_url)
    return rows and all(r["status"] in ("done", "failed") for r in rows.values())


def test_two_workers_caption_every_item_exactly_once(fleet, control_app, pg_url, image_server, tmp_path):
    urls = good_urls(image_server, 295) + bad_urls(image_server)
    path = write_urls(tmp_path, urls)
    fleet.start_worker()
    fleet.start_worker()
    fleet.wait_ready(control_app, 2)

    submitted = recap(fleet, "submit", str(path), "--job", "two")
    assert submitted.returncode == 0, submitted.stderr
    wait_until(lambda: finished(pg_url), 180, what="every item to finish")

    rows = items(pg_url)
    assert len(rows) == 300
    assert all(r["attempts"] == 1 for r in rows.values()), "an item was processed twice"
    done = [r for r in rows.values() if r["status"] == "done"]
    assert len(done) == 295 and all(r["caption"] for r in done)
    failed = sorted(r["error_class"] for r in rows.values() if r["status"] == "failed")
    assert failed == ["decode_error", "http_4xx", "http_5xx", "not_image", "too_small"]
    assert len({r["worker"] for r in done}) == 2, "both workers should have worked"

    status = recap(fleet, "status", "--job", "two", "--json")
    import json

    payload = json.loads(status.stdout)
    assert payload["items"] == {"total": 300, "pending": 0, "done": 295, "failed": 5, "cancelled": 0}
    assert payload["chunks"]["done"] == 15
    assert sum(payload["errors"].values()) == 5

    again = recap(fleet, "submit", str(path), "--job", "two")
    assert again.returncode == 0, again.stderr
    time.sleep(2)
    assert items(pg_url) == rows


def test_killed_worker_its_chunk_finishes_elsewhere(fleet, control_app, pg_url, image_server, tmp_path):
    submit_and_wait_for_progress(
        fleet, control_app, pg_url, tmp_path, slow_urls(image_server, 120), "kill", 20
    )
    fleet.kill(fleet.procs[0])
    before = {k: r["caption"] for k, r in items(pg_url).items() if r["status"] == "done"}
    assert 0 < len(before) < 120

    fleet.start_worker()  # nobody runs submit or reconcile
    wait_until(lambda: finished(pg_url), 180, what="the run to finish after the kill")
    rows = items(pg_url)
    assert len(rows) == 120 and all(r["status"] == "done" for r in rows.values())
    assert all(rows[k]["caption"] == caption for k, caption in before.items())


def test_redis_emptied_mid_run_the_fleet_refeeds_itself(
    fleet, control_app, pg_url, redis_url, image_server, tmp_path
):
    import redis

    submit_and_wait_for_progress(fleet, control_app, pg_url, tmp_path, slow_urls(image_server, 160), "flush")
    redis.Redis.from_url(redis_url).flushdb()

    wait_until(lambda: finished(pg_url), 180, what="the run to finish after FLUSHDB")
    rows = items(pg_url)
    assert len(rows) == 160 and all(r["status"] == "done" for r in rows.values())


def test_the_same_chunk_delivered_twice_is_worked_once(fleet, control_app, pg_url, image_server, tmp_path):
    from recap.queue import CAPTION_TASK, queue_name
    from recap.records import InputItem
    from recap.store import Store

    model = fleet.env["RECAP_MODEL"]
    store = Store(pg_url)
    job = store.ensure_job("twice", model, "describe", GenerationSettings.from_json({}), 50)
    store.register_items(
        job, [[InputItem(f"k{i}", image_server.url(f"/slow?delay=0.1&seed={i}")) for i in range(30)]]
    )
    fleet.start_worker(extra_env={"RECAP_FEED_INTERVAL_S": "600"})
    fleet.start_worker(extra_env={"RECAP_FEED_INTERVAL_S": "600"})
    fleet.wait_ready(control_app, 2)
    for _ in range(2):
        control_app.send_task(CAPTION_TASK, kwargs={"job_id": job.id, "chunk_no": 0}, queue=queue_name(model))

    wait_until(lambda: finished(pg_url), 120, what="the chunk to finish")
    rows = items(pg_url)
    assert all(r["status"] == "done" and r["attempts"] == 1 for r in rows.values())
    assert len({r["worker"] for r in rows.values()}) == 1
    wait_until(lambda: "skipped: " in fleet.logs(), 30, what="the second delivery to be skipped")


def test_a_chunk_whose_task_always_crashes_fails_and_the_rest_finishes(
    fleet, control_app, pg_url, image_server, tmp_path
):
    path = write_urls(tmp_path, good_urls(image_server, 60))
    fleet.start_worker(app="tests.support.fault_app", extra_env={"RECAP_TEST_POISON_CHUNKS": "1"})
    fleet.wait_ready(control_app, 1)
    assert recap(fleet, "submit", str(path), "--job", "poison").returncode == 0

    def settled():
        chunks = chunk_rows(pg_url)
        return len(chunks) == 3 and all(c["state"] in ("done", "failed") for c in chunks.values())

    wait_until(settled, 150, what="chunks to settle")
    chunks = chunk_rows(pg_url)
    assert chunks[1]["state"] == "failed"
    assert "gave up after 3 attempts" in chunks[1]["last_error"]
    assert "injected crash" in chunks[1]["last_error"]
    assert chunks[0]["state"] == chunks[2]["state"] == "done"
    status = recap(fleet, "status", "--job", "poison", "--json")
    assert '"failed": 1' in status.stdout.replace("\n", " ") or status.returncode == 0


def test_pickled_messages_are_refused(fleet, control_app, pg_url, tiny_model_dir):
    from kombu import Connection, Exchange, Producer

    from recap.queue import CAPTION_TASK, queue_name
    from recap.records import InputItem
    from recap.store import Store

    store = Store(pg_url)
    job = store.ensure_job("pickle", "some-other-model", "describe", GenerationSettings.from_json({}), 10)
    store.register_items(job, [[InputItem("k", "http://127.0.0.1:9/x.jpg")]])
    fleet.start_worker()
    fleet.wait_ready(control_app, 1)
    queue = queue_name(str(tiny_model_dir))
    with Connection(fleet.env["RECAP_BROKER_URL"]) as conn:
        producer = Producer(conn.channel(), exchange=Exchange(queue, type="direct"))
        producer.publish(
            {"job_id": job.id, "chunk_no": 0},
            routing_key=queue,
            serializer="pickle",
            headers={"task": CAPTION_TASK, "id": "pickled-1", "lang": "py", "argsrepr": "", "kwargsrepr": ""},
            declare=[],
        )
    wait_until(lambda: "pickle" in fleet.logs().lower(), 60, what="the worker to refuse the pickle")
    assert chunk_rows(pg_url)[0]["attempts"] == 0, "a pickled message must never run"
    assert control_app.control.ping(timeout=2.0), "the worker must stay alive"


@pytest.mark.parametrize("url", [None, "sqlite:///x.db"])
@pytest.mark.parametrize(
    "command",
    [
        ["submit", "x.txt", "--job", "j"],
        ["worker"],
        ["reconcile"],
        ["retry", "--job", "j", "--errors", "timeout"],
    ],
)
def test_fleet_commands_need_postgres(command, url, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RECAP_DATABASE_URL"}
    if url:
        env["RECAP_DATABASE_URL"] = url
    result = subprocess.run(
        [sys.executable, "-m", "recap.cli", *command],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "PostgreSQL" in lines[0], result.stderr


def test_postgres_restarted_mid_run_workers_wait_and_finish(fleet, control_app, image_server, tmp_path):
    from recap.db import upgrade
    from tests.support.pg_cluster import ThrowawayCluster

    if not ThrowawayCluster.available():
        pytest.skip("initdb/pg_ctl are not installed here")
    cluster = ThrowawayCluster()
    try:
        cluster.init()
        cluster.start()
        upgrade(cluster.url)
        fleet.env["RECAP_DATABASE_URL"] = cluster.url
        submit_and_wait_for_progress(
            fleet, control_app, cluster.url, tmp_path, slow_urls(image_server, 120), "pgdown"
        )
        cluster.stop()
        time.sleep(4)  # workers keep fetching and captioning, and wait to write
        cluster.start()
        wait_until(lambda: finished(cluster.url), 180, what="the run to finish after the restart")
        rows = items(cluster.url)
        assert len(rows) == 120 and all(r["status"] == "done" for r in rows.values())
        assert all(r["attempts"] == 1 for r in rows.values())
    finally:
        fleet.stop_all()
        from recap.db import get_engine, normalise_url

        get_engine(normalise_url(cluster.url)).dispose()
        cluster.destroy()


def test_sigterm_finishes_the_batch_gives_the_chunk_back_and_exits(
    fleet, control_app, pg_url, image_server, tmp_path
):
    import signal

    urls = [image_server.url(f"/slow?delay=0.1&seed={i}") for i in range(80)]
    path = write_urls(tmp_path, urls)
    first = fleet.start_worker(extra_env={"RECAP_CHUNK_SIZE": "80", "RECAP_LEASE_S": "600"})
    fleet.wait_ready(control_app, 1)
    assert recap(fleet, "submit", str(path), "--job", "term", env={"RECAP_CHUNK_SIZE": "80"}).returncode == 0
    wait_until(
        lambda: sum(r["status"] == "done" for r in items(pg_url).values()) >= 8, 120, what="the first batches"
    )
    started = time.monotonic()
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=60)
    assert time.monotonic() - started < 30, "a stopping worker must exit within the grace period"
    chunk = chunk_rows(pg_url)[0]
    assert chunk["state"] in ("pending", "queued"), chunk  # the lease was given back at once
    assert chunk["attempts"] == 0, "a graceful stop is not a failed attempt"

    fleet.start_worker(extra_env={"RECAP_LEASE_S": "600"})
    wait_until(lambda: finished(pg_url), 120, what="another worker to finish the chunk")
    rows = items(pg_url)
    assert len(rows) == 80 and all(r["status"] == "done" and r["attempts"] == 1 for r in rows.values())
    assert len({r["worker"] for r in rows.values()}) == 2


def test_flower_refuses_anonymous_api_calls_and_shows_the_workers(fleet, control_app):
    import base64
    import urllib.error
    import urllib.request

    port = free_port()
    fleet.start_worker()
    nodes = fleet.wait_ready(control_app, 1)
    log = open(fleet.log_dir / "flower.log", "wb")  # noqa: SIM115  (Flower writes it while alive)
    flower = subprocess.Popen(
        [sys.executable, "-m", "recap.cli", "flower", "--port", str(port)],
        env={**fleet.env, "RECAP_FLOWER_USER": "ops", "RECAP_FLOWER_PASSWORD": "flower-secret-1"},
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    fleet.procs.append(flower)
    flower.log_path = fleet.log_dir / "flower.log"
    url = f"http://127.0.0.1:{port}/api/workers?refresh=1"

    def get(auth: str | None):
        request = urllib.request.Request(url)
        if auth:
            request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except OSError:
            return None, ""

    wait_until(lambda: get(None)[0] is not None, 60, what="Flower to listen")
    assert get(None)[0] == 401
    assert get("ops:wrong")[0] == 401
    _, body = wait_until(
        lambda: (lambda r: r if r[0] == 200 and nodes[0] in r[1] else None)(get("ops:flower-secret-1")),
        60,
        what="Flower to list the worker",
    )
    assert nodes[0] in body
    assert "flower-secret-1" not in fleet.logs()


def test_worker_serves_prometheus_metrics_during_a_run(fleet, control_app, pg_url, image_server, tmp_path):
    import urllib.request

    port = free_port()
    path = write_urls(tmp_path, [*good_urls(image_server, 40), image_server.url("/status/404")])
    # The local server trusts any password: a secret in the URL must appear nowhere.
    fleet.env["RECAP_DATABASE_URL"] = pg_url.replace("postgres@", "postgres:pg-secret-4711@")
    fleet.start_worker(extra_env={"RECAP_METRICS_PORT": str(port), "RECAP_LOG_LEVEL": "DEBUG"})
    fleet.wait_ready(control_app, 1)
    submitted = recap(fleet, "submit", str(path), "--job", "metrics")
    assert submitted.returncode == 0, submitted.stderr
    wait_until(lambda: finished(pg_url), 120, what="the run")
    status = recap(fleet, "status")
    for text in (submitted.stdout + submitted.stderr, status.stdout + status.stderr, fleet.logs()):
        assert "pg-secret-4711" not in text

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for name in (
        "recap_items_total",
        "recap_batch_size",
        "recap_batch_seconds",
        "recap_fetch_seconds",
        "recap_images_per_second",
        "recap_gpu_busy_ratio",
        "recap_buffer_depth",
        "recap_chunks_total",
    ):
        assert name in body, name
    assert 'recap_items_total{error_class="",status="done"} 40.0' in body
    assert 'recap_items_total{error_class="http_4xx",status="failed"} 1.0' in body


def test_redis_restarted_empty_mid_run_workers_reconnect_and_finish(
    fleet, pg_url, image_server, tmp_path, tiny_model_dir
):
    """A Redis of our own (restarting the shared one would cut other tests): stopped mid-run
    and started again empty; the workers reconnect and the fleet refeeds itself."""
    import shutil

    from recap.queue import make_app
    from recap.settings import Settings

    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed here")
    port = free_port()

    def start_redis():
        return subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    redis_proc = start_redis()
    broker = f"redis://127.0.0.1:{port}/0"
    fleet.env["RECAP_BROKER_URL"] = broker
    app = make_app(Settings(broker_url=broker, model=str(tiny_model_dir)))
    try:
        wait_until(
            lambda: (
                subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode == 0
            ),
            10,
            what="our redis",
        )
        submit_and_wait_for_progress(
            fleet, app, pg_url, tmp_path, slow_urls(image_server, 120), "redis-restart"
        )
        redis_proc.kill()
        redis_proc.wait()
        time.sleep(3)
        redis_proc = start_redis()
        wait_until(lambda: finished(pg_url), 180, what="the run to finish after Redis came back empty")
        rows = items(pg_url)
        assert len(rows) == 120 and all(r["status"] == "done" and r["attempts"] == 1 for r in rows.values())
    finally:
        fleet.stop_all()
        app.close()
        redis_proc.kill()
        redis_proc.wait()
