"""The handle on a claimed chunk: renew its lease, keep it alive, give the chunk back or
finish it, without passing job id, chunk number, owner and lease length around."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from recap.states import ChunkState, ClaimRefusal

if TYPE_CHECKING:
    from recap.store.claims import Claims

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ClaimedChunk:
    """The lease this process holds on chunk `chunk_no` of job `job_id`."""

    store: Claims
    job_id: int
    chunk_no: int
    owner: str
    lease_s: float
    # Set when another worker has taken the chunk (our lease ran out during an outage
    # longer than the lease): stop working on it, and do not give it back.
    lost: threading.Event = field(default_factory=threading.Event)
    _ended: threading.Event = field(default_factory=threading.Event, repr=False)
    _keeper: threading.Thread | None = field(default=None, repr=False)

    claimed = True

    def renew(self) -> bool:
        """Extend the lease; False when the chunk is no longer ours."""
        return self.store.renew_lease(self.job_id, self.chunk_no, self.owner, self.lease_s)

    def keep(self) -> None:
        """Renew the lease every third of its length, on a thread, until the chunk is
        released or finished (whoever does it: the chunk's task or its straggler finisher);
        `lost` is set when a renewal finds the chunk taken. Calling it again changes nothing."""
        if self._keeper is None:
            self._keeper = threading.Thread(target=self._renew_until_ended, name="recap-lease", daemon=True)
            self._keeper.start()

    def release(self, error: str | None = None, count_attempt: bool = True) -> ChunkState | ClaimRefusal:
        """Give the chunk back: `done` when every item is, else `pending` (see
        `Store.release_chunk`); `count_attempt=False` takes back the claim's attempt."""
        self._stop_keeping()
        return self.store.release_chunk(
            self.job_id, self.chunk_no, self.owner, error=error, count_attempt=count_attempt
        )

    def finish(self) -> ChunkState | ClaimRefusal:
        """Every item is written: release the lease (`done`, or `pending` if some are not)."""
        return self.release()

    def _renew_until_ended(self) -> None:
        while not self._ended.wait(self.lease_s / 3):
            try:
                if self.renew():
                    continue
            except Exception:  # the next renewal or the writes will tell
                log.exception("lease renewal failed")
                continue
            if not self._ended.is_set():  # not a renewal racing our own release
                log.warning("lost the lease on chunk %s/%s: stopping it", self.job_id, self.chunk_no)
                self.lost.set()
            return

    def _stop_keeping(self) -> None:
        self._ended.set()
        if self._keeper is not None and self._keeper is not threading.current_thread():
            self._keeper.join(timeout=5)
