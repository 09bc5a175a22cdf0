"""A table as the store holds it, the one way a table version is built, and the read-only view
callers get.

Every change of a table's rows (add, update, remove, load) goes through :func:`build_table`, so
the checks on the rows, the norms, the id index, the quantised indexes and the rotation are the
same whichever way the rows arrived.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, NamedTuple

import numpy as np

from embedtools.errors import DuplicateIdError, InvalidArgumentError, InvalidEmbeddingError, UnknownIdError
from embedtools.filters import RowSource
from embedtools.ledger import F32_BYTES, table_caches
from embedtools.protocols import ArrayBackend, ArrayT, Quantization
from embedtools.quantize import QuantizedIndex
from embedtools.records import TableRecord, TableShape, verify_table
from embedtools.rotation import Rotation, principal_axes, rotate
from embedtools.validation import JSONObject, Labels, as_labels, check_labels, check_strings, encode_metadata, label_kind

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["F32_BYTES", "NewRows", "appended", "new_rows", "removal", "Rotation", "Table", "TableState", "build_table", "extended_index", "free_ids", "from_record", "kept_rows", "labels_for", "materialized", "positions", "replaced_rows", "rotation_of", "rows_without", "to_device", "with_index", "with_rotation"]

#: Values per chunk of the finiteness check, so a memory-mapped table is never read whole.
_CHUNK_VALUES = 1 << 24


@dataclass(frozen=True)
class TableState(Generic[ArrayT]):
    """One table version as the store holds it, in the backend's array type ``ArrayT``; replaced
    whole on change. Only its caches (prefix norms, normalised prefixes for funnels, the rotation's
    norms) fill in place, each charged by the ledger when it is kept."""

    vectors: ArrayT
    norms: ArrayT
    ids: tuple[str, ...]
    labels: Labels
    metadata: tuple[str, ...]
    id_index: Mapping[str, int]
    quantized: Mapping[Quantization, QuantizedIndex[ArrayT]] = field(default_factory=dict[Quantization, QuantizedIndex[ArrayT]])
    """Quantised indexes on the backend's device, beside the vectors."""
    rotation: Rotation[ArrayT] | None = None
    prefix_norms: dict[int, ArrayT] = field(default_factory=dict[int, ArrayT])
    unit_prefixes: dict[int, ArrayT] = field(default_factory=dict[int, ArrayT])
    #: A certified funnel's bounded prefixes, by prefix width (see :mod:`embedtools.search.screening`).
    bound_prefixes: dict[int, ArrayT] = field(default_factory=dict[int, ArrayT])
    #: Each row's exact rounding error in a quantised index, for certified screens: keyed by the
    #: index's position in :data:`embedtools.quantize.CODECS` at the time, valued ``(kind, errors)``.
    screen_errors: dict[int, Any] = field(default_factory=dict[int, Any])

    @property
    def rows(self) -> int:
        return len(self.ids)

    @cached_property
    def row_source(self) -> RowSource:
        """What filters read (metadata parsed on first use, column by column), kept with the state."""
        return RowSource(self.ids, self.labels, self.metadata)

    def shape(self, dimension: int, *, mapped: bool = False) -> TableShape:
        """What the ledger bills this version for, before its caches."""
        components = self.rotation.components if self.rotation is not None else 0
        return TableShape(dimension, self.rows, tuple(self.quantized), components, mapped)


def to_device(backend: ArrayBackend[ArrayT], host: npt.NDArray[np.float32], what: str) -> tuple[ArrayT, ArrayT]:
    """The backend's copy of host rows and their norms (computed once, here), after the finiteness
    check every table's rows pass: read in chunks, so a mapped table is not read whole."""
    step = max(1, _CHUNK_VALUES // max(host.shape[1], 1))
    if not all(np.isfinite(host[i : i + step]).all() for i in range(0, host.shape[0], step)):
        raise InvalidEmbeddingError(f"{what} contain NaN or infinite values")
    arr = backend.from_numpy(host)
    norms = backend.row_norms(arr)
    host_norms = backend.to_numpy(norms)
    if not np.isfinite(host_norms).all():
        row = int(np.flatnonzero(~np.isfinite(host_norms))[0])
        raise InvalidEmbeddingError(f"{what}: the norm of row {row} overflows float32")
    return arr, norms


def build_table(
    backend: ArrayBackend[ArrayT],
    rows: npt.NDArray[np.float32],
    ids: tuple[str, ...],
    labels: Labels,
    metadata: tuple[str, ...],
    *,
    after: TableState[ArrayT] | None = None,
    id_index: Mapping[str, int] | None = None,
    rebuild: Iterable[Quantization] = (),
    indexes: Iterable[QuantizedIndex[Any]] = (),
    rotation: tuple[npt.NDArray[np.float32], int] | None = None,
    what: str = "vectors",
) -> TableState[ArrayT]:
    """A new table version: ``rows`` (host float32) on the backend with their norms, or — with
    ``after`` — appended to that version's rows on the device, so an add uploads only its own rows.

    ``ids``, ``labels`` and ``metadata`` are the whole table's (``id_index`` their index where the
    caller already checked it). Quantised indexes of the ``rebuild`` kinds are built afresh over
    every row (int8 is recalibrated), ``indexes`` (host, from a file) are moved to the device as they
    are, and a ``rotation`` (matrix, components) is re-applied to every row: indexes and rotation
    follow their table, never describe an older version of it.
    """
    arr, norms = to_device(backend, rows, what)
    host = rows
    kinds = tuple(rebuild)
    if after is not None:
        arr = backend.concatenate([after.vectors, arr])
        norms = backend.concatenate([after.norms, norms])
        if kinds or rotation is not None:
            host = np.asarray(backend.to_numpy(arr), dtype=np.float32)
    quantized: dict[Quantization, QuantizedIndex[ArrayT]] = {index.kind: index.to_backend(backend) for index in indexes}
    quantized.update({kind: QuantizedIndex.build(kind, host).to_backend(backend) for kind in kinds})
    return TableState(
        vectors=arr,
        norms=norms,
        ids=ids,
        labels=labels,
        metadata=metadata,
        id_index={id_: i for i, id_ in enumerate(ids)} if id_index is None else id_index,
        quantized=quantized,
        rotation=None if rotation is None else rotate(backend, host, *rotation),
    )


def from_record(backend: ArrayBackend[ArrayT], table: TableRecord) -> TableState[ArrayT]:
    """A loaded table's version: the file's indexes as they are, its rotation re-applied."""
    index = verify_table(table, finite=False)  # build_table checks finiteness, reading the rows once
    return build_table(
        backend,
        table.vectors,
        table.ids,
        table.labels,
        table.metadata,
        id_index=index,
        indexes=table.quantized,
        rotation=None if table.rotation is None else (table.rotation, table.rotation_components),
        what=f"table {table.dimension}d",
    )


def kept_rows(backend: ArrayBackend[ArrayT], state: TableState[ArrayT], keep: npt.NDArray[np.int64], dimension: int) -> TableState[ArrayT]:
    """The version of ``state`` with only the rows ``keep`` (in their order): what a remove leaves."""
    pick: list[int] = keep.tolist()
    return build_table(
        backend,
        np.asarray(backend.to_numpy(state.vectors), dtype=np.float32)[keep],
        tuple(state.ids[i] for i in pick),
        as_labels([state.labels[i] for i in pick]),
        tuple(state.metadata[i] for i in pick),
        rebuild=tuple(state.quantized),
        rotation=rotation_of(state),
        what=f"table {dimension}d",
    )


def replaced_rows(
    backend: ArrayBackend[ArrayT],
    state: TableState[ArrayT],
    rows: list[int],
    dimension: int,
    vectors: npt.NDArray[np.float32] | None,
    labels: Labels | None,
    metadata: tuple[str, ...] | None,
) -> TableState[ArrayT]:
    """The version of ``state`` whose ``rows`` take these vectors, labels and/or metadata (``None``:
    kept): what an update makes. Rows keep their positions and ids."""
    all_rows = np.array(backend.to_numpy(state.vectors), dtype=np.float32, copy=True)
    if vectors is not None:
        all_rows[rows] = vectors
    labels_out: list[str | int] = list(state.labels)
    meta_out = list(state.metadata)
    for j, r in enumerate(rows):
        if labels is not None:
            labels_out[r] = labels[j]
        if metadata is not None:
            meta_out[r] = metadata[j]
    return build_table(
        backend,
        all_rows,
        state.ids,
        as_labels(labels_out),
        tuple(meta_out),
        id_index=state.id_index,
        rebuild=tuple(state.quantized),
        rotation=rotation_of(state),
        what=f"table {dimension}d",
    )


def with_index(backend: ArrayBackend[ArrayT], state: TableState[ArrayT], kind: Quantization) -> TableState[ArrayT]:
    """``state`` with a (re)calibrated ``kind`` index: built on the host (the same codes on every
    backend), kept on the backend's device."""
    host = np.asarray(backend.to_numpy(state.vectors), dtype=np.float32)
    return replace(state, quantized={**state.quantized, kind: QuantizedIndex.build(kind, host).to_backend(backend)})


def with_rotation(backend: ArrayBackend[ArrayT], state: TableState[ArrayT], components: int) -> TableState[ArrayT]:
    """``state`` with a PCA rotation fitted afresh on its rows, kept ``components`` axes wide."""
    host = np.asarray(backend.to_numpy(state.vectors), dtype=np.float32)
    return replace(state, rotation=rotate(backend, host, principal_axes(host), components))


def materialized(backend: ArrayBackend[ArrayT], state: TableState[ArrayT]) -> TableState[ArrayT]:
    """``state`` with its (memory-mapped) rows copied into the backend's memory."""
    return replace(state, vectors=backend.from_numpy(np.array(state.vectors, dtype=np.float32)))


def positions(state: TableState[Any], dimension: int, ids: tuple[str, ...]) -> list[int]:
    """The rows of ``ids`` in ``state``, refusing an id it does not have."""
    missing = [i for i in ids if i not in state.id_index]
    if missing:
        raise UnknownIdError(f"table {dimension}d has no row with id {missing[0]!r} ({len(missing)} unknown ids)")
    return [state.id_index[i] for i in ids]


class NewRows(NamedTuple):
    """What an add appends besides vectors, checked, and the whole table's id index after it."""

    ids: tuple[str, ...]
    labels: Labels
    metadata: tuple[str, ...]
    id_index: dict[str, int]


def new_rows(dimension: int, old: TableState[Any] | None, n: int, ids: object, labels: object, metadata: object) -> NewRows:
    """The ids (omitted: generated, see :func:`free_ids`), labels and metadata of ``n`` rows appended to ``old``."""
    start = old.rows if old is not None else 0
    new_ids = free_ids(old.id_index if old is not None else {}, start, n) if ids is None else check_strings(ids, n, "ids")
    new_labels = labels_for(dimension, labels, n, old.labels if old is not None else None)
    new_meta = ("{}",) * n if metadata is None else encode_metadata(metadata, n)
    return NewRows(new_ids, new_labels, new_meta, extended_index(dimension, old, new_ids))


def appended(
    backend: ArrayBackend[ArrayT], old: TableState[ArrayT] | None, host: npt.NDArray[np.float32], rows: NewRows, like: TableState[ArrayT] | None
) -> TableState[ArrayT]:
    """``old`` (``None``: a new table) with ``host`` rows appended, carrying ``like``'s indexes and rotation."""
    return build_table(
        backend,
        host,
        (old.ids if old else ()) + rows.ids,
        as_labels((old.labels if old else ()) + rows.labels),
        (old.metadata if old else ()) + rows.metadata,
        after=old,
        id_index=rows.id_index,
        rebuild=tuple(like.quantized) if like is not None else (),
        rotation=rotation_of(like),
    )


def removal(tables: Mapping[int, TableState[Any]], ids: tuple[str, ...], *, named: bool) -> dict[int, npt.NDArray[np.int64]]:
    """The rows each of ``tables`` keeps when ``ids`` go (tables holding none of them left out),
    refusing an id that the one table (``named``) or every table lacks."""
    if named:
        for d, state in tables.items():
            positions(state, d, ids)
    else:
        found = {i for state in tables.values() for i in ids if i in state.id_index}
        missing = [i for i in ids if i not in found]
        if missing:
            raise UnknownIdError(f"no table has a row with id {missing[0]!r} ({len(missing)} unknown ids)")
    return {d: keep for d, state in tables.items() if (keep := rows_without(state, ids)) is not None}


def rotation_of(state: TableState[Any] | None) -> tuple[npt.NDArray[np.float32], int] | None:
    """What a rebuilt version re-applies: the same axes, over its own rows."""
    if state is None or state.rotation is None:
        return None
    return state.rotation.matrix, state.rotation.components


def extended_index(dimension: int, old: TableState[Any] | None, new_ids: tuple[str, ...]) -> dict[str, int]:
    """``old``'s id index extended by ``new_ids`` (rows appended after ``old``'s), refusing an id
    already used in the table or earlier in the same call."""
    start = old.rows if old is not None else 0
    index = dict(old.id_index) if old is not None else {}
    for i, id_ in enumerate(new_ids):
        if id_ in index:
            where = "earlier in this call" if index[id_] >= start else f"row {index[id_]} of table {dimension}d"
            raise DuplicateIdError(f"id {id_!r} (row {i}) is already used {where}")
        index[id_] = start + i
    return index


def rows_without(state: TableState[Any], ids: tuple[str, ...]) -> npt.NDArray[np.int64] | None:
    """The rows of ``state`` that stay when ``ids`` go, in order; ``None`` when it has none of them."""
    gone = {state.id_index[i] for i in ids if i in state.id_index}
    if not gone:
        return None
    return np.array([r for r in range(state.rows) if r not in gone], dtype=np.int64)


def labels_for(dimension: int, labels: object, n: int, existing: Labels | None) -> Labels:
    """The labels of ``n`` rows going into a table whose labels are ``existing``: checked to be of
    the table's one kind, or the default ``""`` — which a table of int labels does not have."""
    if labels is not None:
        try:
            return check_labels(labels, n, existing)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"table {dimension}d: {exc}") from None
    if existing is not None and label_kind(existing) is int:
        raise InvalidArgumentError(f"table {dimension}d has int labels and int labels have no default; pass labels= for the new rows")
    return ("",) * n


def free_ids(taken: Mapping[str, int], start: int, n: int) -> tuple[str, ...]:
    """The first ``n`` integers from ``start`` whose strings are not ``taken``: the rows'
    positions where those are free (the seed's ids), the next free integers where not."""
    out: list[str] = []
    candidate = start
    while len(out) < n:
        text = str(candidate)
        if text not in taken:
            out.append(text)
        candidate += 1
    return tuple(out)


class Table:
    """A read-only snapshot of one table; later changes to the store do not show through it.

    Besides rows, ids, labels and metadata it says what the store holds for the table — its
    quantised indexes, its rotation, the caches searches have filled — so an experimenter (or a
    test) can see what a store holds and what each part costs without reaching into the store.
    """

    __slots__ = ("_backend", "_dimension", "_state")

    def __init__(self, dimension: int, state: TableState[Any], backend: ArrayBackend[Any]) -> None:
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
    def metadata(self) -> tuple[JSONObject, ...]:
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

    @property
    def vectors(self) -> Any:
        """The backend's own array of the rows (a memory map for a mapped store), not a copy:
        for checking where a table lives; writing to it would change the store behind its norms."""
        return self._state.vectors

    @property
    def quantized(self) -> Mapping[Quantization, QuantizedIndex[Any]]:
        """The table's quantised indexes by kind, on the backend's device (read-only mapping)."""
        return MappingProxyType(dict(self._state.quantized))

    @property
    def rotation(self) -> Rotation[Any] | None:
        """The table's PCA rotation (matrix, components, rotated rows), if one was fitted."""
        return self._state.rotation

    @property
    def caches(self) -> Mapping[str, int]:
        """The caches searches have kept for this version so far, by name (``prefix_norms/8``,
        ``unit_prefix/8``, ``rotation_norms/8``) with their bytes; each is charged to the budget."""
        return MappingProxyType(table_caches(self._state))
