"""The worker side of a shard: one :class:`EmbeddingStore`, held by a Dask actor.

Why an actor (and not ``Client.run`` with state on the worker or a worker plugin): an actor is an
object that stays resident on the worker it was placed on between calls, and its method calls go
straight from the client to that worker (no scheduler round trip, no task graph), run on the
worker's actor thread (so a long search does not block the worker's event loop and its
heartbeats), and fail at once with a connection error when the worker is gone, which is what the
client's fault handling keys on. ``Client.run`` runs on the event loop and would need module-level
state keyed per store; a plugin adds a lifecycle for nothing the actor lacks.

The holder builds its store from the container configuration it is given, so each worker has its
own backend, device and budget. Every method does one store call and returns only what the client
needs: counts, ids asked for, a shard's ``(queries, k)`` candidates — never rows, but for
``rows_of``, which copies a shard into one store on request.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt

from embedtools.ledger import table_bytes
from embedtools.protocols import Metric, Quantization

if TYPE_CHECKING:
    from embedtools.container import Config
    from embedtools.results import MemoryInfo
    from embedtools.store import EmbeddingStore
    from embedtools.validation import JSONObject

__all__ = ["ShardHolder", "ShardTable", "file_sha256"]


@dataclass(frozen=True)
class ShardTable:
    """What the client needs to know of one shard's table: enough to check an add before it is sent."""

    rows: int
    int_labels: bool
    quantized: tuple[Quantization, ...]
    rotation: int


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file, read in chunks (a shard file can be larger than memory)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def header_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of an embedtools file's verified header, which holds every tensor's SHA-256: a
    file whose header digest matches and whose tensors load (each checked against its digest) is
    the file that was saved, without a second pass over its bytes."""
    from embedtools.fileformat import read_header

    return hashlib.sha256(json.dumps(read_header(path), sort_keys=True).encode()).hexdigest()


class ShardHolder:
    """One shard's store, on the worker that built it (see the module docstring)."""

    def __init__(self, config: Mapping[str, object]) -> None:
        self._config = dict(config)
        self._store = self._fresh()

    def _fresh(self) -> EmbeddingStore:
        from embedtools.container import make_container

        return make_container(cast("Config", dict(self._config))).store()

    def run(self, method: str, payload: bytes) -> bytes:
        """The one entry point the client calls: ``method(*args)`` with pickled arguments and result
        (see :func:`embedtools.sharded.cluster.call`); errors go back as themselves."""
        args = pickle.loads(payload)  # noqa: S301 - our own client's call
        return pickle.dumps(getattr(self, method)(*args), protocol=5)

    # ------------------------------------------------------------------ inspection

    def pid(self) -> int:
        return os.getpid()

    def backend(self) -> tuple[str, str]:
        return self._store.backend.name, str(self._store.backend.device)

    def tables(self) -> dict[int, ShardTable]:
        out: dict[int, ShardTable] = {}
        for d in self._store.dimensions:
            table = self._store.table(d)
            rotation = table.rotation
            labels = table.labels
            out[d] = ShardTable(len(table), bool(labels) and isinstance(labels[0], int), tuple(sorted(table.quantized)),
                                0 if rotation is None else rotation.components)  # fmt: skip
        return out

    def mapped(self) -> bool:
        return self._store.mapped_from is not None

    def memory_info(self) -> MemoryInfo:
        return self._store.memory_info()

    def ids_at(self, dimension: int, local: npt.NDArray[np.int64]) -> list[str]:
        ids = self._store.table(dimension).ids
        return [ids[i] for i in local.tolist()]

    def ids_of(self, dimension: int) -> tuple[str, ...]:
        return self._store.table(dimension).ids

    def rows_of(self, dimension: int) -> tuple[tuple[str, ...], tuple[Any, ...], tuple[JSONObject, ...], npt.NDArray[np.float32]]:
        """A table's ids, labels, metadata and rows (inspection and conversion to one store only)."""
        table = self._store.table(dimension)
        return table.ids, tuple(table.labels), table.metadata, table.to_numpy()

    # ------------------------------------------------------------------ the two phases of a change

    def check_add(self, dimension: int, new_rows: int, ids: Sequence[str]) -> tuple[tuple[str, ...], tuple[int, int, int] | None]:
        """The ids of ``ids`` this shard already holds in ``dimension``, and ``(asked, used, limit)``
        bytes if ``new_rows`` more rows would not fit its budget (``None``: they fit) — asked of
        every shard before any adds a row, so that a refusal anywhere changes nothing anywhere."""
        held = self._store.table(dimension) if dimension in self._store.dimensions else None
        known = set(held.ids) if held is not None else set[str]()
        taken = tuple(i for i in ids if i in known)
        if not new_rows:
            return taken, None
        info = self._store.memory_info()
        table = info.tables.get(dimension)
        shape = self.tables().get(dimension)
        bill = table_bytes(dimension, (shape.rows if shape else 0) + new_rows, shape.quantized if shape else (), shape.rotation if shape else 0)
        delta = bill - (table.nbytes if table is not None else 0)
        if delta > info.available_bytes:
            return taken, (delta, info.used_bytes, info.limit_bytes)
        return taken, None

    def add(self, vectors: npt.NDArray[np.float32], ids: Sequence[str], labels: Sequence[Any] | None,
            metadata: Sequence[Mapping[str, object]] | None) -> None:  # fmt: skip
        self._store.add(vectors, list(ids), labels=None if labels is None else list(labels), metadata=metadata)

    def find(self, ids: Sequence[str], dimension: int | None) -> dict[int, dict[str, int]]:
        """Per table (``dimension`` or every one), the local row of each of ``ids`` it holds."""
        dims = [d for d in self._store.dimensions if dimension is None or d == dimension]
        out: dict[int, dict[str, int]] = {}
        for d in dims:
            table = self._store.table(d)
            known = set(table.ids) if len(ids) > 64 else None
            found = {i: table.index_of(i) for i in ids if (i in known if known is not None else _has(table, i))}
            if found:
                out[d] = found
        return out

    def remove(self, ids: Sequence[str], dimension: int) -> int:
        return self._store.remove(list(ids), dimension)

    def update(self, ids: Sequence[str], vectors: npt.NDArray[np.float32] | None, labels: Sequence[Any] | None,
               metadata: Sequence[Mapping[str, object]] | None, dimension: int) -> None:  # fmt: skip
        self._store.update(list(ids), vectors, labels=None if labels is None else list(labels), metadata=metadata, dimension=dimension)

    def set_config(self, value: Mapping[str, object]) -> None:
        self._store.config = value

    def quantize(self, dimension: int, kind: Quantization) -> None:
        self._store.quantize(dimension, kind)

    def drop_quantized(self, dimension: int, kind: Quantization) -> None:
        self._store.drop_quantized(dimension, kind)

    def fit_rotation(self, dimension: int, components: int | None) -> None:
        self._store.fit_rotation(dimension, components)

    def drop(self, dimension: int) -> None:
        self._store.drop(dimension)

    def materialize(self) -> None:
        self._store.materialize()

    # ------------------------------------------------------------------ search

    def search(self, queries: npt.NDArray[np.float32], k: int, dimension: int | None, metric: Metric,
               options: Mapping[str, Any]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.integer], int, int]:  # fmt: skip
        """This shard's own top-``k`` (its store's search, every mode): scores and local rows only,
        local rows as int32 where they fit (what crosses the network is ``8·q·k`` bytes)."""
        found = self._store.search(queries, k, dimension, metric, **options)
        local = found.indices.astype(np.int32) if len(self._store.table(found.source_dimension)) < 2**31 else found.indices
        return np.asarray(found.scores, dtype=np.float32), local, found.dimension, found.source_dimension

    # ------------------------------------------------------------------ files

    def save(self, path: str) -> tuple[str, str]:
        """Write this shard's file (atomic, as every save); return its SHA-256 and its header's
        (:func:`header_sha256`) for the manifest."""
        self._store.save(path)
        return file_sha256(path), header_sha256(path)

    def load(self, path: str, mmap: bool | None, rows: Mapping[int, tuple[int, int]] | None, header: str | None) -> None:
        """Replace this shard's store by the file at ``path`` (its ``rows`` ranges only, if given),
        after checking its header is the one the manifest names. ``mmap=None`` maps on NumPy."""
        from embedtools.errors import StoreFormatError

        if header is not None and header_sha256(path) != header:
            raise StoreFormatError(f"{path} is not the file the manifest names (its header's SHA-256 differs)")
        store = self._fresh()
        use_mmap = store.backend.name == "numpy" if mmap is None else mmap
        self._store = store.load(path, mmap=use_mmap, rows=rows)


def _has(table: Any, id_: str) -> bool:
    from embedtools.errors import UnknownIdError

    try:
        table.index_of(id_)
    except UnknownIdError:
        return False
    return True
