"""Host-side snapshots of a store's content, the currency between the store and its file formats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from embedtools.quantize import Quantization, QuantizedIndex
from embedtools.validation import Labels

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["StoreRecord", "TableRecord", "TableShape"]


@dataclass(frozen=True)
class TableShape:
    """What a file says a table is, read before any vector is: enough to charge the budget."""

    dimension: int
    rows: int
    quantized: tuple[Quantization, ...] = ()
    rotation: int = 0
    mapped: bool = False

    @property
    def nbytes(self) -> int:
        """What the store holds in memory for the table: float32 vectors (unless memory-mapped from
        the file) and one norm per row, each quantised index, and a PCA rotation (its ``d x d``
        matrix and the rows rotated onto ``rotation`` axes)."""
        f32 = np.dtype(np.float32).itemsize
        total = self.rows * ((0 if self.mapped else self.dimension) + 1) * f32
        total += sum(QuantizedIndex.nbytes_for(kind, self.rows, self.dimension) for kind in self.quantized)
        if self.rotation:
            total += (self.dimension * self.dimension + self.rows * self.rotation) * f32
        return total


@dataclass(frozen=True)
class TableRecord:
    """One table on the host: float32 vectors, ids, labels and per-row metadata as JSON text."""

    vectors: npt.NDArray[np.float32]
    ids: tuple[str, ...]
    labels: Labels
    metadata: tuple[str, ...]
    quantized: tuple[QuantizedIndex[npt.NDArray[Any]], ...] = ()
    rotation: npt.NDArray[np.float32] | None = None
    rotation_components: int = 0

    @property
    def dimension(self) -> int:
        return int(self.vectors.shape[1])


@dataclass(frozen=True)
class StoreRecord:
    """A whole store on the host; ``config`` is the experiment configuration attached to it."""

    tables: tuple[TableRecord, ...]
    config: dict[str, Any] = field(default_factory=dict)
