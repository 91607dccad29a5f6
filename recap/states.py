"""Item statuses, job states, chunk states and claim refusals (docs/ARCHITECTURE.md, "Chunk states").

(str, Enum): a member equals, stores and serialises to JSON as its value, so the database
and `status --json` hold the same words as before. Text for people and metric labels
takes `.value` (str() of a member is its qualified name).
"""

from __future__ import annotations

from enum import Enum


class ItemStatus(str, Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"  # its job was cancelled before the item was captioned


class JobState(str, Enum):
    """What the fleet does with a job's chunks (`recap pause`, `resume`, `cancel`)."""

    RUNNING = "running"  # dispatched and claimed
    PAUSED = "paused"  # not dispatched or claimed; chunks in flight finish
    CANCELLED = "cancelled"  # ended: its pending items are `cancelled`


class ChunkState(str, Enum):
    """A chunk's place in the state machine; the order of definition is the order of the
    status object's `chunks` counts."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (ChunkState.DONE, ChunkState.FAILED)


class ClaimRefusal(str, Enum):
    """Why a worker may not work on a chunk it was sent."""

    DONE = "done"  # every item is done or failed
    FAILED = "failed"  # gave up after RECAP_CHUNK_MAX_ATTEMPTS
    LEASED = "leased"  # another worker holds a live lease
    EXHAUSTED = "exhausted"  # this claim would pass the attempts limit: the chunk fails now
    MISSING = "missing"  # no such chunk (its job was dropped)
    PAUSED = "paused"  # its job is paused: the chunk goes back to pending, no attempt counted
    CANCELLED = "cancelled"  # its job was cancelled


UNFINISHED_CHUNK_STATES = tuple(state for state in ChunkState if not state.finished)
