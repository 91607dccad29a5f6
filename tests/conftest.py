"""Shared test fixtures. Real services only: Postgres, Redis, loopback HTTP, tiny real models."""

from __future__ import annotations

import os

# Before anything imports torch: two cores, keep each process to one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["RECAP_FETCH_ALLOW_CIDRS"] = "127.0.0.1/32"
os.environ.setdefault("RECAP_FETCH_TIMEOUT_S", "3")
os.environ.setdefault("RECAP_FETCH_CONNECT_TIMEOUT_S", "1")
os.environ.setdefault("RECAP_FETCH_BACKOFF_S", "0.01")
os.environ.setdefault("RECAP_MAX_NEW_TOKENS", "8")
os.environ.setdefault("RECAP_MIN_SIDE", "8")

import pytest


@pytest.fixture(scope="session")
def image_server():
    """A loopback HTTP server with images and every hostile case (tests/support/http_server.py)."""
    from tests.support.http_server import ImageServer

    server = ImageServer(host="127.0.0.1")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny llava model, built once per session with real classes and a real save."""
    from workers.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llava"), family="llava")


# -- PostgreSQL and Redis: real servers on loopback, a database of our own per session ----

PG_ADMIN_URL = os.environ.get("RECAP_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _create_database(name: str) -> str:
    import sqlalchemy as sa

    from recap.db import normalise_url

    admin = sa.create_engine(normalise_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def _drop_database(name: str) -> None:
    import sqlalchemy as sa

    from recap.db import normalise_url

    admin = sa.create_engine(normalise_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def pg_url(request):
    """A fresh, migrated PostgreSQL database for one test."""
    from recap.db import upgrade

    name = f"recap_test_{os.getpid()}_{abs(hash(request.node.nodeid)) % 10**8}"
    url = _create_database(name)
    upgrade(url)
    yield url
    from recap.db import get_engine, normalise_url

    get_engine(normalise_url(url)).dispose()
    _drop_database(name)


@pytest.fixture
def sqlite_url(tmp_path):
    from recap.db import upgrade

    url = f"sqlite:///{tmp_path}/recap.db"
    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """The same store tests on both backends."""
    from recap.store import Store

    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    return Store(url)


@pytest.fixture(scope="session")
def redis_server():
    """A Redis server of this test session's own (tests/support/redis_server.py): a free
    port, a temp folder, no persistence. Never a Redis a developer keeps data in."""
    from tests.support.redis_server import ThrowawayRedis, start_throwaway_redis

    if not ThrowawayRedis.available():
        pytest.skip("redis-server is not installed: tests that need Redis start one of their own")
    server = start_throwaway_redis()
    yield server
    server.destroy()


@pytest.fixture
def redis_url(redis_server):
    """Database 0 of the session's own Redis, emptied before and after the test."""
    import redis

    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()  # a test stopped it
    url = redis_server.url
    client = redis.Redis.from_url(url)
    client.flushall()
    yield url
    client.flushall()
    client.close()


@pytest.fixture
def control_app(redis_url, tiny_model_dir):
    """A Celery app in the test process, to ping workers and send raw messages."""
    from recap.queue import make_app
    from recap.settings import Settings

    app = make_app(Settings(broker_url=redis_url, model=str(tiny_model_dir)))
    yield app
    app.close()
