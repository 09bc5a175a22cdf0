"""What searches and memory reports return: frozen values, host NumPy arrays."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, cast

import numpy as np

from embedtools.protocols import Metric

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["MemoryInfo", "SearchResult", "TableMemory"]


@dataclass(frozen=True)
class SearchResult:
    """Top-k rows for each query, best first: ``(q, k)`` arrays (read-only) and the rows' ids.

    Scores are cosine similarities or dot products (descending) or Euclidean distances (``"l2"``,
    ascending). ``k`` is clipped to the table's rows. ``source_dimension`` is the table searched;
    it exceeds ``dimension`` when a Matryoshka prefix of a wider table was used. ``row_ids`` are the
    searched table's ids by row as they were at search time (``indices`` index into them), and
    ``ids`` the ids of the results, built on first access: for k in the thousands, turning
    ``q × k`` indices into strings took longer than the search's selection.

    A certified search (``rescore="certified"``, or the automatic rule) also says what screened it
    (``screen``: ``"bfloat16"``, ``"float16"``, ``"int8"``, ``"prefix:128"``, or ``None`` for the
    float32 screen) and, per query, how many rows it scored exactly (``rescored``: the table's row
    count, after a filter, where a query's shortlist would have exceeded its limit and every row
    was scored); both are ``None`` for other searches.
    """

    indices: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float32]
    metric: Metric
    dimension: int
    source_dimension: int
    row_ids: Sequence[str] = field(repr=False, compare=False)
    rescored: npt.NDArray[np.int64] | None = field(default=None, repr=False, compare=False)
    screen: str | None = None

    @cached_property
    def ids(self) -> list[list[str]]:
        """``ids[i][j]`` is ``row_ids[indices[i, j]]`` (one ``itemgetter`` per query)."""
        rows: list[list[int]] = self.indices.tolist()
        if self.indices.shape[-1] < 2:
            return [[self.row_ids[i] for i in row] for row in rows]
        return [list(cast("tuple[str, ...]", operator.itemgetter(*row)(self.row_ids))) for row in rows]


@dataclass(frozen=True)
class TableMemory:
    """A table's charge: ``nbytes`` in all, of which ``quantized[kind]`` for each quantised index,
    ``rotation`` for a PCA rotation (its matrix and rotated rows) and ``caches[name]`` for each cache
    searches have kept (``prefix_norms/8``, ``unit_prefix/8``, ``rotation_norms/8``); the rest is the
    float32 rows and their norms. ``mapped`` tables' vectors live in their file and are not charged."""

    dimension: int
    rows: int
    dtype: str
    nbytes: int
    quantized: Mapping[str, int] = field(default_factory=dict[str, int])
    mapped: bool = False
    caches: Mapping[str, int] = field(default_factory=dict[str, int])
    rotation: int = 0


@dataclass(frozen=True)
class MemoryInfo:
    """The accountant's totals (shared by every store on it) and this store's tables."""

    used_bytes: int
    limit_bytes: int
    store_bytes: int
    tables: Mapping[int, TableMemory]

    @property
    def available_bytes(self) -> int:
        return max(self.limit_bytes - self.used_bytes, 0)

    @property
    def utilization(self) -> float:
        return self.used_bytes / self.limit_bytes
