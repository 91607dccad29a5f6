"""Child processes that never outlive their parent.

A SIGKILLed parent runs no more code, so nothing it does can stop its children: each child
asks the kernel (Linux `PR_SET_PDEATHSIG`) for a signal when its parent dies, and treats it
as the graceful stop (SIGTERM). Signals the parent receives it passes on itself.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn` for `subprocess.Popen`: the child gets `sig` when the process that
    started it dies. Built in the parent (it remembers the parent's pid), run in the child
    between fork and exec; the request survives exec. No-op off Linux.

    The kernel ties the request to the thread that forked: start children from a thread
    that lives as long as the process (the main thread)."""
    parent = os.getpid()
    _libc()  # loaded here: the forked child only calls into it

    def in_child() -> None:
        ask_for_signal_on_parent_death(sig, parent)

    return in_child


def ask_for_signal_on_parent_death(sig: int = signal.SIGTERM, parent: int | None = None) -> None:
    """Called in the child itself: `sig` when its parent dies. `parent`: the pid it must
    still have, else it is already orphaned and signals itself at once (the parent may
    die before the request is made)."""
    libc = _libc()
    if libc is None:
        return
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def child_pids(pid: int | None = None, proc: Path = Path("/proc")) -> list[int]:
    """The direct children of `pid` (default: this process), from /proc."""
    pid = os.getpid() if pid is None else pid
    found = []
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def send(pids: Iterable[int], sig: int) -> None:
    """`sig` to each process still alive."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def pass_on_signals(
    children: Sequence[subprocess.Popen],
    signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
    *,
    as_signal: int | None = None,
    to_group: bool = False,
) -> None:
    """From now on, each of `signals` this process receives goes on to every child still
    running: as itself, or as `as_signal`; to the child's process group when `to_group`
    (a child in a session of its own, with a pool below it)."""

    def pass_on(signum: int, _frame) -> None:
        for child in children:
            if child.poll() is not None:
                continue
            try:
                if to_group:
                    os.killpg(child.pid, as_signal or signum)
                else:
                    child.send_signal(as_signal or signum)
            except ProcessLookupError:
                pass

    for sig in signals:
        signal.signal(sig, pass_on)
