"""Claims and leases: a worker takes the lease on a chunk before working on it, renews it
while it works, and gives the chunk back (docs/ARCHITECTURE.md, "Chunk states")."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from recap.states import ChunkState, ClaimRefusal, JobState
from recap.store.core import StoreCore, chunks_t, jobs_t
from recap.store.lease import ClaimedChunk
from recap.transient import retrying
from recap.worker_names import LocalOwner


@dataclass(frozen=True, slots=True)
class Refused:
    """A claim that was refused, and why."""

    reason: ClaimRefusal
    claimed = False


class Claims(StoreCore):
    @retrying
    def claim_chunk(
        self,
        job_id: int,
        chunk_no: int,
        owner: str,
        lease_s: float,
        max_attempts: int,
        force: bool = False,
    ) -> ClaimedChunk | Refused:
        """Take the lease on a chunk before working on it: the lease, or why not.

        `force` (single-machine `recap run`, which owns its database) ignores other
        owners' leases and the attempts limit.
        """
        with self.writer.begin() as conn:
            chunk = self._lock_chunk(conn, job_id, chunk_no)
            if chunk is None:
                return Refused(ClaimRefusal.MISSING)
            now = self.now(conn)
            if not force:  # `recap run` owns its database: no one pauses its job
                held = _held_back(conn, job_id)
                if held is not None:
                    self._hold_back(conn, chunk, now, held)
                    return Refused(held)
            refusal = _refusal(chunk, owner, now, max_attempts, force)
            if refusal is ClaimRefusal.EXHAUSTED:
                self._set_chunk(
                    conn,
                    job_id,
                    chunk_no,
                    state=ChunkState.FAILED,
                    lease_owner=None,
                    lease_expires_at=None,
                    last_error=f"gave up after {chunk['attempts']} attempts; last error: "
                    f"{chunk['last_error'] or 'worker died or timed out'}",
                )
            if refusal is not None:
                return Refused(refusal)
            self._set_chunk(
                conn,
                job_id,
                chunk_no,
                state=ChunkState.RUNNING,
                lease_owner=owner,
                lease_expires_at=now + lease_s,
                attempts=chunk["attempts"] + 1,
            )
            conn.execute(
                update(jobs_t)
                .where(jobs_t.c.id == job_id, jobs_t.c.started_at.is_(None))
                .values(started_at=now)
            )
        return ClaimedChunk(self, job_id, chunk_no, owner, lease_s)

    def _hold_back(self, conn: Connection, chunk, now: float, why: ClaimRefusal) -> None:
        """A chunk of a paused job, sent before the pause: back to `pending` (dispatch sends
        it again after `resume`), no attempt counted; of a cancelled job: `done` when
        nothing is left in it. A live lease is left alone (its chunk finishes)."""
        waiting = chunk["state"] == ChunkState.QUEUED
        expired = chunk["state"] == ChunkState.RUNNING and (chunk["lease_expires_at"] or 0) <= now
        if waiting or expired:
            self._set_chunk(
                conn,
                chunk["job_id"],
                chunk["chunk_no"],
                state=_state_when_held(chunk, why),
                lease_owner=None,
                lease_expires_at=None,
            )

    @retrying
    def renew_lease(self, job_id: int, chunk_no: int, owner: str, lease_s: float) -> bool:
        """Extend our lease; False when the chunk is no longer ours."""
        with self.writer.begin() as conn:
            now = self.now(conn)
            result = conn.execute(
                update(chunks_t)
                .where(
                    chunks_t.c.job_id == job_id,
                    chunks_t.c.chunk_no == chunk_no,
                    chunks_t.c.lease_owner == owner,
                    chunks_t.c.state == ChunkState.RUNNING,
                )
                .values(lease_expires_at=now + lease_s)
            )
        return result.rowcount == 1

    def finish_chunk(self, job_id: int, chunk_no: int, owner: str) -> ChunkState | ClaimRefusal:
        """Release our lease: `done` when every item is, else back to `pending`."""
        return self.release_chunk(job_id, chunk_no, owner)

    @retrying
    def release_chunk(
        self,
        job_id: int,
        chunk_no: int,
        owner: str,
        error: str | None = None,
        count_attempt: bool = True,
    ) -> ChunkState | ClaimRefusal:
        """Give a chunk back (finished, a crash in the task, or a graceful stop): `done`
        when every item is, else `pending` to be picked up again. Only the lease owner
        can; anyone else gets the chunk's state and changes nothing (`missing` when there
        is no such chunk). `count_attempt=False` takes back the attempt its claim counted."""
        with self.writer.begin() as conn:
            chunk = self._lock_chunk(conn, job_id, chunk_no)
            if chunk is None:
                return ClaimRefusal.MISSING
            if chunk["state"] != ChunkState.RUNNING or chunk["lease_owner"] != owner:
                return ChunkState(chunk["state"])  # not ours any more (lease expired and taken)
            finished = chunk["done_count"] + chunk["failed_count"] + chunk["cancelled_count"]
            complete = finished >= chunk["item_count"]
            state = ChunkState.DONE if complete else ChunkState.PENDING
            values: dict = {"state": state, "lease_owner": None, "lease_expires_at": None}
            if error:
                values["last_error"] = error[:2000]
            if not count_attempt:
                values["attempts"] = max(0, chunk["attempts"] - 1)
            self._set_chunk(conn, job_id, chunk_no, **values)
        return state


def _held_back(conn: Connection, job_id: int) -> ClaimRefusal | None:
    """Why the job's chunks may not be claimed now (paused, cancelled); None when they may."""
    state = conn.execute(select(jobs_t.c.state).where(jobs_t.c.id == job_id)).scalar()
    if state == JobState.PAUSED:
        return ClaimRefusal.PAUSED
    if state == JobState.CANCELLED:
        return ClaimRefusal.CANCELLED
    return None


def _state_when_held(chunk, why: ClaimRefusal) -> ChunkState:
    left = chunk["item_count"] - chunk["done_count"] - chunk["failed_count"] - chunk["cancelled_count"]
    return ChunkState.DONE if why is ClaimRefusal.CANCELLED and left <= 0 else ChunkState.PENDING


def _refusal(chunk, owner: str, now: float, max_attempts: int, force: bool) -> ClaimRefusal | None:
    """Why `owner` may not claim this chunk row now; None when it may."""
    if chunk["state"] == ChunkState.DONE:
        return ClaimRefusal.DONE
    lease_live = (chunk["lease_expires_at"] or 0) > now
    held_by_other = chunk["state"] == ChunkState.RUNNING and lease_live and chunk["lease_owner"] != owner
    if force:
        # `recap run` takes over what an earlier, killed `recap run` on this host left
        # running, but never a live lease of another process (a fleet worker, or a
        # second `recap run` of the same job).
        return ClaimRefusal.LEASED if held_by_other and not _killed_local_run(chunk["lease_owner"]) else None
    if chunk["state"] == ChunkState.FAILED:
        return ClaimRefusal.FAILED
    if held_by_other:
        return ClaimRefusal.LEASED
    if chunk["attempts"] >= max_attempts:
        return ClaimRefusal.EXHAUSTED
    return None


def _killed_local_run(owner: str | None) -> bool:
    local = LocalOwner.parse(owner)
    return local is not None and local.is_gone()
