"""A sharded store's files: save to a folder, load from one (or from one embedtools file), copy out.

The folder's layout and manifest are :mod:`embedtools.sharded.manifest`'s; here the shards' workers
write and read their own files (no row passes through the client), and each shard's
:class:`~embedtools.sharded.group.Source` is kept so that a lost, unchanged shard can be reloaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np

from embedtools import atomic, fileformat
from embedtools.errors import InvalidArgumentError, StoreFormatError, StoreNotEmptyError
from embedtools.protocols import Quantization
from embedtools.sharded.group import Source
from embedtools.sharded.holder import ShardTable, file_sha256
from embedtools.sharded.manifest import Manifest, ShardEntry, is_sharded_folder, read_manifest, shard_file, write_manifest
from embedtools.sharded.placement import Runs, place
from embedtools.sharded.state import ShardedState
from embedtools.validation import JSONObject, as_labels

if TYPE_CHECKING:
    from embedtools.records import TableRecord
    from embedtools.store import EmbeddingStore

__all__ = ["load", "load_into", "save", "to_store"]

T = TypeVar("T")


def save(state: ShardedState, path: str | os.PathLike[str]) -> None:
    """:meth:`ShardedStore.save <embedtools.sharded.store.ShardedStore.save>`."""
    folder = atomic.as_store_path(path)
    if folder.exists() and not folder.is_dir():
        raise InvalidArgumentError(f"{folder} is not a folder; a sharded store saves to a folder")
    if not folder.parent.is_dir():
        raise InvalidArgumentError(f"folder {folder.parent} does not exist")
    folder.mkdir(exist_ok=True)
    count = state.shard_count
    files = [str((folder / shard_file(s)).resolve()) for s in range(count)]
    digests = state.group.call("save", {s: (files[s],) for s in range(count)})
    entries: list[ShardEntry] = []
    for s in range(count):
        rows = {d: r.shard_rows(count)[s] for d, r in state.runs.items()}
        entries.append(ShardEntry(shard_file(s), digests[s][0], digests[s][1], {d: n for d, n in rows.items() if n}))
    write_manifest(folder, Manifest(tuple(entries), dict(state.runs), state.config, state.config_hash))
    for s in range(count):
        state.group.sources[s] = Source(files[s], None, digests[s][1], state.mapped)


def load(path: str | os.PathLike[str], shards: int | None, mmap: bool | None,
         start: Callable[[int | None], tuple[T, ShardedState]]) -> T:  # fmt: skip
    """:meth:`ShardedStore.load <embedtools.sharded.store.ShardedStore.load>`: ``start(shards)``
    makes the empty store (``None``: one shard per worker) and hands back its state to fill."""
    target, folder = atomic.locate(path)
    if folder:
        if not is_sharded_folder(target):
            raise InvalidArgumentError(f"{target} is a folder without a manifest.json (not a sharded store)")
        manifest = read_manifest(target)
        if shards is not None and shards != len(manifest.shards):
            raise InvalidArgumentError(f"{target} holds {len(manifest.shards)} shards, not {shards}; it loads as saved")
        store, state = start(len(manifest.shards))
        sources = [Source(str((target / e.file).resolve()), None, e.header_sha256, mmap) for e in manifest.shards]
        _fill(state, sources, manifest.tables, manifest.config)
        if manifest.config_hash != state.config_hash:
            raise StoreFormatError(f"{target}: the manifest's config hash is not its config's")
        for s, entry in enumerate(manifest.shards):
            got = {d: t.rows for d, t in cast("dict[int, ShardTable]", state.group.call("tables", {s: ()})[s]).items()}
            if got != dict(entry.rows):
                raise StoreFormatError(f"{target / entry.file} holds tables {got}, the manifest says {dict(entry.rows)}")
        return store
    shapes = fileformat.read_table_shapes(target)
    header_config: JSONObject = fileformat.read_header(target).get("config", {})
    store, state = start(shards)
    count = state.shard_count
    ranges: list[dict[int, tuple[int, int]]] = [{} for _ in range(count)]
    tables: dict[int, Runs] = {}
    for shape in shapes:
        shares = place([0] * count, shape.rows)
        tables[shape.dimension] = Runs().appended(shares)
        begin = 0
        for s, share in enumerate(shares):
            ranges[s][shape.dimension] = (begin, begin + share)
            begin += share
    resolved = str(target.resolve())
    _fill(state, [Source(resolved, ranges[s], None, mmap) for s in range(count)], tables, header_config)
    return store


def _fill(state: ShardedState, sources: Sequence[Source], tables: Mapping[int, Runs], config: JSONObject) -> None:
    group = state.group
    group.call("load", {s: (src.path, src.mmap, src.rows, src.header_sha256) for s, src in enumerate(sources)})
    state.runs = dict(tables)
    infos = group.all("tables")
    state.int_labels = {d: any(cast("ShardTable", info[d]).int_labels for info in infos.values() if d in info) for d in tables}
    state.config = config
    group.sources = list(sources)
    state.mapped = any(group.all("mapped").values())


def _rows_of(state: ShardedState, d: int) -> dict[int, Any]:
    return state.group.call("rows_of", {s: (d,) for s in state.holding(d)})


def to_store(state: ShardedState, store: EmbeddingStore) -> EmbeddingStore:
    """:meth:`ShardedStore.to_store <embedtools.sharded.store.ShardedStore.to_store>`."""
    with state.lock:
        for d in state.dimensions:
            rows = _rows_of(state, d)
            order = state.runs[d].global_order(state.shard_count)
            ids = [i for s, a, n in order for i in rows[s][0][a : a + n]]
            labels = [lab for s, a, n in order for lab in rows[s][1][a : a + n]]
            meta = [m for s, a, n in order for m in rows[s][2][a : a + n]]
            vectors = np.concatenate([rows[s][3][a : a + n] for s, a, n in order])
            store.add(vectors, ids, labels, meta)
            for kind in state.table(d).quantized:
                store.quantize(d, kind)
        store.config = state.config
    return store


def load_into(store: EmbeddingStore, path: str | os.PathLike[str]) -> EmbeddingStore:
    """Fill one empty :class:`EmbeddingStore` from a saved sharded folder, in global row order,
    reading the shard files on this machine (no cluster needed); indexes are rebuilt over all rows."""
    from embedtools.persistence import read_store

    if store.dimensions:
        raise StoreNotEmptyError(f"load_into fills an empty store; this one holds tables {list(store.dimensions)}")
    folder = atomic.as_store_path(path)
    manifest = read_manifest(folder)
    records: list[dict[int, TableRecord]] = []
    for entry in manifest.shards:
        file = folder / entry.file
        if file_sha256(file) != entry.sha256:
            raise StoreFormatError(f"{file} is not the file the manifest names (its SHA-256 differs)")
        shapes = fileformat.read_table_shapes(file)
        records.append({t.dimension: t for t in read_store(file, shapes, mmap=True, hasher=store.hasher).tables})
    for d, runs in sorted(manifest.tables.items()):
        order = runs.global_order(len(manifest.shards))
        ids = [i for s, a, n in order for i in records[s][d].ids[a : a + n]]
        labels = as_labels([lab for s, a, n in order for lab in records[s][d].labels[a : a + n]])
        meta: list[Mapping[str, object]] = [json.loads(m) for s, a, n in order for m in records[s][d].metadata[a : a + n]]
        vectors = np.concatenate([records[s][d].vectors[a : a + n] for s, a, n in order])
        store.add(vectors, ids, labels, meta)
        kinds: set[Quantization] = {q.kind for rec in records if d in rec for q in rec[d].quantized}
        for kind in sorted(kinds):
            store.quantize(d, kind)
    store.config = manifest.config
    return store
