"""HEALTHCHECK of the worker image: healthy when this host's recap Celery nodes answer a ping.

`celery inspect ping -d` takes exact node names, and ours carry the pid of `recap worker`
(`recap-gpu<i>-<pid>@<host>`), so this script finds them itself:

1. it works out which nodes should be alive here from the command lines it can see: each
   `recap worker [--gpus X]` launcher starts one node per GPU, named after the launcher's
   pid, and each `celery ... worker -n NAME` names its node. It pings only those and is
   healthy when every one answers: a dead GPU worker makes the container unhealthy even
   while its siblings work;
2. where it finds none (no /proc, another launcher), it pings every node and is healthy
   when any reply comes from a node named `...@<this hostname>`.

A Celery worker answers pings from its main process even while its pool child is busy
with a chunk, so a long chunk does not make the container unhealthy.

Exit status: 0 healthy, 1 unhealthy (Docker's meaning), with one line on stdout.
Needs only the broker URL (`RECAP_BROKER_URL`); imports no torch.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Iterable
from pathlib import Path


def _option(argv: list[str], names: tuple[str, ...]) -> str | None:
    for i, arg in enumerate(argv):
        if arg in names and i + 1 < len(argv):
            return argv[i + 1]
        for name in names:
            if name.startswith("--") and arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _is_launcher(argv: list[str]) -> bool:
    """The `recap worker ...` process itself: the console script, as the kernel runs it
    (`.../python3 .../recap worker ...`) or directly. Not an init that merely names it
    (`docker-init -- recap worker ...`): the nodes are named after the launcher's pid."""
    if argv and Path(argv[0]).name.startswith("python"):
        argv = argv[1:]
    return len(argv) >= 2 and Path(argv[0]).name == "recap" and argv[1] == "worker"


def expected_nodes(processes: Iterable[tuple[int, list[str]]], host: str) -> list[str]:
    """The recap Celery node names that should be alive on `host`.

    - every `celery ... worker -n NAME` command line (pool children are forks with their
      parent's command line: names are deduplicated);
    - for every `recap worker [--gpus X]` launcher, the nodes it starts, named as
      `recap worker` names them (`recap-gpu<i>-<launcher pid>@host`, `recap-cpu-...`), so a
      worker whose process is gone is still expected, and missed.
    """
    names: set[str] = set()
    for pid, argv in processes:
        if _is_launcher(argv):
            from recap.worker_names import node_name
            from workers.daemon import parse_gpus

            for gpu in parse_gpus(_option(argv, ("--gpus",)) or "all"):
                names.add(node_name(gpu, pid, host))
        elif "worker" in argv:
            name = _option(argv, ("-n", "--hostname"))
            if name:
                names.add(name)
    return sorted(name for name in names if name.startswith("recap-") and name.endswith(f"@{host}"))


def local_processes(proc: Path = Path("/proc")) -> list[tuple[int, list[str]]]:
    """(pid, command line) of the processes visible here (this container's, in Docker)."""
    found = []
    try:
        entries = list(proc.iterdir())
    except OSError:
        return []
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:  # the process ended meanwhile, or is not ours to read
            continue
        if raw:
            found.append(
                (int(entry.name), [part.decode(errors="replace") for part in raw.rstrip(b"\0").split(b"\0")])
            )
    return found


def check(timeout: float, host: str) -> tuple[bool, str]:
    expected = expected_nodes(local_processes(), host)

    from workers.celery_app import app  # the fleet's broker, from RECAP_BROKER_URL

    replies = app.control.ping(destination=expected or None, timeout=timeout)
    answered = {name for reply in replies or [] for name in reply}
    if expected:
        missing = [name for name in expected if name not in answered]
        if missing:
            return False, f"unhealthy: no ping reply within {timeout:g}s from {', '.join(missing)}"
        return True, f"healthy: {', '.join(expected)} answered"
    ours = sorted(name for name in answered if name.endswith(f"@{host}"))
    if ours:
        return True, f"healthy: {', '.join(ours)} answered"
    return False, f"unhealthy: no Celery node @{host} answered a ping within {timeout:g}s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for ping replies (default 5)"
    )
    parser.add_argument(
        "--host",
        default=socket.gethostname(),
        help="host part of the node names to expect (default: this hostname)",
    )
    args = parser.parse_args(argv)
    try:
        ok, message = check(args.timeout, args.host)
    except Exception as exc:
        ok, message = False, f"unhealthy: {type(exc).__name__}: {' '.join(str(exc).split())}"
    print(message, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
