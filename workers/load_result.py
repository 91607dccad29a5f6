"""What each step of the load stage gives back: its product, or `Failed` with the classified failure.

The steps (fetch, read a local source, prepare) never raise for a bad item; they return one
of these values, and the loader turns them into the `Prepared`/`Rejected` records of
recap/records.py (docs/ARCHITECTURE.md, "The walk of one item").
"""

from __future__ import annotations

from dataclasses import dataclass

from recap.errors import Failure


@dataclass(frozen=True, slots=True)
class Fetched:
    """The bytes of one item, read from the network or from a local source."""

    data: bytes
    attempts: int = 1  # requests made; local reads take one


@dataclass(frozen=True, slots=True)
class Failed:
    """A step that stopped with a classified failure."""

    failure: Failure
    attempts: int = 1  # requests made (0: a URL refused unsent); steps that do not retry try once
