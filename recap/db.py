"""Database URLs, engines and migrations."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import URL, Engine, make_url

from recap.errors import FleetConfigError, RecapError
from recap.resources import resource_path

LOCAL_DEFAULT_URL = "sqlite:///recap.db"


def database_url_or_default(url: str | None) -> str:
    """RECAP_DATABASE_URL (passed in from the settings), else `./recap.db`."""
    return url or LOCAL_DEFAULT_URL


# (backend, driver) pairs recap can open; None: SQLAlchemy's default driver for the backend.
_USABLE_DRIVERS = {"postgresql": (None, "psycopg"), "postgres": (None,), "sqlite": (None, "pysqlite")}


class InvalidDatabaseUrl(RecapError, ValueError):
    """A database URL recap cannot use (a ValueError too, so pydantic reports it per setting)."""


def parse_database_url(url: str) -> URL:
    """The URL parsed, or a one-line InvalidDatabaseUrl; never echoes the URL (it may hold a
    password), only its scheme."""
    try:
        parsed = make_url(url)
    except Exception:  # sqlalchemy's ArgumentError, or ValueError for a port that is no number
        raise InvalidDatabaseUrl(
            "not a database URL: use postgresql://user:password@host:port/db or sqlite:///path/to/recap.db"
        ) from None
    backend, _, driver = parsed.drivername.partition("+")
    if (driver or None) not in _USABLE_DRIVERS.get(backend, ()):
        raise InvalidDatabaseUrl(
            f"recap works with PostgreSQL (postgresql://, psycopg) or SQLite (sqlite:///), "
            f"not {parsed.drivername}://"
        )
    return parsed


def normalise_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here (SQLAlchemy would pick psycopg2)."""
    parsed = parse_database_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def safe_url(url: str) -> str:
    """The URL with its password masked, for logs and status output."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparseable URL is still not printed with its secret
        return "<unparseable database URL>"


def require_postgres(url: str | None, command: str) -> str:
    """Fleet commands need PostgreSQL: a one-line reason otherwise."""
    if not url:
        raise FleetConfigError(
            f"recap {command} is a fleet command and needs PostgreSQL: set RECAP_DATABASE_URL "
            "(e.g. postgresql://user@host/db); for one machine use `recap run`"
        )
    if not parse_database_url(url).drivername.startswith("postgres"):
        raise FleetConfigError(
            f"recap {command} needs PostgreSQL, but RECAP_DATABASE_URL is {safe_url(url)}; "
            "SQLite serves only `recap run`"
        )
    return url


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # SQLAlchemy emits BEGIN itself (below), not pysqlite, which would only begin at the
    # first write and let two read-modify-write transactions interleave.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (status, export) never block the run
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin(conn) -> None:
    """The store's write transactions take the write lock up front (counters are read,
    then written); reads begin deferred and never wait for the run's writes (WAL)."""
    mode = "IMMEDIATE" if conn.get_execution_options().get("recap_write") else "DEFERRED"
    conn.exec_driver_sql(f"BEGIN {mode}")


def get_engine(url: str) -> Engine:
    """One engine (one pool) per database, however its URL is spelled."""
    return _engine(normalise_url(url))


@lru_cache(maxsize=8)
def _engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(
        url,
        pool_size=2,  # README: at most four connections per worker process
        max_overflow=2,
        pool_pre_ping=True,  # a failed-over Postgres leaves dead pooled connections behind
        pool_recycle=1800,
    )


def schema_exists(url: str) -> bool:
    sqlite_file = url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:")
    if sqlite_file and not Path(url.removeprefix("sqlite:///")).exists():
        return False  # do not leave an empty database file behind
    return inspect(get_engine(url)).has_table("jobs")


def schema_revision(url: str) -> str | None:
    """The Alembic revision the database is at, or None where there is no recap schema."""
    if not schema_exists(url):
        return None
    engine = get_engine(url)
    if not inspect(engine).has_table("alembic_version"):
        return None
    with engine.connect() as conn:
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def _migrations():
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(resource_path("alembic")))


def head_revision() -> str:
    """The newest revision this recap's migrations make."""
    return _migrations().get_current_head()


def require_current_schema(url: str) -> None:
    """A one-line error where the schema is missing, older or newer than this recap's."""
    current, head = schema_revision(url), head_revision()
    if current is None:
        raise RecapError(f"no recap schema at {safe_url(url)}: run `recap db upgrade` (or `recap run`)")
    if current not in {script.revision for script in _migrations().walk_revisions()}:
        raise RecapError(
            f"the recap schema at {safe_url(url)} is at revision {current}, newer than this "
            f"recap knows (up to {head}): install the recap that upgraded it"
        )
    if current != head:
        raise RecapError(
            f"the recap schema at {safe_url(url)} is at revision {current}, this recap needs "
            f"{head}: run `recap db upgrade`"
        )


def alembic_config(url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(resource_path("alembic")))
    config.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return config


def upgrade(url: str) -> None:
    """Create or migrate the schema (Alembic `upgrade head`)."""
    from alembic import command

    get_engine(url)  # makes the folder of a SQLite file
    command.upgrade(alembic_config(url), "head")
