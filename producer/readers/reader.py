"""The interface every format reader implements, and the batching they share."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import TypeVar

from producer.readers.columns import ColumnOptions
from producer.readers.source import Source
from producer.readers.stats import ReadStats
from recap.records import InputItem

# A reader: `read(source, columns, stats, batch_rows)` yields the file's items in batches of
# about `batch_rows`, counting into `stats` every row it reads and every row it leaves out.
ReadFn = Callable[[Source, ColumnOptions, ReadStats, int], Iterator[list[InputItem]]]


@dataclass(frozen=True)
class Reader:
    read: ReadFn
    compressible: bool  # may the file be .gz/.bz2/.xz outside the format itself


T = TypeVar("T")


def batched(values: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of `size` values (the last may be shorter): itertools.batched, Python 3.12+."""
    it = iter(values)
    while batch := list(islice(it, size)):
        yield batch
