"""EmbeddingStore: tables of embeddings keyed by dimension, searched exactly, saved atomically.

A facade: each change reads validate (:mod:`embedtools.validation`) → bill and reserve
(:mod:`embedtools.ledger`) → build (:func:`embedtools.tables.build_table`) → commit, so a change
either completes or leaves tables, budget and files as they were. The store never imports a
concrete backend: the container (or the caller) hands it one.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, TypeVar

from embedtools import fileformat
from embedtools.budget import format_bytes
from embedtools.errors import DimensionError, InvalidArgumentError, ReadOnlyStoreError, StoreNotEmptyError
from embedtools.filters import Filter
from embedtools.ledger import Ledger, kept_caches_bill, rebuilt_bill
from embedtools.persistence import read_shapes, read_tables, row_ranges, snapshot
from embedtools.progress import check_progress, progress_bar
from embedtools.protocols import DEFAULT_BLOCK_BYTES, ArrayBackend, Hasher, MemoryAccountant, Metric
from embedtools.quantize import Quantization, check_quantization
from embedtools.results import MemoryInfo, SearchResult
from embedtools.search.auto_screen import auto_screened
from embedtools.search.plan import plan_search
from embedtools.search.searcher import GATHER_FRACTION, Searcher, run_search
from embedtools.tables import Table, TableState, appended, kept_rows, labels_for, materialized, new_rows
from embedtools.tables import positions, removal, replaced_rows, with_index, with_rotation
from embedtools.validation import JSONObject, LabelsArg, as_config, as_float32_matrix, check_dimension
from embedtools.validation import check_ids, check_positive_int, check_update, encode_metadata

if TYPE_CHECKING:
    from typing import Self

__all__ = ["GATHER_FRACTION", "EmbeddingStore"]

#: Rows from which an add shows a (one-step) bar while the table is built.
_PROGRESS_ROWS = 100_000

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", bound="EmbeddingStore")


class EmbeddingStore:
    """Tables of float32 embeddings keyed by dimension, with ids, labels and per-row metadata.

    Build one with ``Container().store()``, or directly from any :class:`ArrayBackend`,
    :class:`MemoryAccountant` and :class:`Hasher`. Safe to share between threads: changes are
    serialised, searches run side by side. :meth:`table` and :meth:`memory_info` show what it holds
    (rows, indexes, rotation, search caches) and what each part costs.
    """

    def __init__(self, backend: ArrayBackend[Any], accountant: MemoryAccountant, hasher: Hasher, *,
                 search_block_bytes: int = DEFAULT_BLOCK_BYTES, progress: bool | None = None,
                 auto_screen: bool = True) -> None:  # fmt: skip
        """``auto_screen``: let plain exact searches screen by a charged bfloat16/float16 index where
        the backend measured that GEMM fast (:func:`embedtools.search.auto_screen.auto_screened`)."""
        self._backend = backend
        self._accountant = accountant
        self._hasher = hasher
        self._block_bytes = check_positive_int(search_block_bytes, "search_block_bytes")
        self._tables: dict[int, TableState[Any]] = {}
        self._config: JSONObject = {}
        self._ledger = Ledger(accountant, secrets.token_hex(4), self)
        self._mapped_from: Path | None = None
        self._progress = check_progress(progress)
        self._lock = threading.RLock()
        self._auto_screen = auto_screen is True

    @staticmethod
    def _exclusive(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
        """Runs a method under the store's lock: changes (and cache fills) happen one at a time,
        each seeing the last one's tables, so threads that add, update or search together lose
        nothing and charge nothing twice. Searches run concurrently (tables are immutable once built)."""

        @functools.wraps(method)
        def locked(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
            with self._lock:
                return method(self, *args, **kwargs)

        return locked

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
    def progress(self) -> bool | None:
        """Whether changes and long searches draw progress bars (``None``: only on a terminal)."""
        return self._progress

    @property
    def config(self) -> JSONObject:
        """The experiment configuration attached to this store (saved with it); a copy."""
        copy: JSONObject = json.loads(json.dumps(self._config))
        return copy

    @config.setter
    @_exclusive
    def config(self, value: Mapping[str, object]) -> None:
        """Values the hasher has no encoding for raise :class:`UnhashableConfigError`; values it
        hashes but a file cannot carry exactly (NaN, ±inf, ints outside int64, nesting deeper than
        64) raise :class:`InvalidArgumentError`, by the rule load applies to a file's config
        (:func:`~embedtools.validation.json_problem`). Either way the old config stays."""
        self._hasher.hash_config(value)  # refuses what cannot be hashed, before anything changes
        self._config = as_config(value)

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
        return f"EmbeddingStore(backend={self._backend.name}/{self._backend.device}, tables={{{tables}}}, memory={format_bytes(self._ledger.total)})"

    def table(self, dimension: int) -> Table:
        """A read-only snapshot of one table: rows, ids, labels, metadata, indexes, rotation, caches."""
        d = check_dimension(dimension)
        return Table(d, self._state(d), self._backend)

    def _state(self, d: int) -> TableState[Any]:
        try:
            return self._tables[d]
        except KeyError:
            raise DimensionError(f"no table of dimension {d}; stored: {list(self.dimensions) or 'none'}") from None

    # ------------------------------------------------------------------ writing

    @_exclusive
    def add(self, vectors: object, ids: Sequence[str] | None = None, labels: LabelsArg | None = None,
            metadata: Sequence[Mapping[str, object]] | None = None, *, replace: bool = False) -> tuple[str, ...]:  # fmt: skip
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
        current = self._tables.get(d)
        old = None if replace else current
        rows = new_rows(d, old, n, ids, labels, metadata)
        bill = rebuilt_bill(d, current, (old.rows if old is not None else 0) + n)

        show = self._progress if n >= _PROGRESS_ROWS else False
        with progress_bar(show, 1, f"add {n} x {d}", "tables"), self._ledger.reserving({d: bill}):
            state = appended(self._backend, old, host, rows, like=current)
        self._tables[d] = state
        return rows.ids

    @_exclusive
    def drop(self, dimension: int) -> None:
        """Remove one table and give its bytes back."""
        self._check_writable()
        d = check_dimension(dimension)
        self._state(d)
        del self._tables[d]
        self._ledger.release(d)

    @_exclusive
    def clear(self) -> None:
        self._check_writable()
        for d in self.dimensions:
            self.drop(d)

    @_exclusive
    def remove(self, ids: Sequence[str], dimension: int | None = None) -> int:
        """Remove the rows with these ids from the table of ``dimension``, or from every table that
        has them (``None``); return how many rows went. Their bytes go back to the budget; a table
        left without rows is dropped. An id found in no table raises :class:`UnknownIdError`."""
        self._check_writable()
        wanted = tuple(dict.fromkeys(check_ids(ids)))
        dims = [check_dimension(dimension)] if dimension is not None else list(self.dimensions)
        plans = removal({d: self._state(d) for d in dims}, wanted, named=dimension is not None)
        kept = {d: keep for d, keep in plans.items() if keep.size}
        bills = {d: rebuilt_bill(d, self._tables[d], keep.size) for d, keep in kept.items()}

        with self._ledger.reserving(bills):
            built = {d: kept_rows(self._backend, self._tables[d], keep, d) for d, keep in kept.items()}
        removed = sum(self._tables[d].rows - keep.size for d, keep in plans.items())
        self._tables.update(built)
        for d in (d for d, keep in plans.items() if keep.size == 0):
            self.drop(d)
        return removed

    @_exclusive
    def update(self, ids: Sequence[str], vectors: object = None, labels: LabelsArg | None = None,
               metadata: Sequence[Mapping[str, object]] | None = None, *, dimension: int | None = None) -> None:  # fmt: skip
        """Replace the vectors, labels and/or metadata of existing rows, found by id, in one table
        (the vectors' width, or ``dimension``). Rows keep their positions; what is not given is kept."""
        self._check_writable()
        keys = check_ids(ids, unique=True)
        n = len(keys)
        host, d = check_update(vectors, dimension, n)
        current = self._tables.get(d)
        new_labels = None if labels is None else labels_for(d, labels, n, current.labels if current else None)
        new_meta = None if metadata is None else encode_metadata(metadata, n)
        state = self._state(d)
        rows = positions(state, d, keys)

        with self._ledger.reserving({d: rebuilt_bill(d, state, state.rows)}):
            new = replaced_rows(self._backend, state, rows, d, host, new_labels, new_meta)
        self._tables[d] = new

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
        bill = kept_caches_bill(d, state, quantized=tuple(sorted({*state.quantized, kind})))

        with self._ledger.reserving({d: bill}):
            new = with_index(self._backend, state, kind)
        self._tables[d] = new

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
        self._ledger.settle({d: kept_caches_bill(d, state, quantized=tuple(remaining))})  # allocates nothing
        self._tables[d] = replace(state, quantized=remaining)

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
        bill = kept_caches_bill(d, state, rotation_caches=False, rotation=p)

        with self._ledger.reserving({d: bill}):
            new = with_rotation(self._backend, state, p)
        self._tables[d] = new

    @_exclusive
    def drop_rotation(self, dimension: int) -> None:
        self._check_writable()
        d = check_dimension(dimension)
        state = self._state(d)
        if state.rotation is None:
            raise InvalidArgumentError(f"table {d}d has no rotation")
        self._ledger.settle({d: kept_caches_bill(d, state, rotation_caches=False, rotation=0)})  # allocates nothing
        self._tables[d] = replace(state, rotation=None)

    # ------------------------------------------------------------------ memory

    @_exclusive
    def memory_info(self) -> MemoryInfo:
        """The accountant's totals and, per table, what this store is charged and for what."""
        return self._ledger.memory_info(self._tables, mapped=self._mapped_from is not None)

    # ------------------------------------------------------------------ files

    @_exclusive
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the store to one file, atomically: the old file survives any failure or crash.

        Only a regular file is replaced (a symlink to one has its target replaced); anything else is an
        :class:`InvalidArgumentError`, and a failure to write is a :class:`StoreWriteError`.
        """
        target = fileformat.as_store_path(path)
        with progress_bar(self._progress, len(self._tables) + 1, f"save {target.name}", "steps") as bar:
            record = snapshot(self._backend, self._tables, self._config, step=bar.update)
            fileformat.write_store(target, record, self.config_hash)
            bar.update()

    @_exclusive
    def load(self, path: str | os.PathLike[str], *, mmap: bool = False, rows: Mapping[int, tuple[int, int]] | None = None) -> Self:
        """Fill this empty store from an embedtools file or a seed ``save_to_disk`` folder; return it.

        The memory budget is charged from the file's header before any vector is read; if anything
        fails (budget, checksum, format) the store is left empty and nothing stays reserved.

        ``mmap=True`` (NumPy backend, embedtools files) maps the tables read-only from the file: a
        table larger than RAM is searched at disk speed, the budget charges only what is resident,
        and the store is read-only (:class:`ReadOnlyStoreError`) until :meth:`materialize`. Torch
        and MLX keep tables in their own (device) memory and refuse ``mmap``. ``rows={384: (0, n)}``
        loads only those row ranges of the named tables: how a sharded store's workers each read
        their part of one file.
        """
        if self._tables:
            raise StoreNotEmptyError(f"load fills an empty store; this one holds tables {list(self.dimensions)}")
        p, shapes = read_shapes(path, mmap=mmap, backend_name=self._backend.name, hasher=self._hasher)
        billed = shapes if rows is None else row_ranges(shapes, rows)
        bills = {s.dimension: s.nbytes for s in billed}
        with self._ledger.reserving(bills), progress_bar(self._progress, len(billed) + 1, f"load {p.name}", "steps") as bar:
            built, config = read_tables(self._backend, p, shapes, mmap=mmap, hasher=self._hasher, step=bar.update, rows=rows)
        self._tables.update(built)
        self._config = config
        self._mapped_from = p if mmap and billed else None
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
        bills = {d: kept_caches_bill(d, state, mapped=False) for d, state in self._tables.items()}
        with self._ledger.reserving(bills):
            built = {d: materialized(self._backend, state) for d, state in self._tables.items()}
        self._tables.update(built)
        self._mapped_from = None

    def _check_writable(self) -> None:
        if self._mapped_from is not None:
            raise ReadOnlyStoreError(
                f"this store's tables are memory-mapped from {self._mapped_from} and read-only; "
                "call store.materialize() to copy them into memory first"
            )

    # ------------------------------------------------------------------ searching (embedtools.search.plan plans it)

    def search(self, queries: object, k: int = 10, dimension: int | None = None, metric: Metric = "cosine", *,
               funnel: Sequence[tuple[int, int]] = (), quantized: Quantization | None = None, rescore: int | Literal["certified"] = 4,
               rescore_with: Quantization | None = None, where: Filter | None = None) -> SearchResult:  # fmt: skip
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
        with ``where``, not with ``funnel``. ``rescore_with="int8"`` rescores against that index's
        values instead, so the float32 rows are never read (a memory-mapped table's choice:
        ``quantized="binary", rescore_with="int8"``); scores are then the index's approximations.

        ``rescore="certified"`` makes a quantised (``bfloat16``, ``float16``, ``int8``) or one-stage
        funnel search exact: the shortlist grows as a proven bound on the screen's error requires and
        is rescored in float64, so ids are the exact top k (ties to the lower row) for any data
        (:mod:`embedtools.search.certified`; ``result.rescored`` and ``result.screen`` say what ran).
        A plain exact search may screen so by itself (:func:`embedtools.search.auto_screen.auto_screened`).

        ``where=Label("a") & Meta("year").between(2020, None)`` (see :mod:`embedtools.filters`)
        searches only the rows that match: exact top-k among them, fewer than ``k`` columns when
        fewer match (none: an empty result). A selective filter gathers its rows and searches only
        those; a broad one masks the others inside the blocked kernel.
        """
        plan = plan_search(dict(self._tables), queries, k, dimension, metric, funnel=funnel, quantized=quantized,
                           rescore=rescore, rescore_with=rescore_with, where=where)  # fmt: skip
        plan = auto_screened(plan, self._backend, self._auto_screen)
        searcher = Searcher(self._backend, self._block_bytes, functools.partial(self._cached, plan.state))
        return run_search(searcher, plan, self._progress)

    @_exclusive
    def _cached(self, state: TableState[Any], cache: dict[int, Any], key: int, source: int, nbytes: int, compute: Callable[[], Any]) -> Any:
        """The search code's ``Cache``: the ledger keeps (and charges) a cache only for the
        version ``state`` that is still the current table of ``source``."""
        return self._ledger.cached(cache, key, source, nbytes, compute, current=lambda: self._tables.get(source) is state)
