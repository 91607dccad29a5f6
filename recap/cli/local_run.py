"""`recap run`'s captioning: what is pending, through the workers' pipeline in this process,
waiting for (and taking over from) another process that holds chunks of the same job."""

from __future__ import annotations

import time

import typer

from recap.cli.base import err, say
from recap.cli.run_view import advancer, progress_bar
from recap.settings import Settings
from recap.store import JobInfo, Store
from recap.worker_names import LocalOwner

# How often a run waiting for another process's chunks looks again.
WAIT_POLL_S = 1.0


def caption_until_finished(settings: Settings, store: Store, job: JobInfo, model: str) -> int:
    """Caption what is pending; while another process (a second `recap run` of the job, a
    fleet worker) holds chunks of it, wait for them and take over what it gives back, so
    that the export holds every item. Returns how many items are left pending when nothing
    more can be done here (0 normally)."""
    captioner = _Captioner(settings, store, job, model)
    me = str(LocalOwner.this_process())
    if store.job_status(job).items.pending == 0:
        say("nothing left to caption", to=err)
    while True:
        before = store.job_status(job).items.pending
        if before == 0:
            return 0
        captioner.caption(before)
        pending = store.job_status(job).items.pending
        if pending == 0:
            return 0
        if _held_elsewhere(store, job, me):
            _wait_for_others(store, job, me)
        elif pending >= before:
            return pending  # no progress and nobody else at work on it


def _held_elsewhere(store: Store, job: JobInfo, me: str) -> list[str]:
    """Owners of live leases on the job's chunks other than this process (a killed `recap
    run`'s chunks are not held: this run takes them over)."""
    owners = []
    for lease in store.leases(job.id):
        local = LocalOwner.parse(lease.owner)
        if lease.owner != me and lease.expires_in_s > 0 and not (local and local.is_gone()):
            owners.append(lease.owner or "?")
    return owners


def _wait_for_others(store: Store, job: JobInfo, me: str) -> None:
    """Until no other process holds chunks of the job (finished, or given back)."""
    owners = ", ".join(sorted(set(_held_elsewhere(store, job, me))))
    pending = store.job_status(job).items.pending
    say(
        f"waiting for {pending:,} items that another process is captioning ({owners}): "
        "the export will hold them too; Ctrl-C stops waiting",
        to=err,
    )
    try:
        with err.status(f"waiting for {pending:,} items…") as spinner:
            while _held_elsewhere(store, job, me):
                pending = store.job_status(job).items.pending
                if pending == 0:
                    return
                spinner.update(f"waiting for {pending:,} items…")
                time.sleep(WAIT_POLL_S)
    except KeyboardInterrupt:
        say("interrupted: run the same command again to export once the other process is done", to=err)
        raise typer.Exit(1) from None


class _Captioner:
    """Captions the job's pending items with a progress bar; the engine loads on first use."""

    def __init__(self, settings: Settings, store: Store, job: JobInfo, model: str):
        self.settings, self.store, self.job, self.model = settings, store, job, model
        self.engine = None

    def caption(self, todo: int) -> None:
        # torch and transformers: imported only once there is something to caption.
        from workers.engine import load_engine
        from workers.local import run_job_locally
        from workers.threads import apply_torch_threads

        if self.engine is None:
            apply_torch_threads(self.settings)  # before torch loads: its thread pools read it once
            with err.status(f"loading {self.model}…"):
                self.engine = load_engine(self.settings, self.model)
        with progress_bar() as progress:
            advance = advancer(progress, progress.add_task("captioning", total=todo, rate=0.0))
            try:
                run_job_locally(self.settings, self.store, self.job, self.engine, on_written=advance)
            except KeyboardInterrupt:
                progress.stop()
                say("interrupted: finished batches are saved; run the same command again to resume", to=err)
                raise typer.Exit(1) from None
