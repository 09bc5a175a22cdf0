"""The store's side of its files: which file a load reads and what it will cost, and the host
snapshot a save writes.

Kept apart from the store so that ``load`` reads validate → bill → reserve → build → commit: the
checks on the path and the bill from the header come from here before any vector is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from embedtools import atomic, fileformat, seed_format
from embedtools.errors import InvalidArgumentError, StoreFormatError, StoreNotFoundError
from embedtools.protocols import ArrayBackend, Hasher
from embedtools.records import StoreRecord, TableRecord, TableShape
from embedtools.tables import TableState, from_record
from embedtools.validation import JSONObject, as_labels

__all__ = ["read_shapes", "read_store", "read_tables", "row_ranges", "snapshot"]


def read_shapes(path: object, *, mmap: bool, backend_name: str, hasher: Hasher) -> tuple[Path, tuple[TableShape, ...]]:
    """The store at ``path`` (an embedtools file or a seed folder) and its tables' shapes, read from
    the header alone so the budget is charged before any vector is; every refusal of the path or of
    ``mmap`` happens here, before anything is reserved."""
    p, folder = atomic.locate(path)
    if mmap and backend_name != "numpy":
        raise InvalidArgumentError(f"mmap=True needs the numpy backend; {backend_name} copies tables to its device")
    if not folder:
        return p, tuple(replace(shape, mapped=mmap) for shape in fileformat.read_table_shapes(p, hasher=hasher))
    if mmap:
        raise InvalidArgumentError("mmap=True reads embedtools files; convert a seed folder first")
    if not seed_format.is_seed_folder(p):
        raise StoreNotFoundError(f"{p} is a folder without metadata.json (not a seed store)")
    return p, seed_format.read_seed_shapes(p)


def read_store(path: Path, shapes: tuple[TableShape, ...], *, mmap: bool, hasher: Hasher) -> StoreRecord:
    """The whole store at ``path``, refused if its tables are not the ``shapes`` it was billed for
    (the file changed between the header read and this one)."""
    record = seed_format.read_seed_store(path) if path.is_dir() else fileformat.read_store(path, mmap=mmap, hasher=hasher)[0]
    if {t.dimension: len(t.ids) for t in record.tables} != {s.dimension: s.rows for s in shapes}:
        raise StoreFormatError(f"{path} changed while it was being loaded")
    return record


def row_ranges(shapes: tuple[TableShape, ...], rows: Mapping[int, tuple[int, int]]) -> tuple[TableShape, ...]:
    """The shapes of the row ranges ``rows`` (dimension -> ``(start, stop)``) of the tables
    ``shapes``: what a load of part of a file (one shard's rows) is billed. Tables not named, or
    given an empty range, are left out; a range outside its table is refused before anything is read."""
    known = {s.dimension: s for s in shapes}
    out: list[TableShape] = []
    for d, bounds in rows.items():
        shape = known.get(d)
        if shape is None:
            raise InvalidArgumentError(f"rows names table {d}d, which the file does not hold; it holds {sorted(known)}")
        given = cast("object", bounds)  # checked: a caller's mapping may hold anything
        if not (isinstance(given, tuple) and len(cast("tuple[object, ...]", given)) == 2 and all(type(b) is int for b in cast("tuple[object, ...]", given))):
            raise InvalidArgumentError(f"rows of table {d}d must be a (start, stop) pair of ints, not {bounds!r}")
        start, stop = bounds
        if not 0 <= start <= stop <= shape.rows:
            raise InvalidArgumentError(f"rows {bounds!r} of table {d}d is not a range within its {shape.rows} rows")
        if stop > start:
            out.append(replace(shape, rows=stop - start))
    return tuple(sorted(out, key=lambda s: s.dimension))


def _sliced(table: TableRecord, start: int, stop: int) -> TableRecord:
    """Rows ``start:stop`` of a table read from a file: views of mapped arrays stay mapped; indexes
    keep the file's calibration, so a slice's codes are the rows' codes in the whole table."""
    quantized = tuple(replace(index, rows=stop - start, codes=index.codes[start:stop]) for index in table.quantized)
    return replace(table, vectors=table.vectors[start:stop], ids=table.ids[start:stop], labels=as_labels(table.labels[start:stop]),
                   metadata=table.metadata[start:stop], quantized=quantized)  # fmt: skip


def read_tables(
    backend: ArrayBackend[Any], path: Path, shapes: tuple[TableShape, ...], *, mmap: bool, hasher: Hasher, step: Callable[[], object] = lambda: None,
    rows: Mapping[int, tuple[int, int]] | None = None,
) -> tuple[dict[int, TableState[Any]], JSONObject]:
    """The tables (built on ``backend``) and config of the store at ``path``, by :func:`read_store`;
    ``step`` is called after the read and after each table (a progress bar's tick). With ``rows``
    (see :func:`row_ranges`) only those row ranges are built; ``shapes`` are then the whole file's."""
    record = read_store(path, shapes, mmap=mmap, hasher=hasher)
    if rows is not None:
        parts = {s.dimension for s in row_ranges(shapes, rows)}
        record = replace(record, tables=tuple(_sliced(t, *rows[t.dimension]) for t in record.tables if t.dimension in parts))
    step()
    built: dict[int, TableState[Any]] = {}
    for table in record.tables:
        built[table.dimension] = from_record(backend, table)
        step()
    return built, dict(record.config)


def snapshot(
    backend: ArrayBackend[Any], tables: Mapping[int, TableState[Any]], config: JSONObject, *, step: Callable[[], object] = lambda: None
) -> StoreRecord:
    """The host copy of a store that a save writes: tables in order of dimension, indexes by kind;
    ``step`` is called after each table (a progress bar's tick)."""
    records: list[TableRecord] = []
    for _, state in sorted(tables.items()):
        rotation = state.rotation
        records.append(
            TableRecord(
                vectors=np.asarray(backend.to_numpy(state.vectors), dtype=np.float32),
                ids=state.ids,
                labels=state.labels,
                metadata=state.metadata,
                quantized=tuple(state.quantized[kind].to_host(backend) for kind in sorted(state.quantized)),
                rotation=rotation.matrix if rotation else None,
                rotation_components=rotation.components if rotation else 0,
            )
        )
        step()
    return StoreRecord(tables=tuple(records), config=config)
