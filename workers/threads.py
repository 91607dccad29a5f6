"""How many CPU threads torch takes in each engine process on this host.

torch takes every core by default; two engine processes on one host then fight over the
cores (two `recap run` on 2 cores: 7 min against 24 s). Each engine process (`recap run`,
a Celery worker of `recap worker`) takes the host's cores divided among the engine
processes running on it, at least one. RECAP_TORCH_THREADS chooses the number instead; an
OMP_NUM_THREADS the process was started with is kept too (the classic remedy).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from recap.settings import Settings
from recap.worker_names import WORKER_NAME_ENV

log = logging.getLogger(__name__)

# What this process was started with (read at import, before this module sets it).
INHERITED_OMP_THREADS = os.environ.get("OMP_NUM_THREADS")
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True, slots=True)
class ThreadChoice:
    """The thread count an engine process takes, and why."""

    threads: int
    reason: str  # for the log: "RECAP_TORCH_THREADS", "OMP_NUM_THREADS" or "N cores / M processes"


def torch_threads(settings: Settings, processes: int, cores: int | None = None) -> ThreadChoice:
    """The threads of one engine process among `processes` engine processes on `cores`."""
    if settings.torch_threads is not None:
        return ThreadChoice(settings.torch_threads, "RECAP_TORCH_THREADS")
    inherited = _positive_int(INHERITED_OMP_THREADS)
    if inherited is not None:
        return ThreadChoice(inherited, "OMP_NUM_THREADS")
    cores = cores or available_cores()
    processes = max(1, processes)
    return ThreadChoice(max(1, cores // processes), f"{cores} cores / {processes} engine processes")


def apply_torch_threads(settings: Settings) -> ThreadChoice:
    """Size this engine process's threads from what runs on the host now. Before torch is
    imported through the environment (torch and the BLAS libraries read it once), after
    it through torch itself; cheap enough to call again at every chunk."""
    choice = torch_threads(settings, engine_processes_on_host())
    if "torch" in sys.modules:
        import torch  # already loaded: this costs nothing

        if torch.get_num_threads() != choice.threads:
            torch.set_num_threads(choice.threads)
            log.info("torch threads: %d (%s)", choice.threads, choice.reason)
    else:
        for variable in _THREAD_VARIABLES:
            os.environ[variable] = str(choice.threads)
        log.info("torch threads: %d (%s)", choice.threads, choice.reason)
    return choice


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota
    (a container limited to 2 CPUs on a 64-core host has 2)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, quota)) if quota else max(1, cores)


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs allowed by the cgroup (v2 cpu.max, v1 cfs quota), rounded up; None: no limit."""
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
        else:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1"):
            return None
        return math.ceil(int(quota) / int(period))
    except (OSError, ValueError):
        return None


def engine_processes_on_host(proc: Path = Path("/proc")) -> int:
    """The engine processes running here, this one included: each `recap run`, and each
    recap Celery worker node (its main process and pool child share a command line and
    count once)."""
    return len(engine_keys(_command_lines(proc)) | {_this_process_key()})


def engine_keys(processes: Iterable[tuple[int, list[str]]]) -> set[str]:
    """One key per engine process among `processes` ((pid, command line) pairs)."""
    return {key for pid, argv in processes if (key := engine_key(pid, argv)) is not None}


def engine_key(pid: int, argv: list[str]) -> str | None:
    """What identifies the engine process `pid` running `argv`: its node name for a recap
    Celery worker, its pid for `recap run`; None for anything else."""
    if "worker" in argv and any(Path(arg).name == "celery" for arg in argv[:3]):
        node = _option(argv, ("-n", "--hostname"))
        return f"node:{node}" if node and node.startswith("recap-") else None
    if _recap_command(argv) == "run":
        return f"pid:{pid}"
    return None


def _this_process_key() -> str:
    node = os.environ.get(WORKER_NAME_ENV)
    return f"node:{node}" if node else f"pid:{os.getpid()}"


def _recap_command(argv: list[str]) -> str | None:
    """The subcommand of a recap command line (`recap run ...`, `python -m recap.cli run`)."""
    if argv and Path(argv[0]).name.startswith("python"):
        argv = argv[1:]
    if argv[:2] == ["-m", "recap.cli"]:
        rest = argv[2:]
    elif argv and Path(argv[0]).name == "recap":
        rest = argv[1:]
    else:
        return None
    return next((arg for arg in rest if not arg.startswith("-")), None)


def _option(argv: list[str], names: tuple[str, ...]) -> str | None:
    for i, arg in enumerate(argv):
        if arg in names and i + 1 < len(argv):
            return argv[i + 1]
        for name in names:
            if name.startswith("--") and arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _command_lines(proc: Path) -> list[tuple[int, list[str]]]:
    """(pid, command line) of each process visible here."""
    try:
        entries = [entry for entry in proc.iterdir() if entry.name.isdigit()]
    except OSError:
        return []
    return [(int(entry.name), argv) for entry in entries if (argv := _command_line(entry))]


def _command_line(entry: Path) -> list[str]:
    try:
        raw = (entry / "cmdline").read_bytes()
    except OSError:  # ended meanwhile, or not ours to read
        return []
    return [part.decode(errors="replace") for part in raw.rstrip(b"\0").split(b"\0")] if raw else []


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(text or "")
    except ValueError:
        return None
    return value if value > 0 else None
