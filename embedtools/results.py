"""What searches and memory reports return: frozen values, host NumPy arrays."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
    it exceeds ``dimension`` when a Matryoshka prefix of a wider table was used.
    """

    indices: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float32]
    ids: list[list[str]]
    metric: Metric
    dimension: int
    source_dimension: int


@dataclass(frozen=True)
class TableMemory:
    """A table's charge: ``nbytes`` in all, of which ``quantized[kind]`` for each quantised index;
    ``mapped`` tables' vectors live in their file and are not charged."""

    dimension: int
    rows: int
    dtype: str
    nbytes: int
    quantized: Mapping[str, int] = field(default_factory=dict)
    mapped: bool = False


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
