"""A sharded store's changes, in two phases: ask every shard first, change them only if all can.

Each function is one :class:`~embedtools.sharded.store.ShardedStore` change over its
:class:`~embedtools.sharded.state.ShardedState` (called under its lock): a refusal anywhere
(duplicate or unknown ids, a shard's memory budget, bad labels or metadata) changes nothing
anywhere, and a refusal the checks did not foresee takes back what the other shards did.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

from embedtools.errors import DuplicateIdError, EmbedtoolsError, MemoryLimitError, UnknownIdError
from embedtools.protocols import Quantization
from embedtools.quantize import check_quantization
from embedtools.sharded.placement import Runs, place
from embedtools.sharded.state import ShardedState
from embedtools.tables import labels_for
from embedtools.validation import LabelsArg, as_float32_matrix, check_ids, check_strings, check_update, encode_metadata

__all__ = ["add", "drop", "quantize", "remove", "update"]


def add(state: ShardedState, vectors: object, ids: Sequence[str] | None, labels: LabelsArg | None,
        metadata: Sequence[Mapping[str, object]] | None) -> tuple[str, ...]:  # fmt: skip
    """:meth:`ShardedStore.add <embedtools.sharded.store.ShardedStore.add>`."""
    state.writable()
    group = state.group
    count = state.shard_count
    host = as_float32_matrix(vectors)
    n, d = host.shape
    runs = state.runs.get(d, Runs())
    existing = None if d not in state.runs else ((0,) if state.int_labels[d] else ("",))
    new_labels = labels_for(d, labels, n, existing)
    if metadata is not None:
        encode_metadata(metadata, n)
    shares = place(runs.shard_rows(count), n)
    if ids is None:
        new_ids = _free_ids(state, d, runs.rows, n)
    else:
        new_ids = check_strings(ids, n, "ids")
        seen: set[str] = set()
        for i in new_ids:
            if i in seen:
                raise DuplicateIdError(f"id {i!r} is given twice")
            seen.add(i)
    checks = group.call("check_add", {s: (d, shares[s], new_ids) for s in range(count)})
    for s in range(count):
        taken, refusal = checks[s]
        if taken:
            raise DuplicateIdError(f"id {taken[0]!r} is already in table {d}d")
        if refusal is not None:
            asked, used, limit = refusal
            raise MemoryLimitError(f"shard {s} on {group.workers[s]} refuses {shares[s]} rows of {d}d: it asks for "
                                   f"{asked} bytes with {used} of {limit} in use; no shard was changed",
                                   asked=asked, used=used, limit=limit)  # fmt: skip
    pieces: dict[int, tuple[object, ...]] = {}
    start = 0
    for s, share in enumerate(shares):
        if share:
            part = slice(start, start + share)
            meta = None if metadata is None else list(metadata[part])
            pieces[s] = (host[part], new_ids[part], list(new_labels[part]), meta)
            start += share
    try:
        group.call("add", pieces)
    except EmbedtoolsError:  # a refusal the checks did not foresee: take back what the others added
        _undo_add(state, d, pieces)
        raise
    state.runs[d] = runs.appended(shares)
    state.int_labels[d] = bool(new_labels) and isinstance(new_labels[0], int)
    state.changed(list(pieces))
    return new_ids


def _undo_add(state: ShardedState, d: int, pieces: Mapping[int, tuple[object, ...]]) -> None:
    found = state.group.call("find", {s: (cast("tuple[str, ...]", p[1]), d) for s, p in pieces.items()})
    undo = {s: (list(f[d]), d) for s, f in found.items() if d in f}
    state.group.call("remove", undo)


def _free_ids(state: ShardedState, d: int, start: int, n: int) -> tuple[str, ...]:
    """The ids a single store would generate: positions, skipping ids some shard already holds."""
    chosen: list[str] = []
    position = start
    while len(chosen) < n:
        batch = [str(p) for p in range(position, position + n - len(chosen))]
        position += len(batch)
        found = state.group.all("find", batch, d)
        taken = {i for f in found.values() for rows in f.values() for i in rows}
        chosen.extend(i for i in batch if i not in taken)
    return tuple(chosen)


def _where(state: ShardedState, ids: Sequence[str], dimension: int | None) -> dict[int, dict[int, dict[str, int]]]:
    """For each shard, table and id of ``ids`` it holds: that id's local row."""
    return {s: f for s, f in state.group.all("find", list(ids), dimension).items() if f}


def remove(state: ShardedState, ids: Sequence[str], dimension: int | None) -> int:
    """:meth:`ShardedStore.remove <embedtools.sharded.store.ShardedStore.remove>`."""
    state.writable()
    wanted = tuple(dict.fromkeys(check_ids(ids)))
    d_named = None if dimension is None else state.dimension(dimension)
    found = _where(state, wanted, d_named)
    held = {i for f in found.values() for rows in f.values() for i in rows}
    missing = [i for i in wanted if i not in held]
    if missing:
        where = f"table {d_named}d" if d_named is not None else "any table"
        raise UnknownIdError(f"no row with id {missing[0]!r} in {where}")
    calls: dict[int, list[tuple[list[str], int]]] = {}
    for s, tables in found.items():
        for d, rows in tables.items():
            calls.setdefault(s, []).append((list(rows), d))
    removed = 0
    for round_ in range(max((len(c) for c in calls.values()), default=0)):
        step = {s: c[round_] for s, c in calls.items() if round_ < len(c)}
        removed += sum(state.group.call("remove", step).values())
    for d in {d for tables in found.values() for d in tables}:
        gone = {s: list(tables[d].values()) for s, tables in found.items() if d in tables}
        runs = state.runs[d].removed(state.shard_count, gone)
        if runs.rows:
            state.runs[d] = runs
        else:
            del state.runs[d], state.int_labels[d]
    state.changed(list(found))
    return removed


def update(state: ShardedState, ids: Sequence[str], vectors: object, labels: LabelsArg | None,
           metadata: Sequence[Mapping[str, object]] | None, dimension: int | None) -> None:  # fmt: skip
    """:meth:`ShardedStore.update <embedtools.sharded.store.ShardedStore.update>`."""
    state.writable()
    keys = check_ids(ids, unique=True)
    n = len(keys)
    host, d = check_update(vectors, dimension, n)
    d = state.dimension(d)
    new_labels = None if labels is None else labels_for(d, labels, n, (0,) if state.int_labels[d] else ("",))
    if metadata is not None:
        encode_metadata(metadata, n)
    found = _where(state, keys, d)
    owner = {i: s for s, tables in found.items() for i in tables.get(d, {})}
    missing = [i for i in keys if i not in owner]
    if missing:
        raise UnknownIdError(f"no row with id {missing[0]!r} in table {d}d")
    calls: dict[int, tuple[object, ...]] = {}
    for s in sorted(set(owner.values())):
        pick = [j for j, i in enumerate(keys) if owner[i] == s]
        calls[s] = (
            [keys[j] for j in pick],
            None if host is None else host[pick],
            None if new_labels is None else [new_labels[j] for j in pick],
            None if metadata is None else [metadata[j] for j in pick],
            d,
        )
    state.group.call("update", calls)
    state.changed(list(calls))


def quantize(state: ShardedState, dimension: int, kind: Quantization) -> None:
    """:meth:`ShardedStore.quantize <embedtools.sharded.store.ShardedStore.quantize>`."""
    state.writable()
    d = state.dimension(dimension)
    kind = check_quantization(kind)
    holding = state.holding(d)
    group = state.group
    before = group.call("tables", {s: () for s in holding})
    try:
        group.call("quantize", {s: (d, kind) for s in holding})
    except EmbedtoolsError:
        fresh = group.call("tables", {s: () for s in holding})
        group.call("drop_quantized", {s: (d, kind) for s in holding
                                      if kind in fresh[s][d].quantized and kind not in before[s][d].quantized})  # fmt: skip
        raise
    state.changed(holding)


def drop(state: ShardedState, dimension: int) -> None:
    """:meth:`ShardedStore.drop <embedtools.sharded.store.ShardedStore.drop>`."""
    state.writable()
    d = state.dimension(dimension)
    holding = state.holding(d)
    state.group.call("drop", {s: (d,) for s in holding})
    del state.runs[d], state.int_labels[d]
    state.changed(holding)
