"""Worker names, built and parsed here only: Celery node names and lease owners.

Deploy files, the worker image's health check and people reading `recap status` know
these spellings: `recap-gpu<i>-<pid>@<host>` (or `recap-cpu-…`) for the node `recap
worker` starts per GPU, `<node>:<pid>` for the worker process holding a lease, and
`recap-local-<pid>@<host>` for a `recap run`.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

# Set by `recap worker` for each Celery worker it starts: the node name.
WORKER_NAME_ENV = "RECAP_WORKER_NAME"


@dataclass(frozen=True, slots=True)
class CeleryNode:
    """The Celery node `recap worker` (pid `launcher_pid`) starts for `gpu` (None: the CPU)."""

    gpu: str | None
    launcher_pid: int
    host: str

    def __str__(self) -> str:
        device = "cpu" if self.gpu is None else f"gpu{self.gpu}"
        return f"recap-{device}-{self.launcher_pid}@{self.host}"


def node_name(gpu: str | None, launcher_pid: int, host: str) -> str:
    """The node name as text (docker/healthcheck.py derives the nodes it expects with it)."""
    return str(CeleryNode(gpu, launcher_pid, host))


@dataclass(frozen=True, slots=True)
class FleetOwner:
    """A fleet worker process as a lease owner: its Celery node name and its pid."""

    node: str
    pid: int

    @classmethod
    def this_process(cls) -> FleetOwner:
        return cls(os.environ.get(WORKER_NAME_ENV) or f"recap-{socket.gethostname()}", os.getpid())

    def __str__(self) -> str:
        return f"{self.node}:{self.pid}"


_LOCAL = re.compile(r"recap-local-(\d+)@(.+)")


@dataclass(frozen=True, slots=True)
class LocalOwner:
    """A `recap run` process as a lease owner."""

    pid: int
    host: str

    @classmethod
    def this_process(cls) -> LocalOwner:
        return cls(os.getpid(), socket.gethostname())

    @classmethod
    def parse(cls, owner: str | None) -> LocalOwner | None:
        match = _LOCAL.fullmatch(owner or "")
        return cls(int(match.group(1)), match.group(2)) if match else None

    def __str__(self) -> str:
        return f"recap-local-{self.pid}@{self.host}"

    def is_gone(self) -> bool:
        """True when this is a process of this host that no longer exists (a killed run)."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False
