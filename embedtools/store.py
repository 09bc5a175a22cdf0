"""EmbeddingStore: tables of embeddings keyed by dimension, searched exactly, saved atomically.

The store validates at its edge (:mod:`embedtools.validation`), asks its accountant before it
allocates, and delegates arithmetic to its backend. It never imports a concrete backend: the
container (or the caller) hands it one. Every public method either completes or changes nothing.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import numpy as np

from embedtools import fileformat, seed_format
from embedtools.budget import format_bytes
from embedtools.errors import (
    DimensionError,
    DuplicateIdError,
    EmbedtoolsError,
    InvalidArgumentError,
    InvalidEmbeddingError,
    MemoryLimitError,
    ReadOnlyStoreError,
    StoreFormatError,
    StoreNotEmptyError,
    StoreNotFoundError,
    UnknownIdError,
)
from embedtools.filters import Filter
from embedtools.search.plan import GATHER_FRACTION, Searcher, SearchPlan, plan_search
from embedtools.progress import check_progress, progress_bar, shows
from embedtools.protocols import DEFAULT_BLOCK_BYTES, ArrayBackend, Hasher, MemoryAccountant, Metric
from embedtools.quantize import Quantization, QuantizedIndex, check_quantization
from embedtools.records import StoreRecord, TableRecord, TableShape, verify_table
from embedtools.results import MemoryInfo, SearchResult, TableMemory
from embedtools.tables import F32_BYTES, Rotation, Table, TableState, rotation_cache_bytes
from embedtools.validation import (
    Labels,
    as_float32_matrix,
    as_labels,
    check_dimension,
    check_labels,
    check_positive_int,
    check_strings,
    encode_metadata,
    json_problem,
    label_kind,
)

if TYPE_CHECKING:
    from typing import Self

    import numpy.typing as npt

__all__ = ["GATHER_FRACTION", "EmbeddingStore"]

#: Queries per step of a search large enough to show progress (a bar shows only on a terminal).
_PROGRESS_QUERIES = 256
#: Values per float64 chunk when a rotation's moments are summed (8 MiB).
_MOMENT_CHUNK_VALUES = 1 << 20
#: Rows from which an add shows a (one-step) bar while the table is built.
_PROGRESS_ROWS = 100_000


def _release_all(accountant: MemoryAccountant, charges: dict[int, int], owners: dict[int, str]) -> None:
    """Finaliser: a store that is garbage-collected gives its bytes back to a shared accountant."""
    for d, nbytes in list(charges.items()):
        try:
            accountant.release(owners[d], nbytes)
        except EmbedtoolsError:  # pragma: no cover - the accountant was reset under us
            pass
    charges.clear()


def _free_ids(taken: Mapping[str, int], start: int, n: int) -> tuple[str, ...]:
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


P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", bound="EmbeddingStore")


def _exclusive(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
    """Runs a method under the store's lock: changes (and cache fills) happen one at a time, each
    seeing the last one's tables, so threads that add, update or search together lose nothing and
    charge nothing twice. Searches themselves run concurrently (tables are immutable once built)."""

    @functools.wraps(method)
    def locked(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class EmbeddingStore:
    """Tables of float32 embeddings keyed by dimension, with ids, labels and per-row metadata.

    Build one with ``Container().store()``, or directly from any :class:`ArrayBackend`,
    :class:`MemoryAccountant` and :class:`Hasher`. Safe to share between threads: changes are
    serialised, searches run side by side.
    """

    def __init__(
        self,
        backend: ArrayBackend[Any],
        accountant: MemoryAccountant,
        hasher: Hasher,
        *,
        search_block_bytes: int = DEFAULT_BLOCK_BYTES,
        progress: bool | None = None,
    ) -> None:
        self._backend = backend
        self._accountant = accountant
        self._hasher = hasher
        self._block_bytes = check_positive_int(search_block_bytes, "search_block_bytes")
        self._tables: dict[int, TableState] = {}
        self._config: dict[str, Any] = {}
        self._token = secrets.token_hex(4)
        self._charges: dict[int, int] = {}
        self._owners: dict[int, str] = {}
        self._mapped_from: Path | None = None
        self._progress = check_progress(progress)
        self._lock = threading.RLock()
        weakref.finalize(self, _release_all, accountant, self._charges, self._owners)

    # ------------------------------------------------------------------ collaborators and config

    @property
    def backend(self) -> ArrayBackend[Any]:
        return self._backend

    @property
    def accountant(self) -> MemoryAccountant:
        return self._accountant

    @property
    def hasher(self) -> Hasher:
        return self._hasher

    @property
    def config(self) -> dict[str, Any]:
        """The experiment configuration attached to this store (saved with it); a copy."""
        return json.loads(json.dumps(self._config))  # type: ignore[no-any-return]

    @config.setter
    @_exclusive
    def config(self, value: Mapping[str, object]) -> None:
        """Values the hasher has no encoding for raise :class:`UnhashableConfigError`; values it
        hashes but a file cannot carry exactly (NaN, ±inf, ints outside int64, nesting deeper than
        64) raise :class:`InvalidArgumentError`, by the rule load applies to a file's config
        (:func:`~embedtools.validation.json_problem`). Either way the old config stays."""
        self._hasher.hash_config(value)  # refuses what cannot be hashed, before anything changes
        try:
            plain = json.loads(json.dumps(dict(value)))
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"config is not JSON-serialisable: {exc}") from None
        problem = json_problem(plain)
        if problem is not None:
            raise InvalidArgumentError(f"config{problem}")
        self._config = plain

    @property
    def config_hash(self) -> str:
        return self._hasher.hash_config(self._config)

    # ------------------------------------------------------------------ shape of the store

    def __len__(self) -> int:
        # a copy: another thread's change must not resize the dict under the iteration
        return sum(state.rows for state in tuple(self._tables.values()))

    @property
    def dimensions(self) -> tuple[int, ...]:
        return tuple(sorted(self._tables))

    def __repr__(self) -> str:
        held = dict(self._tables)
        tables = ", ".join(f"{d}d: {held[d].rows} rows" for d in sorted(held))
        used = sum(tuple(self._charges.values()))
        return f"EmbeddingStore(backend={self._backend.name}/{self._backend.device}, tables={{{tables}}}, memory={format_bytes(used)})"

    def table(self, dimension: int) -> Table:
        d = check_dimension(dimension)
        return Table(d, self._state(d), self._backend)

    def _state(self, d: int) -> TableState:
        try:
            return self._tables[d]
        except KeyError:
            raise DimensionError(f"no table of dimension {d}; stored: {list(self.dimensions) or 'none'}") from None

    def _owner(self, d: int) -> str:
        return self._owners.setdefault(d, f"store-{self._token}/{d}d")

    # ------------------------------------------------------------------ writing

    @_exclusive
    def add(
        self,
        vectors: object,
        ids: Sequence[str] | None = None,
        labels: Sequence[str] | Sequence[int | np.integer[Any]] | npt.NDArray[np.integer[Any]] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        *,
        replace: bool = False,
    ) -> tuple[str, ...]:
        """Append rows ``(n, d)`` to the table of dimension ``d`` (created if absent); return their ids.

        Vectors are copied as float32. Omitted ids are the rows' positions in the table (``"0"``,
        ``"1"``, ...), except that a position whose id is already taken (by a row that survived a
        :meth:`remove`, or an id the caller chose) is skipped for the next integer that is free, so
        generated ids never collide; omitted labels are ``""`` and metadata ``{}``. ``replace=True`` swaps the whole
        table for these rows (the seed's ``add_embeddings``), charging only the size difference.

        Labels are str or int (class ids; numpy integers count, within int64), one kind per table,
        fixed by the add that creates it: a table of int labels has no default label, so its later
        adds must give labels, and labels of the other kind are refused.
        """
        self._check_writable()
        host = as_float32_matrix(vectors)
        n, d = host.shape
        old = None if replace else self._tables.get(d)
        start = old.rows if old is not None else 0
        new_ids = _free_ids(old.id_index if old is not None else {}, start, n) if ids is None else check_strings(ids, n, "ids")
        new_labels = self._new_labels(d, labels, n, old.labels if old is not None else None)
        new_meta = ("{}",) * n if metadata is None else encode_metadata(metadata, n)
        index = dict(old.id_index) if old is not None else {}
        for i, id_ in enumerate(new_ids):
            if id_ in index:
                where = "earlier in this call" if index[id_] >= start else f"row {index[id_]} of table {d}d"
                raise DuplicateIdError(f"id {id_!r} (row {i}) is already used {where}")
            index[id_] = start + i
        current = self._tables.get(d)
        kinds = tuple(current.quantized) if current is not None else ()
        rotation = current.rotation if current is not None else None
        table_bytes = TableShape(d, start + n, kinds, rotation.components if rotation else 0).nbytes

        def build() -> Mapping[int, TableState]:
            arr, norms = self._to_device(host, "vectors")
            if old is not None:
                arr = self._backend.concatenate([old.vectors, arr])
                norms = self._backend.concatenate([old.norms, norms])
            # quantised indexes and the rotation follow their table: rebuilt over all its rows
            full = np.asarray(self._backend.to_numpy(arr), dtype=np.float32) if kinds or rotation else host
            state = TableState(
                vectors=arr,
                norms=norms,
                ids=(old.ids if old else ()) + new_ids,
                labels=as_labels((old.labels if old else ()) + new_labels),
                metadata=(old.metadata if old else ()) + new_meta,
                id_index=index,
                quantized={kind: self._quantized(kind, full) for kind in kinds},
                rotation=self._rotate(full, rotation.matrix, rotation.components) if rotation else None,
            )
            return {d: state}

        with progress_bar(self._progress if n >= _PROGRESS_ROWS else False, 1, f"add {n} x {d}", "tables"):
            self._commit({d: table_bytes}, build)
        return new_ids

    @staticmethod
    def _new_labels(d: int, labels: object, n: int, existing: Labels | None) -> Labels:
        if labels is not None:
            try:
                return check_labels(labels, n, existing)
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(f"table {d}d: {exc}") from None
        if existing is not None and label_kind(existing) is int:
            raise InvalidArgumentError(f"table {d}d has int labels and int labels have no default; pass labels= for the new rows")
        return ("",) * n

    def _to_device(self, host: npt.NDArray[np.float32], what: str) -> tuple[Any, Any]:
        """The backend's copy of validated host vectors and their row norms (computed once, here)."""
        step = max(1, (1 << 24) // max(host.shape[1], 1))  # chunks, so a mapped table is not read whole
        if not all(np.isfinite(host[i : i + step]).all() for i in range(0, host.shape[0], step)):
            raise InvalidEmbeddingError(f"{what} contain NaN or infinite values")
        arr = self._backend.from_numpy(host)
        norms = self._backend.row_norms(arr)
        host_norms = self._backend.to_numpy(norms)
        if not np.isfinite(host_norms).all():
            row = int(np.flatnonzero(~np.isfinite(host_norms))[0])
            raise InvalidEmbeddingError(f"{what}: the norm of row {row} overflows float32")
        return arr, norms

    def _commit(self, new_bytes: Mapping[int, int], build: Callable[[], Mapping[int, TableState]]) -> None:
        """Reserve growth, build the tables, then swap them in; on any failure undo the reservations."""
        reserved: list[tuple[int, int]] = []
        try:
            for d, nbytes in new_bytes.items():
                delta = nbytes - self._charges.get(d, 0)
                if delta > 0:
                    self._accountant.reserve(self._owner(d), delta)
                    reserved.append((d, delta))
            built = build()
        except BaseException:
            for d, delta in reserved:
                self._accountant.release(self._owner(d), delta)
            raise
        for d, state in built.items():
            self._tables[d] = state
            delta = new_bytes[d] - self._charges.get(d, 0)
            if delta < 0:
                self._accountant.release(self._owner(d), -delta)
            self._charges[d] = new_bytes[d]

    @_exclusive
    def drop(self, dimension: int) -> None:
        """Remove one table and give its bytes back."""
        self._check_writable()
        d = check_dimension(dimension)
        self._state(d)
        del self._tables[d]
        self._accountant.release(self._owner(d), self._charges.pop(d))

    @_exclusive
    def clear(self) -> None:
        self._check_writable()
        for d in self.dimensions:
            self.drop(d)

    def _positions(self, d: int, ids: tuple[str, ...]) -> list[int]:
        index = self._state(d).id_index
        missing = [i for i in ids if i not in index]
        if missing:
            raise UnknownIdError(f"table {d}d has no row with id {missing[0]!r} ({len(missing)} unknown ids)")
        return [index[i] for i in ids]

    def _rebuilt(
        self, d: int, state: TableState, vectors: npt.NDArray[np.float32], ids: tuple[str, ...], labels: Labels, metadata: tuple[str, ...]
    ) -> TableState:
        """The table with new rows: vectors, norms, quantised indexes and rotation computed afresh."""
        arr, norms = self._to_device(vectors, f"table {d}d")
        return TableState(
            vectors=arr,
            norms=norms,
            ids=ids,
            labels=labels,
            metadata=metadata,
            id_index={id_: i for i, id_ in enumerate(ids)},
            quantized={kind: self._quantized(kind, vectors) for kind in state.quantized},
            rotation=self._rotate(vectors, state.rotation.matrix, state.rotation.components) if state.rotation else None,
        )

    @_exclusive
    def remove(self, ids: Sequence[str], dimension: int | None = None) -> int:
        """Remove the rows with these ids from the table of ``dimension``, or from every table that
        has them (``None``); return how many rows went. Their bytes go back to the budget; a table
        left without rows is dropped. An id found in no table raises :class:`UnknownIdError`."""
        self._check_writable()
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise InvalidArgumentError(f"ids must be a sequence of str, got {type(ids).__name__}")
        wanted = tuple(dict.fromkeys(check_strings(ids, len(ids), "ids")))
        dims = [check_dimension(dimension)] if dimension is not None else list(self.dimensions)
        for d in dims:
            self._state(d)
        if dimension is not None:
            self._positions(dims[0], wanted)
        else:
            found = {i for d in dims for i in wanted if i in self._tables[d].id_index}
            missing = [i for i in wanted if i not in found]
            if missing:
                raise UnknownIdError(f"no table has a row with id {missing[0]!r} ({len(missing)} unknown ids)")
        plans = {}
        for d in dims:
            state = self._tables[d]
            gone = {state.id_index[i] for i in wanted if i in state.id_index}
            if gone:
                plans[d] = np.array([r for r in range(state.rows) if r not in gone], dtype=np.int64)
        emptied = [d for d, keep in plans.items() if keep.size == 0]
        kept = {d: keep for d, keep in plans.items() if keep.size}

        def build() -> Mapping[int, TableState]:
            out = {}
            for d, keep in kept.items():
                state = self._tables[d]
                host = np.asarray(self._backend.to_numpy(state.vectors), dtype=np.float32)[keep]
                pick = keep.tolist()
                out[d] = self._rebuilt(
                    d, state, host, tuple(state.ids[i] for i in pick), as_labels([state.labels[i] for i in pick]),
                    tuple(state.metadata[i] for i in pick),
                )
            return out

        removed = sum(self._tables[d].rows - keep.size for d, keep in plans.items())
        self._commit({d: replace(self._tables[d].shape(d), rows=keep.size).nbytes for d, keep in kept.items()}, build)
        for d in emptied:
            self.drop(d)
        return removed

    @_exclusive
    def update(
        self,
        ids: Sequence[str],
        vectors: object = None,
        labels: Sequence[str] | Sequence[int | np.integer[Any]] | npt.NDArray[np.integer[Any]] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        *,
        dimension: int | None = None,
    ) -> None:
        """Replace the vectors, labels and/or metadata of existing rows, found by id, in one table
        (the vectors' width, or ``dimension``). Rows keep their positions; what is not given is kept."""
        self._check_writable()
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise InvalidArgumentError(f"ids must be a sequence of str, got {type(ids).__name__}")
        n = len(ids)
        keys = check_strings(ids, n, "ids")
        if len(set(keys)) != n:
            raise DuplicateIdError("an id is given twice in one update")
        host = None if vectors is None else as_float32_matrix(vectors)
        if host is None:
            if dimension is None:
                raise InvalidArgumentError("update needs vectors or a dimension to know which table")
            d = check_dimension(dimension)
        else:
            d = host.shape[1] if dimension is None else check_dimension(dimension)
            if host.shape != (n, d):
                raise DimensionError(f"vectors have shape {host.shape}; expected ({n}, {d}) for {n} ids in table {d}d")
        current = self._tables.get(d)
        new_labels = None if labels is None else self._new_labels(d, labels, n, current.labels if current else None)
        new_meta = None if metadata is None else encode_metadata(metadata, n)
        rows = self._positions(d, keys)
        state = self._tables[d]

        def build() -> Mapping[int, TableState]:
            all_rows = np.array(self._backend.to_numpy(state.vectors), dtype=np.float32, copy=True)
            if host is not None:
                all_rows[rows] = host
            labels_out: list[str | int] = list(state.labels)
            meta_out = list(state.metadata)
            for j, r in enumerate(rows):
                if new_labels is not None:
                    labels_out[r] = new_labels[j]
                if new_meta is not None:
                    meta_out[r] = new_meta[j]
            return {d: self._rebuilt(d, state, all_rows, state.ids, as_labels(labels_out), tuple(meta_out))}

        self._commit({d: state.shape(d).nbytes}, build)

    @_exclusive
    def quantize(self, dimension: int, kind: Quantization) -> None:
        """Give the table of ``dimension`` a quantised index (``float16``, ``bfloat16``, ``int8`` or
        ``binary``), kept on the backend's device beside the table.

        The index is charged to the budget (its real bytes) and kept with the table through later
        adds, saves and loads; ``search(..., quantized=kind)`` then shortlists with it.
        Quantising again recalibrates. A 16-bit float index refuses tables with values beyond its
        range (and later adds of such values).
        """
        self._check_writable()
        d = check_dimension(dimension)
        kind = check_quantization(kind)
        state = self._state(d)
        kinds = tuple(sorted({*state.quantized, kind}))
        new_bytes = self._charges[d] - state.shape(d).nbytes + replace(state.shape(d), quantized=kinds).nbytes

        def build() -> Mapping[int, TableState]:
            host = np.asarray(self._backend.to_numpy(state.vectors), dtype=np.float32)
            return {d: replace(state, quantized={**state.quantized, kind: self._quantized(kind, host)})}

        self._commit({d: new_bytes}, build)

    def _quantized(self, kind: Quantization, host: npt.NDArray[np.float32]) -> QuantizedIndex[Any]:
        """An index built on the host (the same codes on every backend), kept on the backend's device."""
        return QuantizedIndex.build(kind, host).to_backend(self._backend)

    @_exclusive
    def fit_rotation(self, dimension: int, components: int | None = None) -> None:
        """Fit a PCA rotation on the table of ``dimension`` for funnel search on models not trained
        with a Matryoshka loss.

        The rotation (principal axes of the rows, by falling variance) is stored with the table, and
        the rows rotated onto its first ``components`` axes (default: a quarter of the width) are kept
        beside it. Funnel stages up to ``components`` wide then shortlist in that rotated space
        (queries are rotated too), where a prefix carries the most variance; the final stage still
        rescores against the original vectors, so scores stay exact. Everything is charged; fitting
        again replaces the rotation. The stored vectors themselves are never changed.
        """
        self._check_writable()
        d = check_dimension(dimension)
        state = self._state(d)
        p = max(d // 4, 1) if components is None else check_positive_int(components, "components", upper=d)
        new_bytes = self._charges[d] - rotation_cache_bytes(state) - state.shape(d).nbytes
        new_bytes += replace(state.shape(d), rotation=p).nbytes

        def build() -> Mapping[int, TableState]:
            host = np.asarray(self._backend.to_numpy(state.vectors), dtype=np.float32)
            moments = np.zeros((d, d), dtype=np.float64)
            step = max(1, _MOMENT_CHUNK_VALUES // d)  # float64 chunks, not a float64 copy of the table
            for start in range(0, host.shape[0], step):
                chunk = host[start : start + step].astype(np.float64)
                moments += chunk.T @ chunk
            eigenvalues, eigenvectors = np.linalg.eigh(moments)
            matrix = np.ascontiguousarray(eigenvectors[:, np.argsort(eigenvalues)[::-1]], dtype=np.float32)
            return {d: replace(state, rotation=self._rotate(host, matrix, p))}

        self._commit({d: new_bytes}, build)

    @_exclusive
    def drop_rotation(self, dimension: int) -> None:
        self._check_writable()
        d = check_dimension(dimension)
        state = self._state(d)
        if state.rotation is None:
            raise InvalidArgumentError(f"table {d}d has no rotation")
        new_bytes = self._charges[d] - rotation_cache_bytes(state) - state.shape(d).nbytes
        new_bytes += replace(state.shape(d), rotation=0).nbytes
        self._commit({d: new_bytes}, lambda: {d: replace(state, rotation=None)})

    def _rotate(self, host: npt.NDArray[np.float32], matrix: npt.NDArray[np.float32], components: int) -> Rotation:
        prefix = np.ascontiguousarray(host @ matrix[:, :components], dtype=np.float32)
        return Rotation(matrix=matrix, components=components, prefix=self._backend.from_numpy(prefix))

    @_exclusive
    def drop_quantized(self, dimension: int, kind: Quantization) -> None:
        """Remove one quantised index and give its bytes back."""
        self._check_writable()
        d = check_dimension(dimension)
        kind = check_quantization(kind)
        state = self._state(d)
        if kind not in state.quantized:
            raise InvalidArgumentError(f"table {d}d has no {kind} index")
        remaining = {k: v for k, v in state.quantized.items() if k != kind}
        new_bytes = self._charges[d] - state.quantized[kind].nbytes
        self._commit({d: new_bytes}, lambda: {d: replace(state, quantized=remaining)})

    # ------------------------------------------------------------------ searching

    def search(
        self,
        queries: object,
        k: int = 10,
        dimension: int | None = None,
        metric: Metric = "cosine",
        *,
        funnel: Sequence[tuple[int, int]] = (),
        quantized: Quantization | None = None,
        rescore: int = 4,
        rescore_with: Quantization | None = None,
        where: Filter | None = None,
    ) -> SearchResult:
        """Exact top-``k`` for each query (``(d,)`` or ``(q, d)``) in the table of that dimension.

        ``dimension=None`` searches the table as wide as the queries. A smaller ``dimension``
        searches the first ``dimension`` columns (Matryoshka prefix) of the queries and of the
        table of that width, or of the narrowest wider table, without copying it.

        ``funnel=[(64, 200), (128, 50)]`` is Matryoshka funnel search: the 200 best rows at the
        64-d prefix (an exact search there), rescored at 128-d down to 50, then rescored at
        ``dimension`` down to ``k``. Returned scores are ``dimension``-wide scores; results are exact
        for the shortlist, so recall depends on how much the prefixes carry.

        ``quantized="int8"`` (or ``"float16"``, ``"bfloat16"``, ``"binary"``; see :meth:`quantize`)
        shortlists the ``k * rescore`` best rows by the quantised index, then rescores them exactly
        against the float32 table: scores are exact, recall depends on ``rescore``. It combines
        with ``where``, not with ``funnel``. ``rescore_with="int8"`` (any index the table has)
        rescores the shortlist against that index's values instead of the float32 rows: scores are
        then that index's approximations, and the float32 table is not read at all — what a
        memory-mapped table wants (``quantized="binary", rescore_with="int8"``: 1/32 + 1/4 of float32
        in memory, nothing read from disk).

        ``where=Label("a") & Meta("year").between(2020, None)`` (see :mod:`embedtools.filters`)
        searches only the rows that match: exact top-k among them, fewer than ``k`` columns when
        fewer match (none: an empty result). A selective filter gathers its rows and searches only
        those; a broad one masks the others inside the blocked kernel.
        """
        plan = plan_search(dict(self._tables), queries, k, dimension, metric, funnel=funnel, quantized=quantized,
                           rescore=rescore, rescore_with=rescore_with, where=where)  # fmt: skip
        q, kk, state = plan.queries, plan.k, plan.state
        if q.shape[0] == 0 or kk == 0:
            scores = np.empty((q.shape[0], kk), dtype=np.float32)
            indices = np.empty((q.shape[0], kk), dtype=np.int64)
        else:
            # only a search that will draw a bar is cut into steps (each reads the table once more)
            step = max(_PROGRESS_QUERIES, -(-q.shape[0] // 20))
            split = shows(self._progress) and q.shape[0] > step
            chunks = [slice(i, i + step) for i in range(0, q.shape[0], step)] if split else [slice(None)]
            parts = []
            with progress_bar(self._progress if len(chunks) > 1 else False, q.shape[0], "search", "queries") as bar:
                for chunk in chunks:
                    parts.append(self._run_plan(plan, q[chunk]))
                    bar.update(len(parts[-1][1]))
            scores = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
            indices = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        scores.setflags(write=False)
        indices.setflags(write=False)
        return SearchResult(indices=indices, scores=scores, metric=plan.metric, dimension=plan.dim, source_dimension=plan.source, row_ids=state.ids)

    def _run_plan(self, plan: SearchPlan, q: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        return Searcher(self._backend, self._block_bytes, functools.partial(self._cached, plan.state)).run(plan, q)

    @_exclusive
    def _cached(
        self, state: TableState, cache: dict[int, Any], key: int, source: int, nbytes: int, compute: Callable[[], Any]
    ) -> Any:
        """``cache[key]``, computed once and kept if the budget has room (charged to the table);
        otherwise computed for this search only — a search never fails for want of a cache.

        Only the version ``state`` that is still the current table of ``source`` keeps (and is
        charged for) a cache: a search that started on a version since replaced, removed or dropped
        would otherwise charge its successor, or an emptied store, for a cache no one can free."""
        value = cache.get(key)
        if value is None:
            value = compute()
            if self._tables.get(source) is not state:
                return value
            try:
                self._accountant.reserve(self._owner(source), nbytes)
            except MemoryLimitError:
                return value
            cache[key] = value
            self._charges[source] += nbytes
        return value

    # ------------------------------------------------------------------ memory

    @_exclusive
    def memory_info(self) -> MemoryInfo:
        report = self._accountant.report()
        tables = {
            d: TableMemory(
                dimension=d,
                rows=self._tables[d].rows,
                dtype="float32",
                nbytes=self._charges[d],
                quantized={kind: index.nbytes for kind, index in self._tables[d].quantized.items()},
                mapped=self._mapped_from is not None,
            )
            for d in self.dimensions
        }
        return MemoryInfo(
            used_bytes=report.used_bytes,
            limit_bytes=report.limit_bytes,
            store_bytes=sum(self._charges.values()),
            tables=tables,
        )

    # ------------------------------------------------------------------ files

    @_exclusive
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the store to one file, atomically: the old file survives any failure or crash.

        Only a regular file is replaced (a symlink to one has its target replaced); anything else is an
        :class:`InvalidArgumentError`, and a failure to write is a :class:`StoreWriteError`.
        """
        target = fileformat.as_store_path(path)
        with progress_bar(self._progress, len(self._tables) + 1, f"save {target.name}", "steps") as bar:
            tables = []
            for _, state in sorted(self._tables.items()):
                tables.append(
                    TableRecord(
                        vectors=np.asarray(self._backend.to_numpy(state.vectors), dtype=np.float32),
                        ids=state.ids,
                        labels=state.labels,
                        metadata=state.metadata,
                        quantized=tuple(state.quantized[kind].to_host(self._backend) for kind in sorted(state.quantized)),
                        rotation=state.rotation.matrix if state.rotation else None,
                        rotation_components=state.rotation.components if state.rotation else 0,
                    )
                )
                bar.update()
            fileformat.write_store(target, StoreRecord(tables=tuple(tables), config=self._config), self.config_hash)
            bar.update()

    @_exclusive
    def load(self, path: str | os.PathLike[str], *, mmap: bool = False) -> Self:
        """Fill this empty store from an embedtools file or a seed ``save_to_disk`` folder; return it.

        The memory budget is charged from the file's header before any vector is read; if anything
        fails (budget, checksum, format) the store is left empty and nothing stays reserved.

        ``mmap=True`` (NumPy backend, embedtools files) maps the tables read-only from the file
        instead of reading them into memory: a table larger than RAM is searched block by block at
        disk speed, the budget charges only what is resident (norms, ids, indexes), and the store is
        read-only (:class:`ReadOnlyStoreError`) until :meth:`materialize` copies it into memory.
        Torch and MLX keep tables in their own (device) memory and refuse ``mmap``.
        """
        if self._tables:
            raise StoreNotEmptyError(f"load fills an empty store; this one holds tables {list(self.dimensions)}")
        p = Path(path)
        if not p.exists():
            raise StoreNotFoundError(f"no store at {p}")
        if mmap and self._backend.name != "numpy":
            raise InvalidArgumentError(f"mmap=True needs the numpy backend; {self._backend.name} copies tables to its device")
        if p.is_dir():
            if mmap:
                raise InvalidArgumentError("mmap=True reads embedtools files; convert a seed folder first")
            if not seed_format.is_seed_folder(p):
                raise StoreNotFoundError(f"{p} is a folder without metadata.json (not a seed store)")
            shapes: tuple[TableShape, ...] = seed_format.read_seed_shapes(p)
        else:
            shapes = tuple(replace(shape, mapped=mmap) for shape in fileformat.read_table_shapes(p, hasher=self._hasher))
        loaded: list[StoreRecord] = []

        def build() -> Mapping[int, TableState]:
            with progress_bar(self._progress, len(shapes) + 1, f"load {p.name}", "steps") as bar:
                record = seed_format.read_seed_store(p) if p.is_dir() else fileformat.read_store(p, mmap=mmap, hasher=self._hasher)[0]
                bar.update()
                if {t.dimension: len(t.ids) for t in record.tables} != {s.dimension: s.rows for s in shapes}:
                    raise StoreFormatError(f"{p} changed while it was being loaded")
                loaded.append(record)
                states = {}
                for table in record.tables:
                    states[table.dimension] = self._state_from_record(table)
                    bar.update()
            return states

        self._commit({s.dimension: s.nbytes for s in shapes}, build)
        self._config = dict(loaded[0].config)
        self._mapped_from = p if mmap and shapes else None
        return self

    @property
    def mapped_from(self) -> Path | None:
        """The file this store's tables are memory-mapped from (read-only until materialised)."""
        return self._mapped_from

    @_exclusive
    def materialize(self) -> None:
        """Copy memory-mapped tables into memory (charging them) and make the store writable."""
        if self._mapped_from is None:
            return
        new_bytes = {d: self._charges[d] + state.rows * d * F32_BYTES for d, state in self._tables.items()}

        def build() -> Mapping[int, TableState]:
            return {
                d: replace(state, vectors=self._backend.from_numpy(np.array(state.vectors, dtype=np.float32)))
                for d, state in self._tables.items()
            }

        self._commit(new_bytes, build)
        self._mapped_from = None

    def _check_writable(self) -> None:
        if self._mapped_from is not None:
            raise ReadOnlyStoreError(
                f"this store's tables are memory-mapped from {self._mapped_from} and read-only; "
                "call store.materialize() to copy them into memory first"
            )

    def _state_from_record(self, record: TableRecord) -> TableState:
        index = verify_table(record, finite=False)  # _to_device checks finiteness
        arr, norms = self._to_device(record.vectors, f"table {record.dimension}d")
        return TableState(
            vectors=arr,
            norms=norms,
            ids=record.ids,
            labels=record.labels,
            metadata=record.metadata,
            id_index=index,
            quantized={q.kind: q.to_backend(self._backend) for q in record.quantized},
            rotation=(
                self._rotate(record.vectors, record.rotation, record.rotation_components)
                if record.rotation is not None
                else None
            ),
        )
