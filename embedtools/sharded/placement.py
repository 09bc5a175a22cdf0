"""Where a sharded table's rows live: the placement rule and the global row order.

A table's global order is a sequence of *runs* ``(shard, length)``: consecutive global rows held,
in the same order, by one shard. A shard's local rows are its runs concatenated, so one table of
a few numbers per add (kept by the client) maps any shard's local row to its global position, and
the single-machine tie rule (equal scores: the lower global row first) can be applied without a
row id ever leaving its worker.

The rule: an add of ``n`` rows is cut into contiguous pieces so that afterwards the shards' row
counts are as even as they can be (each row, in turn, to the shard with the fewest rows, ties to
the lower shard number), the pieces going to their shards in shard order. Pure NumPy: no Dask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["Runs", "place"]


def place(shard_rows: Sequence[int], n: int) -> tuple[int, ...]:
    """How many of ``n`` new rows each shard takes: water-filling the emptiest shards first."""
    rows = [int(r) for r in shard_rows]
    if n <= 0 or not rows:
        return tuple(0 for _ in rows)
    low, high = min(rows), min(rows) + n  # the lowest level L with sum(max(0, L - r)) >= n
    while low < high:
        mid = (low + high) // 2
        if sum(max(0, mid - r) for r in rows) >= n:
            high = mid
        else:
            low = mid + 1
    shares = [max(0, low - 1 - r) for r in rows]
    left = n - sum(shares)
    for i, r in enumerate(rows):  # the last row of each level: to the lower shard numbers
        if left and r <= low - 1:
            shares[i] += 1
            left -= 1
    return tuple(shares)


@dataclass(frozen=True)
class Runs:
    """One table's global row order as runs of one shard each (see the module docstring)."""

    shards: tuple[int, ...] = ()
    lengths: tuple[int, ...] = ()

    @property
    def rows(self) -> int:
        return sum(self.lengths)

    def shard_rows(self, shard_count: int) -> tuple[int, ...]:
        counts = [0] * shard_count
        for s, n in zip(self.shards, self.lengths, strict=True):
            counts[s] += n
        return tuple(counts)

    def appended(self, shares: Sequence[int]) -> Runs:
        """These runs followed by an add's pieces (``shares[s]`` rows to shard ``s``, in shard order)."""
        pairs = list(zip(self.shards, self.lengths, strict=True))
        for s, n in enumerate(shares):
            if n:
                pairs.append((s, int(n)))
        return _runs(pairs)

    def local_ranges(self, shares: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """The global ``(start, stop)`` of each shard's piece of an add placed after these runs."""
        start, out = self.rows, list[tuple[int, int]]()
        for n in shares:
            out.append((start, start + int(n)))
            start += int(n)
        return tuple(out)

    def to_global(self, shard: int, local: npt.NDArray[np.integer]) -> npt.NDArray[np.int64]:
        """Global row positions of ``shard``'s local rows ``local`` (any shape)."""
        starts = np.cumsum((0, *self.lengths))[:-1]
        mine = [i for i, s in enumerate(self.shards) if s == shard]
        if not mine:
            return np.asarray(local, dtype=np.int64).copy()
        global_start = starts[mine]
        lengths = np.asarray([self.lengths[i] for i in mine], dtype=np.int64)
        local_start = np.cumsum(lengths) - lengths
        flat = np.asarray(local, dtype=np.int64)
        run = np.searchsorted(local_start, flat, side="right") - 1
        out: npt.NDArray[np.int64] = global_start[run] + (flat - local_start[run])
        return out

    def locate(self, rows: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """The shard and local row of each global row in ``rows`` (any shape)."""
        lengths = np.asarray(self.lengths, dtype=np.int64)
        shards = np.asarray(self.shards, dtype=np.int64)
        global_start = np.cumsum(lengths) - lengths
        local_start = np.zeros_like(lengths)
        for s in np.unique(shards):
            mine = shards == s
            local_start[mine] = np.cumsum(lengths[mine]) - lengths[mine]
        run = np.searchsorted(global_start, rows, side="right") - 1
        return shards[run], local_start[run] + (rows - global_start[run])

    def removed(self, shard_count: int, gone: Mapping[int, Sequence[int]]) -> Runs:
        """The runs after each shard ``s`` removed its local rows ``gone[s]`` (survivors keep their order)."""
        pairs: list[tuple[int, int]] = []
        seen = [0] * shard_count
        dropped = {s: np.sort(np.asarray(rows, dtype=np.int64)) for s, rows in gone.items()}
        for s, n in zip(self.shards, self.lengths, strict=True):
            lost = dropped.get(s)
            cut = 0 if lost is None else int(np.searchsorted(lost, seen[s] + n) - np.searchsorted(lost, seen[s]))
            seen[s] += n
            pairs.append((s, n - cut))
        return _runs(pairs)

    def global_order(self, shard_count: int) -> list[tuple[int, int, int]]:
        """``(shard, local_start, length)`` of each run, in global order."""
        seen = [0] * shard_count
        out: list[tuple[int, int, int]] = []
        for s, n in zip(self.shards, self.lengths, strict=True):
            out.append((s, seen[s], n))
            seen[s] += n
        return out

    def to_json(self) -> list[list[int]]:
        return [[s, n] for s, n in zip(self.shards, self.lengths, strict=True)]


def _runs(pairs: Sequence[tuple[int, int]]) -> Runs:
    """Runs without empty ones, neighbours on one shard joined."""
    merged: list[list[int]] = []
    for s, n in pairs:
        if n <= 0:
            continue
        if merged and merged[-1][0] == s:
            merged[-1][1] += n
        else:
            merged.append([s, n])
    return Runs(tuple(m[0] for m in merged), tuple(m[1] for m in merged))
