"""A table as the store holds it, and the read-only view of it that callers get."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from embedtools.errors import UnknownIdError
from embedtools.filters import RowSource
from embedtools.protocols import ArrayBackend
from embedtools.quantize import Quantization, QuantizedIndex
from embedtools.records import TableShape
from embedtools.validation import Labels

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["F32_BYTES", "Rotation", "Table", "TableState", "rotation_cache_bytes"]

F32_BYTES = 4


@dataclass(frozen=True)
class TableState:
    """One table as the store holds it, replaced whole on change; only its caches (prefix norms,
    normalised prefixes for funnels) fill in place, each charged when it is kept."""

    vectors: Any
    norms: Any
    ids: tuple[str, ...]
    labels: Labels
    metadata: tuple[str, ...]
    id_index: Mapping[str, int]
    quantized: Mapping[Quantization, QuantizedIndex[Any]] = field(default_factory=dict)
    """Quantised indexes on the backend's device, beside the vectors."""
    rotation: Rotation | None = None
    prefix_norms: dict[int, Any] = field(default_factory=dict)
    unit_prefixes: dict[int, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.ids)

    @cached_property
    def row_source(self) -> RowSource:
        """What filters read (metadata parsed on first use, column by column), kept with the state."""
        return RowSource(self.ids, self.labels, self.metadata)

    def shape(self, dimension: int) -> TableShape:
        components = self.rotation.components if self.rotation is not None else 0
        return TableShape(dimension, self.rows, tuple(self.quantized), components)


@dataclass(frozen=True)
class Rotation:
    """A PCA rotation of a table: ``matrix`` (host, ``d x d``, principal axes by falling variance)
    and the rows rotated onto its first ``components`` axes (on the backend), with a norm cache."""

    matrix: npt.NDArray[np.float32]
    components: int
    prefix: Any
    norms: dict[int, Any] = field(default_factory=dict)


class Table:
    """A read-only snapshot of one table; later changes to the store do not show through it."""

    __slots__ = ("_backend", "_dimension", "_state")

    def __init__(self, dimension: int, state: TableState, backend: ArrayBackend[Any]) -> None:
        self._dimension = dimension
        self._state = state
        self._backend = backend

    @property
    def dimension(self) -> int:
        return self._dimension

    def __len__(self) -> int:
        return self._state.rows

    def __repr__(self) -> str:
        return f"Table(dimension={self._dimension}, rows={len(self)})"

    @property
    def ids(self) -> tuple[str, ...]:
        return self._state.ids

    @property
    def labels(self) -> Labels:
        """All str or all int (as they were added): one kind per table."""
        return self._state.labels

    @property
    def metadata(self) -> tuple[dict[str, Any], ...]:
        """Each row's metadata, decoded afresh: mutating it cannot change the store."""
        return tuple(json.loads(text) for text in self._state.metadata)

    def index_of(self, id: str) -> int:
        try:
            return self._state.id_index[id]
        except KeyError:
            raise UnknownIdError(f"no row with id {id!r} in table {self._dimension}d") from None

    def to_numpy(self) -> npt.NDArray[np.float32]:
        """A float32 ``(n, d)`` copy of the vectors, exactly as they were added."""
        return np.array(self._backend.to_numpy(self._state.vectors), dtype=np.float32, copy=True)


def rotation_cache_bytes(state: TableState) -> int:
    """Bytes charged for the norms cached on a table's rotation (released with the rotation)."""
    return len(state.rotation.norms) * state.rows * F32_BYTES if state.rotation is not None else 0
