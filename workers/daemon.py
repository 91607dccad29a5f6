"""`recap worker`: one Celery worker process per GPU on this host (or one on the CPU).

This parent never touches CUDA (a forked child could then not initialise it): GPUs are
listed with nvidia-smi, and each child sees only its own through CUDA_VISIBLE_DEVICES.
No child outlives it: each asks the kernel for SIGTERM (its graceful stop) when the
launcher dies, even by SIGKILL, so a restarted launcher never runs beside an old set.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

from recap.errors import RecapError
from recap.queue import queue_name
from recap.settings import Settings
from recap.worker_names import WORKER_NAME_ENV, node_name
from workers.children import die_with_parent, pass_on_signals


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    gpu: str | None  # None: CPU
    node_name: str
    queue: str
    metrics_port: int = 0  # 0: off

    def env(self, base: dict[str, str]) -> dict[str, str]:
        env = dict(base)
        env["CUDA_VISIBLE_DEVICES"] = self.gpu if self.gpu is not None else ""
        env[WORKER_NAME_ENV] = self.node_name
        env["RECAP_METRICS_PORT"] = str(self.metrics_port)
        if self.gpu is None:
            env["RECAP_DEVICE"] = env.get("RECAP_DEVICE", "cpu")
        return env


def detect_gpus() -> list[str]:
    """GPU indices from nvidia-smi, without importing torch."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        listing = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in listing.splitlines() if line.strip()]


def parse_gpus(spec: str) -> list[str | None]:
    spec = spec.strip().lower()
    if spec == "none":
        return [None]
    if spec == "all":
        gpus = detect_gpus()
        if not gpus:  # a GPU host with a broken driver must not quietly caption on the CPU
            raise RecapError(
                "--gpus all found no GPU (nvidia-smi lists none); use --gpus none to run on the CPU"
            )
        return gpus
    ids = [part.strip() for part in spec.split(",") if part.strip()]
    if not ids or not all(part.isdigit() for part in ids):
        raise RecapError(f"--gpus takes all, none or a list like 0,1; got {spec!r}")
    return ids


def worker_specs(gpus: list[str | None], settings: Settings) -> list[WorkerSpec]:
    host, pid = socket.gethostname(), os.getpid()
    queue = queue_name(settings.model)
    base = settings.metrics_port

    def port(index: int, gpu: str | None) -> int:
        # By GPU number, not position in this launcher's list: one launcher per GPU (the
        # systemd template) must not give every worker the base port.
        return base + (int(gpu) if gpu is not None else index) if base else 0

    return [WorkerSpec(gpu, node_name(gpu, pid, host), queue, port(i, gpu)) for i, gpu in enumerate(gpus)]


def celery_argv(spec: WorkerSpec, settings: Settings, app_module: str = "workers.celery_app") -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app_module,
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        "1",
        "-Q",
        spec.queue,
        "-n",
        spec.node_name,
        "-E",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        settings.log_level,
    ]


def run_workers(specs: list[WorkerSpec], settings: Settings, app_module: str = "workers.celery_app") -> int:
    """Start one Celery worker per spec, each in its own process group; on SIGTERM or
    SIGINT send SIGTERM to every group (the Celery main process and its pool child, which
    then finishes its batch and gives the rest of its chunk back). Should this launcher
    die without a word (SIGKILL, OOM killer), the kernel sends each Celery main process
    SIGTERM, which passes it on to its pool child (workers/tasks.py). 0 when every worker
    exited 0, else 1 (a worker killed by a signal has a negative code)."""
    children = [
        subprocess.Popen(
            celery_argv(spec, settings, app_module),
            env=spec.env(dict(os.environ)),
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        for spec in specs
    ]

    pass_on_signals(children, as_signal=signal.SIGTERM, to_group=True)
    codes = [child.wait() for child in children]
    return 0 if all(code == 0 for code in codes) else 1
