"""What a sharded store reports: its tables, its memory per worker and in all, a search's traffic."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from embedtools.protocols import Quantization
from embedtools.results import MemoryInfo

__all__ = ["SearchStats", "ShardedMemoryInfo", "ShardedTable", "WinnerIds"]


@dataclass(frozen=True)
class ShardedTable:
    """One table across the shards: its rows in all and on each shard, and what every shard keeps with it."""

    dimension: int
    rows: int
    shard_rows: tuple[int, ...]
    quantized: tuple[Quantization, ...]
    int_labels: bool


@dataclass(frozen=True)
class ShardedMemoryInfo:
    """Each shard's own :class:`~embedtools.results.MemoryInfo` (its worker's budget) and the sums."""

    shards: tuple[MemoryInfo, ...]
    workers: tuple[str, ...]

    @property
    def used_bytes(self) -> int:
        return sum(m.used_bytes for m in self.shards)

    @property
    def limit_bytes(self) -> int:
        return sum(m.limit_bytes for m in self.shards)

    @property
    def store_bytes(self) -> int:
        return sum(m.store_bytes for m in self.shards)

    @property
    def available_bytes(self) -> int:
        return sum(m.available_bytes for m in self.shards)


@dataclass(frozen=True)
class SearchStats:
    """The network payload of one sharded search, by direction and part, and where its time went.

    ``query_bytes`` the queries sent to each shard searched; ``candidate_bytes`` the shards'
    ``(queries, k)`` scores (float32) and local rows (int32) back; ``id_bytes`` the winners' local
    rows sent to their shards and the ids (UTF-8) returned. Payload only: what pickling and the
    transport add is not counted.
    """

    shards: int
    queries: int
    k: int
    query_bytes: int
    candidate_bytes: int
    id_bytes: int
    merge_seconds: float
    seconds: float
    attempts: int = 1

    @property
    def bytes_moved(self) -> int:
        return self.query_bytes + self.candidate_bytes + self.id_bytes


class WinnerIds(Sequence[str]):
    """A search result's ``row_ids`` for a sharded table: the ids of the winning global rows only
    (fetched from their shards), as long as the table; a row that did not win has no id here."""

    def __init__(self, ids: Mapping[int, str], rows: int) -> None:
        self._ids = dict(ids)
        self._rows = rows

    def __len__(self) -> int:
        return self._rows

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        try:
            return self._ids[int(index)]
        except KeyError:
            raise IndexError(f"global row {index} is not among this search's results") from None

    def __iter__(self) -> Iterator[str]:
        raise TypeError("a sharded search's row_ids hold only the winners' ids; index them by the result's indices")
