"""Host-side snapshots of a store's content, the currency between the store and its file formats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from embedtools.errors import DuplicateIdError, InvalidEmbeddingError
from embedtools.ledger import table_bytes
from embedtools.quantize import Quantization, QuantizedIndex
from embedtools.validation import JSONObject, JSONValue, Labels

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["StoreRecord", "TableRecord", "TableShape", "verify_table"]

#: Rows per chunk of the finiteness check, so a memory-mapped table is never read whole.
_CHUNK_VALUES = 1 << 24


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
        """What the store holds in memory for the table before any search cache (the ledger's
        rule, :func:`embedtools.ledger.table_bytes`): charged from a file header before loading."""
        return table_bytes(self.dimension, self.rows, self.quantized, self.rotation, mapped=self.mapped)


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
    config: JSONObject = field(default_factory=dict[str, JSONValue])


def verify_table(table: TableRecord, *, finite: bool = True) -> dict[str, int]:
    """The table's id -> row index, after the checks every loaded table passes (whatever its file
    format): unique ids and finite vectors. ``load`` and ``embedtools inspect`` both run this;
    ``load`` passes ``finite=False`` because its copy to the backend checks every value (with the
    same message) and a mapped table should be read once, not twice."""
    index: dict[str, int] = {}
    for i, id_ in enumerate(table.ids):
        if id_ in index:
            raise DuplicateIdError(f"id {id_!r} appears at rows {index[id_]} and {i} of table {table.dimension}d")
        index[id_] = i
    if not finite:
        return index
    vectors = table.vectors
    step = max(1, _CHUNK_VALUES // max(vectors.shape[1], 1))
    if not all(np.isfinite(vectors[i : i + step]).all() for i in range(0, vectors.shape[0], step)):
        raise InvalidEmbeddingError(f"table {table.dimension}d contain NaN or infinite values")
    return index
