"""ShardedStore: one logical EmbeddingStore spread over the workers of a Dask ``distributed`` cluster.

Each shard is an :class:`~embedtools.EmbeddingStore` built on its worker from the container
configuration (its own backend, device and budget; :mod:`embedtools.sharded.holder`). The client
keeps only each table's global row order (:mod:`embedtools.sharded.placement`), the experiment
config and where each shard can be reloaded from. A search runs every shard's own search on its
worker and merges their ``(queries, k)`` candidates exactly on the client
(:mod:`embedtools.sharded.merge`); a change asks every shard first and changes them only if all
can take it, so a refusal anywhere changes nothing anywhere.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, cast

import numpy as np
import numpy.typing as npt

from embedtools import atomic, fileformat
from embedtools.errors import (
    DimensionError,
    DuplicateIdError,
    EmbedtoolsError,
    InvalidArgumentError,
    MemoryLimitError,
    ReadOnlyStoreError,
    ShardLostError,
    StoreFormatError,
    StoreNotEmptyError,
    UnknownIdError,
)
from embedtools.hashing import Sha256Hasher
from embedtools.hashing import DEFAULT_HASH_LENGTH
from embedtools.protocols import Metric, Quantization
from embedtools.quantize import check_quantization
from embedtools.results import MemoryInfo, SearchResult
from embedtools.search.kernel import check_k, check_metric
from embedtools.sharded.cluster import Pending, call, release, start_actor, unpack, worker_addresses, worker_gone
from embedtools.sharded.holder import ShardHolder, ShardTable, file_sha256
from embedtools.sharded.manifest import Manifest, ShardEntry, is_sharded_folder, read_manifest, shard_file, write_manifest
from embedtools.sharded.merge import merge_topk
from embedtools.sharded.placement import Runs, place
from embedtools.sharded.results import SearchStats, ShardedMemoryInfo, ShardedTable, WinnerIds
from embedtools.tables import labels_for
from embedtools.validation import JSONObject, LabelsArg, as_config, as_labels, as_float32_matrix, as_queries, check_dimension, check_ids
from embedtools.validation import check_positive_int, check_strings, check_update, encode_metadata

if TYPE_CHECKING:
    from distributed import Client

    from embedtools.container import Config
    from embedtools.records import TableRecord
    from embedtools.store import EmbeddingStore

__all__ = ["ShardedStore"]

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", bound="ShardedStore")

#: Searches tried again after reloading lost shards from their files.
_RETRIES = 2
#: How long a replacement shard's actor may take to start on a live worker.
_RECOVER_SECONDS = 60.0
#: How long a new store waits for its cluster's first worker.
_START_SECONDS = 60.0


@dataclass(frozen=True)
class _Source:
    """Where a shard's current content can be reloaded from: a file (and its row ranges)."""

    path: str
    rows: Mapping[int, tuple[int, int]] | None
    header_sha256: str | None
    mmap: bool | None


class _Lost(Exception):
    """Internal: shards whose workers are gone (turned into a reload or a :class:`ShardLostError`)."""

    def __init__(self, shards: tuple[int, ...]) -> None:
        super().__init__(shards)
        self.shards = shards


class ShardedStore:
    """An :class:`~embedtools.EmbeddingStore` whose rows are spread over ``shards`` Dask workers.

    ``config`` is the container configuration each shard's store is built from (one, or one per
    shard: per-worker backend, device and ``max_memory_gb``). Shards are placed round-robin on
    ``workers`` (default: the client's workers now). Rows are placed by the rule of
    :mod:`embedtools.sharded.placement` (each add cut into contiguous pieces that even out the
    shards' row counts; global row order kept), and searches return what one store holding the
    same rows in the same order returns (see :meth:`search` for how exactly).

    Calls are serialised (one at a time, each on every shard at once). ``timeout`` bounds each shard
    call: a shard that does not answer in time counts as lost, like one whose worker died.
    """

    @staticmethod
    def _exclusive(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
        """One call at a time: a change's check and commit phases must see the same shards."""

        @functools.wraps(method)
        def locked(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
            with self._lock:
                return method(self, *args, **kwargs)

        return locked

    def __init__(self, client: Client, config: Config | Sequence[Config] | None = None, *, shards: int | None = None,
                 workers: Sequence[str] | None = None, timeout: float | None = None) -> None:  # fmt: skip
        self._client = client
        addresses = list(workers) if workers is not None else worker_addresses(client, wait=_START_SECONDS if timeout is None else timeout)
        if not addresses:
            raise InvalidArgumentError("the client's cluster has no workers")
        count = len(addresses) if shards is None else check_positive_int(shards, "shards")
        configs = _configs(config, count)
        self._configs: list[dict[str, object]] = configs
        self._timeout = timeout
        self._lock = threading.RLock()
        self._runs: dict[int, Runs] = {}
        self._int_labels: dict[int, bool] = {}
        self._config: JSONObject = {}
        length = configs[0].get("hash_length", DEFAULT_HASH_LENGTH)
        self._hasher = Sha256Hasher(check_positive_int(length, "hash_length", upper=64))
        self._sources: list[_Source | None] = [None] * count
        self._lost: set[int] = set()
        self._mapped = False
        self._traffic = 0
        self.last_search: SearchStats | None = None
        """The traffic and timing of the last search (``None`` before the first)."""
        self._workers = [addresses[i % len(addresses)] for i in range(count)]
        self._futures: list[object | None] = [None] * count
        self._holders: list[object | None] = [None] * count
        for i, handle in enumerate(self._start([(i, self._workers[i]) for i in range(count)])):
            self._futures[i], self._holders[i] = handle

    # ------------------------------------------------------------------ the shards' actors

    def _start(self, where: Sequence[tuple[int, str]], timeout: float | None = None) -> list[tuple[object, object]]:
        wait = self._timeout if timeout is None else timeout
        return [start_actor(self._client, ShardHolder, (self._configs[i],), w, wait) for i, w in where]

    def _send(self, shard: int, method: str, *args: object) -> Pending:
        pending, sent = call(self._holders[shard], method, *args)
        self._traffic += sent
        return pending

    def _gather(self, calls: Mapping[int, Pending]) -> dict[int, Any]:
        """Every call's result, after all calls ended; an embedtools error from a shard is raised as
        it is, a call whose worker is gone makes :class:`_Lost` name those shards (never probed
        again: connecting to a dead worker waits out the connect timeout)."""
        results: dict[int, Any] = {}
        error: BaseException | None = None
        lost: list[int] = []
        for shard, future in calls.items():
            try:
                results[shard], received = unpack(future.result(timeout=self._timeout))
                self._traffic += received
            except EmbedtoolsError as exc:
                error = error or exc
            except Exception as exc:
                if not worker_gone(exc):
                    raise
                lost.append(shard)
                error = error or exc
        if lost:
            self._lost.update(lost)
            raise _Lost(tuple(lost)) from error
        if error is not None:
            raise error
        return results

    def _call(self, method: str, args: Mapping[int, tuple[object, ...]]) -> dict[int, Any]:
        """``method(*args[s])`` on each shard ``s`` at once; a lost shard is a :class:`ShardLostError`."""
        self._refuse_lost()
        try:
            return self._gather({s: self._send(s, method, *a) for s, a in args.items()})
        except _Lost as lost:
            raise self._lost_error(lost.shards) from None

    def _all(self, method: str, *args: object) -> dict[int, Any]:
        return self._call(method, {s: args for s in range(self.shard_count)})

    def _lost_error(self, shards: Sequence[int]) -> ShardLostError:
        named = tuple(sorted(shards))
        return ShardLostError(f"shards {list(named)} were lost with their workers and have no saved file to reload from "
                              "(save the store to make lost shards recoverable)", shards=named)  # fmt: skip

    def _refuse_lost(self) -> None:
        if self._lost and not self._recover():
            raise self._lost_error(sorted(self._lost))

    def _recover(self) -> bool:
        """Reload every lost shard from its file on a live worker; ``False`` if one has no file."""
        if any(self._sources[i] is None for i in self._lost):
            return False
        dead = {self._workers[i] for i in self._lost}
        live = [w for w in worker_addresses(self._client) if w not in dead]  # the scheduler may not know yet
        if not live:
            return False
        load: dict[int, Pending] = {}
        placed = [w for j, w in enumerate(self._workers) if j not in self._lost]
        try:
            for i in sorted(self._lost):
                self._workers[i] = min(live, key=lambda w: (placed.count(w), live.index(w)))
                placed.append(self._workers[i])
                self._futures[i], self._holders[i] = self._start([(i, self._workers[i])], _RECOVER_SECONDS)[0]
                source = self._sources[i]
                assert source is not None
                load[i] = self._send(i, "load", source.path, source.mmap, source.rows, source.header_sha256)
        except Exception as exc:  # the worker chosen is gone too (the scheduler did not know yet)
            if not worker_gone(exc):
                raise
            return False
        self._lost.clear()
        try:
            self._gather(load)
        except _Lost:
            return False
        return True

    # ------------------------------------------------------------------ shape

    @property
    def shard_count(self) -> int:
        return len(self._holders)

    @property
    def workers(self) -> tuple[str, ...]:
        """The address of each shard's worker."""
        return tuple(self._workers)

    def __len__(self) -> int:
        return sum(runs.rows for runs in self._runs.values())

    @property
    def dimensions(self) -> tuple[int, ...]:
        return tuple(sorted(self._runs))

    def __repr__(self) -> str:
        tables = ", ".join(f"{d}d: {self._runs[d].rows} rows" for d in self.dimensions)
        return f"ShardedStore(shards={self.shard_count}, tables={{{tables}}})"

    @property
    def bytes_through_client(self) -> int:
        """Bytes this store has sent to and received from its shards since it was made (the pickled
        arguments and results of every shard call; the transport's framing is not counted)."""
        return self._traffic

    @_exclusive
    def table(self, dimension: int) -> ShardedTable:
        d = self._dimension(dimension)
        infos = self._all("tables")
        shard_rows = self._runs[d].shard_rows(self.shard_count)
        kinds: list[Quantization] = sorted({k for info in infos.values() if d in info for k in cast("ShardTable", info[d]).quantized})
        return ShardedTable(d, self._runs[d].rows, shard_rows, tuple(kinds), self._int_labels[d])

    @_exclusive
    def ids(self, dimension: int) -> tuple[str, ...]:
        """Every id of a table in global row order (gathered from the shards: inspection, not a hot path)."""
        d = self._dimension(dimension)
        holding = [s for s, n in enumerate(self._runs[d].shard_rows(self.shard_count)) if n]
        ids = self._call("ids_of", {s: (d,) for s in holding})
        out: list[str] = []
        for shard, start, n in self._runs[d].global_order(self.shard_count):
            out.extend(ids[shard][start : start + n])
        return tuple(out)

    def _rows_of(self, d: int) -> dict[int, Any]:
        holding = [s for s, n in enumerate(self._runs[d].shard_rows(self.shard_count)) if n]
        return self._call("rows_of", {s: (d,) for s in holding})

    def _dimension(self, dimension: object) -> int:
        d = check_dimension(dimension)
        if d not in self._runs:
            raise DimensionError(f"no table of dimension {d}; stored: {list(self.dimensions) or 'none'}")
        return d

    @_exclusive
    def memory_info(self) -> ShardedMemoryInfo:
        infos = self._all("memory_info")
        return ShardedMemoryInfo(tuple(cast("MemoryInfo", infos[s]) for s in range(self.shard_count)), tuple(self._workers))

    @property
    def config(self) -> JSONObject:
        copy: JSONObject = json.loads(json.dumps(self._config))
        return copy

    @config.setter
    def config(self, value: Mapping[str, object]) -> None:
        with self._lock:
            self._hasher.hash_config(value)
            checked = as_config(value)
            self._all("set_config", checked)
            self._config = checked
            self._changed(range(self.shard_count))

    @property
    def config_hash(self) -> str:
        return self._hasher.hash_config(self._config)

    def _changed(self, shards: Sequence[int] | range) -> None:
        for s in shards:
            self._sources[s] = None

    def _writable(self) -> None:
        if self._mapped:
            raise ReadOnlyStoreError("this sharded store's shards are memory-mapped from their files and read-only; "
                                     "call materialize() to copy them into their workers' memory first")  # fmt: skip

    # ------------------------------------------------------------------ changes: check every shard, then change

    @_exclusive
    def add(self, vectors: object, ids: Sequence[str] | None = None, labels: LabelsArg | None = None,
            metadata: Sequence[Mapping[str, object]] | None = None) -> tuple[str, ...]:  # fmt: skip
        """Append rows ``(n, d)`` to the table of dimension ``d``, placed on the shards by the rule of
        :mod:`embedtools.sharded.placement`; return their ids (generated as a single store does).

        First every shard is asked whether it holds any of the ids and whether its piece fits its
        budget; only if all agree are the pieces sent. A refusal (:class:`DuplicateIdError`,
        :class:`MemoryLimitError`, bad labels or metadata) leaves every shard as it was.
        """
        self._writable()
        host = as_float32_matrix(vectors)
        n, d = host.shape
        runs = self._runs.get(d, Runs())
        existing = None if d not in self._runs else ((0,) if self._int_labels[d] else ("",))
        new_labels = labels_for(d, labels, n, existing)
        if metadata is not None:
            encode_metadata(metadata, n)
        shares = place(runs.shard_rows(self.shard_count), n)
        if ids is None:
            new_ids = self._free_ids(d, runs.rows, n)
        else:
            new_ids = check_strings(ids, n, "ids")
            seen: set[str] = set()
            for i in new_ids:
                if i in seen:
                    raise DuplicateIdError(f"id {i!r} is given twice")
                seen.add(i)
        checks = self._call("check_add", {s: (d, shares[s], new_ids) for s in range(self.shard_count)})
        for s in range(self.shard_count):
            taken, refusal = checks[s]
            if taken:
                raise DuplicateIdError(f"id {taken[0]!r} is already in table {d}d")
            if refusal is not None:
                asked, used, limit = refusal
                raise MemoryLimitError(f"shard {s} on {self._workers[s]} refuses {shares[s]} rows of {d}d: it asks for "
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
            self._call("add", pieces)
        except EmbedtoolsError:  # a refusal the checks did not foresee: take back what the others added
            self._undo_add(d, pieces)
            raise
        self._runs[d] = runs.appended(shares)
        self._int_labels[d] = bool(new_labels) and isinstance(new_labels[0], int)
        self._changed(list(pieces))
        return new_ids

    def _undo_add(self, d: int, pieces: Mapping[int, tuple[object, ...]]) -> None:
        found = self._call("find", {s: (cast("tuple[str, ...]", p[1]), d) for s, p in pieces.items()})
        undo = {s: (list(f[d]), d) for s, f in found.items() if d in f}
        self._call("remove", undo)

    def _free_ids(self, d: int, start: int, n: int) -> tuple[str, ...]:
        """The ids a single store would generate: positions, skipping ids some shard already holds."""
        chosen: list[str] = []
        position = start
        while len(chosen) < n:
            batch = [str(p) for p in range(position, position + n - len(chosen))]
            position += len(batch)
            found = self._all("find", batch, d)
            taken = {i for f in found.values() for rows in f.values() for i in rows}
            chosen.extend(i for i in batch if i not in taken)
        return tuple(chosen)

    def _where(self, ids: Sequence[str], dimension: int | None) -> dict[int, dict[int, dict[str, int]]]:
        """For each shard, table and id of ``ids`` it holds: that id's local row."""
        return {s: f for s, f in self._all("find", list(ids), dimension).items() if f}

    @_exclusive
    def remove(self, ids: Sequence[str], dimension: int | None = None) -> int:
        """Remove the rows with these ids from the table of ``dimension`` (or every table that has
        them); return how many went. An id no shard holds raises :class:`UnknownIdError` first."""
        self._writable()
        wanted = tuple(dict.fromkeys(check_ids(ids)))
        d_named = None if dimension is None else self._dimension(dimension)
        found = self._where(wanted, d_named)
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
            removed += sum(self._call("remove", step).values())
        for d in {d for tables in found.values() for d in tables}:
            gone = {s: list(tables[d].values()) for s, tables in found.items() if d in tables}
            runs = self._runs[d].removed(self.shard_count, gone)
            if runs.rows:
                self._runs[d] = runs
            else:
                del self._runs[d], self._int_labels[d]
        self._changed(list(found))
        return removed

    @_exclusive
    def update(self, ids: Sequence[str], vectors: object = None, labels: LabelsArg | None = None,
               metadata: Sequence[Mapping[str, object]] | None = None, *, dimension: int | None = None) -> None:  # fmt: skip
        """Replace the vectors, labels and/or metadata of existing rows, found by id, in one table;
        rows keep their shards and positions. Every id is found before any shard changes."""
        self._writable()
        keys = check_ids(ids, unique=True)
        n = len(keys)
        host, d = check_update(vectors, dimension, n)
        d = self._dimension(d)
        new_labels = None if labels is None else labels_for(d, labels, n, (0,) if self._int_labels[d] else ("",))
        if metadata is not None:
            encode_metadata(metadata, n)
        found = self._where(keys, d)
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
        self._call("update", calls)
        self._changed(list(calls))

    @_exclusive
    def quantize(self, dimension: int, kind: Quantization) -> None:
        """Give every shard's table of ``dimension`` a quantised index of ``kind`` (each calibrated on
        its shard's rows); if one shard refuses, the index is dropped again where it was added."""
        self._writable()
        d = self._dimension(dimension)
        kind = check_quantization(kind)
        holding = [s for s, n in enumerate(self._runs[d].shard_rows(self.shard_count)) if n]
        before = self._call("tables", {s: () for s in holding})
        try:
            self._call("quantize", {s: (d, kind) for s in holding})
        except EmbedtoolsError:
            fresh = self._call("tables", {s: () for s in holding})
            self._call("drop_quantized", {s: (d, kind) for s in holding
                                          if kind in fresh[s][d].quantized and kind not in before[s][d].quantized})  # fmt: skip
            raise
        self._changed(holding)

    @_exclusive
    def drop(self, dimension: int) -> None:
        self._writable()
        d = self._dimension(dimension)
        holding = [s for s, n in enumerate(self._runs[d].shard_rows(self.shard_count)) if n]
        self._call("drop", {s: (d,) for s in holding})
        del self._runs[d], self._int_labels[d]
        self._changed(holding)

    @_exclusive
    def materialize(self) -> None:
        """Copy memory-mapped shards into their workers' memory and make the store writable."""
        self._all("materialize")
        self._mapped = False

    # ------------------------------------------------------------------ search

    def search(self, queries: object, k: int = 10, dimension: int | None = None, metric: Metric = "cosine",
               **options: Any) -> SearchResult:  # fmt: skip
        """What :meth:`EmbeddingStore.search` returns on one store holding these rows in this order.

        Every shard runs its own store's search (``funnel=``, ``quantized=``, ``where=`` and any
        other option are passed through) and sends back its ``(queries, k)`` scores and local rows;
        the client merges them (score, then global row). Every score is the one the shard's store
        computed for that row, so where the single store's arithmetic is exact (``l2``, rescored in
        float64; products that float32 holds exactly) ids, indices and scores are the single store's
        bit for bit; float32 ``cosine``/``dot`` scores of other rows can differ in the last bit
        with how the GEMM was blocked (as one store's do with another block size), which reorders
        only rows whose scores are that close. For ``funnel`` with one stage and for ``quantized``
        shortlists each shard keeps a shortlist of the same size over its own rows, so the union
        holds the single store's shortlist and recall is at least the single store's (an ``int8``
        index is calibrated per shard, and a multi-stage funnel cuts per shard at every stage: for
        those this is not a guarantee). A shard whose worker is lost mid-search
        is reloaded from its file and the search run again (all shards), or
        :class:`ShardLostError` names it: never an answer from some of the shards.
        ``row_ids`` of the result holds the winners' ids only. :attr:`last_search` says what moved.
        """
        started = time.perf_counter()
        k = check_k(k)
        metric = check_metric(metric)
        q = as_queries(queries)
        width = q.shape[1]
        with self._lock:
            source = self._source_dimension(dimension if dimension is not None else width, exact=dimension is None)
            attempt = 1
            while True:
                try:
                    result, stats = self._search_once(q, k, dimension, metric, options, source)
                except _Lost as lost:
                    if attempt > _RETRIES or not self._recover():
                        raise self._lost_error(sorted(self._lost | set(lost.shards))) from None
                    attempt += 1
                    continue
                self.last_search = replace(stats, seconds=time.perf_counter() - started, attempts=attempt)
                return result

    def _source_dimension(self, width: object, *, exact: bool) -> int:
        """The table a search of ``width`` reads, by the single store's rule (the table of that
        width, or for a prefix the narrowest wider one), chosen over every shard's tables."""
        d = check_dimension(width)
        if d in self._runs:
            return d
        wider = [t for t in self._runs if t > d]
        if exact or not wider:
            raise DimensionError(f"no table of dimension {d}; stored: {list(self.dimensions) or 'none'}")
        return min(wider)

    def _search_once(self, q: npt.NDArray[np.float32], k: int, dimension: int | None, metric: Metric,
                     options: Mapping[str, Any], source: int) -> tuple[SearchResult, SearchStats]:  # fmt: skip
        self._refuse_lost()
        runs = self._runs[source]
        holding = [s for s, n in enumerate(runs.shard_rows(self.shard_count)) if n]
        found = self._gather({s: self._send(s, "search", q, k, dimension, metric, dict(options)) for s in holding})
        merge_started = time.perf_counter()
        parts = [(found[s][0], runs.to_global(s, found[s][1])) for s in holding]
        n_queries = q.shape[0]
        scores, winners = merge_topk(parts, k, metric, n_queries)
        merge_seconds = time.perf_counter() - merge_started
        shard_of, local = runs.locate(winners.reshape(-1))
        ask = {int(s): np.unique(local[shard_of == s]) for s in np.unique(shard_of)}
        named = self._gather({s: self._send(s, "ids_at", source, rows.astype(np.int32)) for s, rows in ask.items()})
        by_row: dict[int, str] = {}
        for s, rows in ask.items():
            globals_ = runs.to_global(s, rows)
            by_row.update(zip(globals_.tolist(), named[s], strict=True))
        scores.flags.writeable = False
        winners.flags.writeable = False
        first = found[holding[0]]
        result = SearchResult(indices=winners, scores=scores, metric=metric, dimension=int(first[2]),
                              source_dimension=source, row_ids=WinnerIds(by_row, runs.rows))  # fmt: skip
        stats = SearchStats(
            shards=len(holding),
            queries=n_queries,
            k=k,
            query_bytes=q.nbytes * len(holding),
            candidate_bytes=sum(found[s][0].nbytes + found[s][1].nbytes for s in holding),
            id_bytes=sum(rows.size * 4 + sum(len(i.encode()) for i in named[s]) for s, rows in ask.items()),
            merge_seconds=merge_seconds,
            seconds=0.0,
        )
        return result, stats

    # ------------------------------------------------------------------ files

    @_exclusive
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a folder: one embedtools file per shard, written by the shards' workers at once
        (each atomically), then ``manifest.json`` (atomically, last) with each file's SHA-256. The
        folder must be on storage every worker and the client see. A saved, unchanged shard can be
        reloaded from its file if its worker is lost."""
        folder = atomic.as_store_path(path)
        if folder.exists() and not folder.is_dir():
            raise InvalidArgumentError(f"{folder} is not a folder; a sharded store saves to a folder")
        if not folder.parent.is_dir():
            raise InvalidArgumentError(f"folder {folder.parent} does not exist")
        folder.mkdir(exist_ok=True)
        files = [str((folder / shard_file(s)).resolve()) for s in range(self.shard_count)]
        digests = self._call("save", {s: (files[s],) for s in range(self.shard_count)})
        entries: list[ShardEntry] = []
        for s in range(self.shard_count):
            rows = {d: r.shard_rows(self.shard_count)[s] for d, r in self._runs.items()}
            entries.append(ShardEntry(shard_file(s), digests[s][0], digests[s][1], {d: n for d, n in rows.items() if n}))
        write_manifest(folder, Manifest(tuple(entries), dict(self._runs), self._config, self.config_hash))
        for s in range(self.shard_count):
            self._sources[s] = _Source(files[s], None, digests[s][1], self._mapped)

    @classmethod
    def load(cls, client: Client, path: str | os.PathLike[str], config: Config | Sequence[Config] | None = None, *,
             shards: int | None = None, mmap: bool | None = None, workers: Sequence[str] | None = None,
             timeout: float | None = None) -> ShardedStore:  # fmt: skip
        """A sharded store from a saved sharded folder, or from one embedtools file cut into
        ``shards`` (default: one per worker) by the placement rule. Each worker reads its own file
        (or its row ranges of the one file) from storage it shares with the client: no row passes
        through the client. ``mmap=None`` maps the files on NumPy workers (read-only until
        :meth:`materialize`); ``mmap=False`` reads them into memory."""
        target, folder = atomic.locate(path)
        if folder:
            if not is_sharded_folder(target):
                raise InvalidArgumentError(f"{target} is a folder without a manifest.json (not a sharded store)")
            manifest = read_manifest(target)
            if shards is not None and shards != len(manifest.shards):
                raise InvalidArgumentError(f"{target} holds {len(manifest.shards)} shards, not {shards}; it loads as saved")
            store = cls(client, config, shards=len(manifest.shards), workers=workers, timeout=timeout)
            sources = [_Source(str((target / e.file).resolve()), None, e.header_sha256, mmap) for e in manifest.shards]
            store._fill(sources, manifest.tables, manifest.config)
            if manifest.config_hash != store.config_hash:
                raise StoreFormatError(f"{target}: the manifest's config hash is not its config's")
            for s, entry in enumerate(manifest.shards):
                got = {d: t.rows for d, t in cast("dict[int, ShardTable]", store._call("tables", {s: ()})[s]).items()}
                if got != dict(entry.rows):
                    raise StoreFormatError(f"{target / entry.file} holds tables {got}, the manifest says {dict(entry.rows)}")
            return store
        shapes = fileformat.read_table_shapes(target)
        header_config: JSONObject = fileformat.read_header(target).get("config", {})
        store = cls(client, config, shards=shards, workers=workers, timeout=timeout)
        count = store.shard_count
        ranges: list[dict[int, tuple[int, int]]] = [{} for _ in range(count)]
        tables: dict[int, Runs] = {}
        for shape in shapes:
            shares = place([0] * count, shape.rows)
            tables[shape.dimension] = Runs().appended(shares)
            start = 0
            for s, share in enumerate(shares):
                ranges[s][shape.dimension] = (start, start + share)
                start += share
        resolved = str(target.resolve())
        store._fill([_Source(resolved, ranges[s], None, mmap) for s in range(count)], tables, header_config)
        return store

    def _fill(self, sources: Sequence[_Source], tables: Mapping[int, Runs], config: JSONObject) -> None:
        self._call("load", {s: (src.path, src.mmap, src.rows, src.header_sha256) for s, src in enumerate(sources)})
        self._runs = dict(tables)
        infos = self._all("tables")
        self._int_labels = {d: any(cast("ShardTable", info[d]).int_labels for info in infos.values() if d in info) for d in tables}
        self._config = config
        self._sources = list(sources)
        self._mapped = any(self._all("mapped").values())

    def to_store(self, store: EmbeddingStore) -> EmbeddingStore:
        """Copy every row into one (empty) :class:`EmbeddingStore`, in global order, with the same
        indexes and config (through the client: for stores that fit one machine)."""
        with self._lock:
            for d in self.dimensions:
                rows = self._rows_of(d)
                order = self._runs[d].global_order(self.shard_count)
                ids = [i for s, a, n in order for i in rows[s][0][a : a + n]]
                labels = [lab for s, a, n in order for lab in rows[s][1][a : a + n]]
                meta = [m for s, a, n in order for m in rows[s][2][a : a + n]]
                vectors = np.concatenate([rows[s][3][a : a + n] for s, a, n in order])
                store.add(vectors, ids, labels, meta)
                for kind in self.table(d).quantized:
                    store.quantize(d, kind)
            store.config = self._config
        return store

    def close(self) -> None:
        """Release the shards' actors (their stores go with them); the client stays open."""
        with self._lock:
            for f in self._futures:
                if f is not None:
                    release(f)
            self._futures = [None] * self.shard_count


def _configs(config: object, count: int) -> list[dict[str, object]]:
    from embedtools.container import check_config_keys

    if config is None:
        configs: list[dict[str, object]] = [{} for _ in range(count)]
    elif isinstance(config, Mapping):
        configs = [dict(cast("Mapping[str, object]", config)) for _ in range(count)]
    elif isinstance(config, Sequence) and not isinstance(config, str):
        items = list(cast("Sequence[object]", config))
        if len(items) != count or not all(isinstance(c, Mapping) for c in items):
            raise InvalidArgumentError(f"config is one mapping or one per shard ({count}), not {len(items)} items")
        configs = [dict(cast("Mapping[str, object]", c)) for c in items]
    else:
        raise InvalidArgumentError(f"config must be a mapping or one per shard, not {type(config).__name__}")
    for c in configs:
        check_config_keys(c)
    return configs


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

