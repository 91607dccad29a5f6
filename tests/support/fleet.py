"""Real fleet processes for tests: `recap worker` / `celery worker` subprocesses on a
Redis database and a PostgreSQL database of the test's own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def wait_until(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def fleet_env(pg_url: str, redis_url: str, model: Path | str, cache: Path, **settings: str) -> dict[str, str]:
    """The environment of a test's workers: this test's databases and model, short leases
    and small batches; `settings` (RECAP_* names) override or add."""
    return {
        **os.environ,
        "RECAP_DATABASE_URL": pg_url,
        "RECAP_BROKER_URL": redis_url,
        "RECAP_MODEL": str(model),
        "RECAP_CACHE_DIR": str(cache),
        "RECAP_FEED_INTERVAL_S": "1",
        "RECAP_MAX_NEW_TOKENS": "4",
        "RECAP_FETCH_RETRIES": "0",
        "RECAP_LOG_LEVEL": "INFO",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        **settings,
    }


@dataclass
class Fleet:
    """Environment and processes of one test's fleet."""

    env: dict[str, str]
    log_dir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start_worker(self, app: str | None = None, extra_env: dict | None = None) -> subprocess.Popen:
        """`recap worker --gpus none` (or a plain celery worker of another app module)."""
        env = {**self.env, **(extra_env or {})}
        n = len(self.procs)
        log = open(self.log_dir / f"worker{n}.log", "wb")  # noqa: SIM115  (the worker writes it while alive)
        if app is None:
            argv = [sys.executable, "-m", "recap.cli", "worker", "--gpus", "none"]
        else:
            from recap.settings import Settings
            from workers.daemon import WorkerSpec, celery_argv

            settings = Settings(model=env["RECAP_MODEL"])
            from recap.queue import queue_name

            spec = WorkerSpec(None, f"recap-test{n}-{os.getpid()}@localhost", queue_name(settings.model))
            argv = celery_argv(spec, settings, app)
            env = spec.env(env)
        proc = subprocess.Popen(
            argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        proc.log_path = self.log_dir / f"worker{n}.log"  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def wait_ready(self, app, count: int, timeout: float = 90) -> list[str]:
        """Wait until `count` worker nodes answer a ping."""

        def nodes():
            replies = app.control.ping(timeout=1.0) or []
            names = [name for reply in replies for name in reply]
            return names if len(names) >= count else None

        return wait_until(nodes, timeout, interval=0.5, what=f"{count} worker(s) to answer ping")

    @staticmethod
    def kill(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
        """Kill a worker with everything under it (`recap worker` puts each Celery worker
        in a process group of its own, so a group kill alone would leave them behind)."""
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            Fleet.kill(proc, signal.SIGKILL)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.kill(proc, signal.SIGKILL)

    def logs(self) -> str:
        return "\n".join(
            p.log_path.read_text(errors="replace")
            for p in self.procs
            if p.log_path.exists()  # type: ignore[attr-defined]
        )
