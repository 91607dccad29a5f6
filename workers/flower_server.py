"""`recap flower`: Celery's Flower on this fleet's broker, with every page behind its basic
authentication. Flower serves /metrics (worker names, task names and counts) and
/healthcheck to anyone; here they ask for the same credentials as the rest.

`run_flower` (in `recap flower`) starts `python -m workers.flower_server` as a child that
dies with it and gets the signals it gets; `main` (in that child) runs Flower. Flower,
tornado and Celery's command line are imported in the child only: `recap --help` imports
this module.
"""

from __future__ import annotations

import signal
import subprocess
import sys

from workers.children import die_with_parent, pass_on_signals

OPEN_PAGES = ("/metrics", "/healthcheck")  # served without authentication by Flower itself


def run_flower(port: int, address: str, env: dict[str, str]) -> int:
    """Serve Flower until it exits; SIGTERM or SIGINT here reach it too, and it gets
    SIGTERM should this process die without a word (SIGKILL). Its exit code."""
    argv = [sys.executable, "-m", "workers.flower_server", f"--port={port}", f"--address={address}"]
    child = subprocess.Popen(argv, env=env, preexec_fn=die_with_parent(signal.SIGTERM))
    pass_on_signals([child])
    return child.wait()


def protect_open_pages() -> None:
    """Put Flower's open pages behind `tornado.web.authenticated`, as its other pages are
    (its basic auth answers 401 to a missing or wrong password). Refuses to serve when
    this Flower's routes are not where they were (they must not silently stay open)."""
    from flower import urls

    found = set()
    for i, route in enumerate(urls.handlers):
        if isinstance(route, tuple) and route[0] in OPEN_PAGES:
            urls.handlers[i] = (route[0], _authenticated(route[1]), *route[2:])
            found.add(route[0])
    if found != set(OPEN_PAGES):
        raise RuntimeError(
            f"this Flower serves {sorted(set(OPEN_PAGES) - found)} elsewhere: refusing to start"
        )


def _authenticated(handler: type) -> type:
    import tornado.web

    class Authenticated(handler):
        @tornado.web.authenticated
        async def get(self, *args, **kwargs):
            return await super().get(*args, **kwargs)

    Authenticated.__name__ = f"Authenticated{handler.__name__}"
    return Authenticated


def main(argv: list[str]) -> None:
    protect_open_pages()
    from celery.__main__ import main as celery_main

    sys.argv = ["celery", "-A", "workers.celery_app", "flower", *argv]
    celery_main()


if __name__ == "__main__":
    main(sys.argv[1:])
