"""The store's byte ledger: what each table costs, and the reservations that pay for it.

Every byte a store holds for a table — float32 rows, norms, quantised indexes, a PCA rotation and
the caches searches fill (prefix norms, unit prefixes, rotated norms) — is billed here and nowhere
else, so the budget, ``memory_info`` and the file header's load-time charge cannot drift apart.
A change reserves its growth before anything is allocated and settles (or rolls back) after, so a
failure anywhere leaves the accountant exactly as it was.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Generator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from embedtools.errors import EmbedtoolsError, MemoryLimitError
from embedtools.protocols import MemoryAccountant, Quantization
from embedtools.quantize import QuantizedIndex
from embedtools.results import MemoryInfo, TableMemory

if TYPE_CHECKING:
    from embedtools.tables import TableState

__all__ = ["F32_BYTES", "Ledger", "cache_bytes", "kept_caches_bill", "rebuilt_bill", "table_bytes", "table_caches"]

F32_BYTES = 4


def table_bytes(dimension: int, rows: int, quantized: tuple[Quantization, ...] = (), rotation: int = 0, *, mapped: bool = False) -> int:
    """A table's bill before any cache: float32 vectors (unless memory-mapped from the file) and one
    norm per row, each quantised index, and a PCA rotation (its ``d x d`` matrix and the rows
    rotated onto ``rotation`` axes). Known from a file header alone, so load charges before reading."""
    total = rows * ((0 if mapped else dimension) + 1) * F32_BYTES
    total += sum(QuantizedIndex.nbytes_for(kind, rows, dimension) for kind in quantized)
    if rotation:
        total += (dimension * dimension + rows * rotation) * F32_BYTES
    return total


def table_caches(state: TableState[Any]) -> dict[str, int]:
    """The caches a table version keeps, by name (``prefix_norms/8``, ``unit_prefix/8``,
    ``rotation_norms/8``), with their bytes: a cache is in its dict exactly when it is charged."""
    row = state.rows * F32_BYTES
    caches = {f"prefix_norms/{dim}": row for dim in sorted(state.prefix_norms)}
    caches.update({f"unit_prefix/{dim}": row * dim for dim in sorted(state.unit_prefixes)})
    caches.update({f"bound_prefix/{dim}": row * (dim + 1) for dim in sorted(state.bound_prefixes)})
    caches.update({f"screen_error/{kind}": row for kind in sorted(kind for kind, _ in state.screen_errors.values())})
    if state.rotation is not None:
        caches.update({f"rotation_norms/{dim}": row for dim in sorted(state.rotation.norms)})
        caches.update({f"rotation_unit_prefix/{dim}": row * dim for dim in sorted(state.rotation.unit_prefixes)})
        caches.update({f"rotation_bound_prefix/{dim}": row * (dim + 1) for dim in sorted(state.rotation.bound_prefixes)})
    return caches


def cache_bytes(state: TableState[Any], *, rotation: bool = True) -> int:
    """What ``state``'s caches are charged; ``rotation=False`` leaves out the rotation's own norm
    caches, which go with the rotation when it is refitted or dropped."""
    caches = table_caches(state)
    return sum(nbytes for name, nbytes in caches.items() if rotation or not name.startswith("rotation_"))


def kept_caches_bill(dimension: int, state: TableState[Any], *, rotation_caches: bool = True, **shape: Any) -> int:
    """The bill of ``state`` with its :class:`~embedtools.records.TableShape` fields changed by
    ``shape``, keeping the caches it already holds (its rotation's only while the rotation stays)."""
    return replace(state.shape(dimension), **shape).nbytes + cache_bytes(state, rotation=rotation_caches)


def rebuilt_bill(dimension: int, like: TableState[Any] | None, rows: int) -> int:
    """The bill of a new version of ``rows`` rows carrying ``like``'s indexes and rotation (none
    without it), rebuilt over every row: its caches start empty."""
    return table_bytes(dimension, rows) if like is None else replace(like.shape(dimension), rows=rows).nbytes


def _release_all(accountant: MemoryAccountant, charges: dict[int, int], owners: dict[int, str]) -> None:
    """Finaliser: a store that is garbage-collected gives its bytes back to a shared accountant."""
    for d, nbytes in list(charges.items()):
        try:
            accountant.release(owners[d], nbytes)
        except EmbedtoolsError:  # pragma: no cover - the accountant was reset under us
            pass
    charges.clear()


class Ledger:
    """One store's charges, a total per table, held with the (possibly shared) accountant.

    Not locked itself: the store calls it under its own lock, so a bill and the tables it describes
    are always read together.
    """

    def __init__(self, accountant: MemoryAccountant, token: str, holder: object) -> None:
        self._accountant = accountant
        self._token = token
        self._charges: dict[int, int] = {}
        self._owners: dict[int, str] = {}
        # the finaliser holds the dicts, not the holder: a dropped store still pays its bytes back
        weakref.finalize(holder, _release_all, accountant, self._charges, self._owners)

    def owner(self, dimension: int) -> str:
        """The accountant's name for a table's charge (stable for the store's life)."""
        return self._owners.setdefault(dimension, f"store-{self._token}/{dimension}d")

    def charged(self, dimension: int) -> int:
        return self._charges.get(dimension, 0)

    @property
    def total(self) -> int:
        return sum(tuple(self._charges.values()))

    @contextmanager
    def reserving(self, bills: Mapping[int, int]) -> Generator[None, None, None]:
        """Reserve what ``bills`` (table -> its whole new charge) add, run the block, then settle:
        shrinkage is released and the new totals recorded. If reserving or the block fails, every
        reservation made here is released and the exception goes on; the old charges stand."""
        reserved: list[tuple[int, int]] = []
        try:
            for d, nbytes in bills.items():
                delta = nbytes - self.charged(d)
                if delta > 0:
                    self._accountant.reserve(self.owner(d), delta)
                    reserved.append((d, delta))
            yield
        except BaseException:
            for d, delta in reserved:
                self._accountant.release(self.owner(d), delta)
            raise
        for d, nbytes in bills.items():
            delta = nbytes - self.charged(d)
            if delta < 0:
                self._accountant.release(self.owner(d), -delta)
            self._charges[d] = nbytes

    def settle(self, bills: Mapping[int, int]) -> None:
        """Record new bills for a change that allocates nothing (dropping an index or a rotation)."""
        with self.reserving(bills):
            pass

    def release(self, dimension: int) -> None:
        """Give back a dropped table's whole charge."""
        self._accountant.release(self.owner(dimension), self._charges.pop(dimension))

    def cached(
        self,
        cache: dict[int, Any],
        key: int,
        source: int,
        nbytes: int,
        compute: Callable[[], Any],
        *,
        current: Callable[[], bool],
    ) -> Any:
        """``cache[key]``, computed once and kept if the budget has room (charged to table
        ``source``); otherwise computed for this search only — a search never fails for want of a
        cache. Only a version that is still ``current()`` after the compute keeps (and pays for) a
        cache: one since replaced, removed or dropped would otherwise charge its successor, or an
        emptied store, for a cache no one can free."""
        value = cache.get(key)
        if value is None:
            value = compute()
            if not current():
                return value
            try:
                self._accountant.reserve(self.owner(source), nbytes)
            except MemoryLimitError:
                return value
            cache[key] = value
            self._charges[source] += nbytes
        return value

    def table_memory(self, dimension: int, state: TableState[Any], *, mapped: bool) -> TableMemory:
        """What ``state`` (the current version of table ``dimension``) is charged, part by part."""
        rotation = state.rotation
        return TableMemory(
            dimension=dimension,
            rows=state.rows,
            dtype="float32",
            nbytes=self.charged(dimension),
            quantized={kind: index.nbytes for kind, index in state.quantized.items()},
            mapped=mapped,
            caches=table_caches(state),
            rotation=0 if rotation is None else table_bytes(dimension, state.rows, rotation=rotation.components) - table_bytes(dimension, state.rows),
        )

    def memory_info(self, tables: Mapping[int, TableState[Any]], *, mapped: bool) -> MemoryInfo:
        """The accountant's totals and, per table of ``tables`` (the store's), its charge part by part."""
        report = self._accountant.report()
        parts = {d: self.table_memory(d, state, mapped=mapped) for d, state in sorted(tables.items())}
        return MemoryInfo(used_bytes=report.used_bytes, limit_bytes=report.limit_bytes, store_bytes=self.total, tables=parts)
