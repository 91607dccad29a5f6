"""A throwaway Redis server for one test session: its own port, its own temp folder, no
persistence. Tests empty it freely and never touch a Redis a developer keeps data in."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.pg_cluster import free_port
from workers.children import die_with_parent


class ThrowawayRedis:
    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="recap-redis-"))
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> None:
        """Start on `self.port` (a restart keeps it: clients reconnect there)."""
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        argv += ["--save", "", "--appendonly", "no", "--protected-mode", "yes"]
        self.proc = subprocess.Popen(
            argv,
            stdout=(self.dir / "redis.log").open("ab"),
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(),  # a killed test run leaves no server behind
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-1000:]
                raise RuntimeError(f"redis-server exited on port {self.port}:\n{log}")
            if self._answers():
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_throwaway_redis(attempts: int = 3) -> ThrowawayRedis:
    """A started server; a port taken between choosing and binding it is chosen again."""
    for attempt in range(attempts):
        server = ThrowawayRedis()
        try:
            server.start()
            return server
        except RuntimeError:
            server.destroy()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
