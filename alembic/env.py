"""Alembic environment: the URL comes from recap's settings (or the caller's config)."""

from sqlalchemy import create_engine, pool

from alembic import context
from recap.schema import Base

config = context.config
url = config.get_main_option("sqlalchemy.url")
if not url:
    # alembic run by hand: recap's settings name the database
    from recap.db import database_url_or_default, normalise_url
    from recap.settings import get_settings

    url = normalise_url(database_url_or_default(get_settings().database_url))  # psycopg 3, as recap


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
