"""Fleet processes on this host: `recap worker` (Celery workers) and `recap flower`."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from recap.cli.base import app, command, err, read_settings, say
from recap.db import get_engine, require_current_schema, require_postgres
from recap.errors import RecapError
from recap.transient import is_transient
from workers.daemon import parse_gpus, run_workers, worker_specs
from workers.engine.choice import check_model_name, choose_engine
from workers.flower_server import run_flower


@command(app, "worker")
def worker(
    gpus: Annotated[str, typer.Option(help="all, none (one CPU worker) or a list like 0,1.")] = "all",
) -> None:
    """Start worker processes on this host: one per GPU, or one on the CPU."""
    settings = read_settings()
    url = require_postgres(settings.database_url, "worker")
    check_model_name(settings.model)  # a model or engine that cannot be had: before any claim
    choice = choose_engine(settings)
    check_schema_unless_unreachable(url)
    specs = worker_specs(parse_gpus(gpus), settings)
    for spec in specs:
        where = f"GPU {spec.gpu}" if spec.gpu else "the CPU"
        say(f"starting {spec.node_name} on {where}, queue {spec.queue}, engine {choice.name}", to=err)
    raise typer.Exit(run_workers(specs, settings))


def check_schema_unless_unreachable(url: str) -> None:
    """Workers start while the database is down (they wait it out), not on an old schema."""
    try:
        require_current_schema(url)
    except Exception as exc:
        if not is_transient(exc):
            raise
        say(f"could not check the database schema ({type(exc).__name__}): starting anyway", to=err)
    finally:
        get_engine(url).dispose()  # the launcher itself keeps no connection open


@command(app, "flower")
def flower(
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 5555,
    address: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
) -> None:
    """Start Flower on this fleet's broker, every page (metrics too) behind basic auth from
    RECAP_FLOWER_USER/PASSWORD; it stops when this command is stopped or killed."""
    settings = read_settings()
    if not settings.flower_user or not settings.flower_password:
        raise RecapError("recap flower needs RECAP_FLOWER_USER and RECAP_FLOWER_PASSWORD (basic auth)")
    secret = settings.flower_password.get_secret_value()
    if "," in secret or ":" in settings.flower_user or "," in settings.flower_user:
        # Flower splits FLOWER_BASIC_AUTH on commas (several users) and on the first colon.
        raise RecapError("RECAP_FLOWER_USER may not contain ':' or ',', nor RECAP_FLOWER_PASSWORD ','")
    env = dict(os.environ)
    # Through the environment, so the password is not on the process list.
    env["FLOWER_BASIC_AUTH"] = f"{settings.flower_user}:{secret}"
    raise typer.Exit(run_flower(port, address, env))
