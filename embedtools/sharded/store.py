"""ShardedStore: one logical EmbeddingStore spread over the workers of a Dask ``distributed`` cluster.

Each shard is an :class:`~embedtools.EmbeddingStore` built on its worker from the container
configuration (its own backend, device and budget; :mod:`embedtools.sharded.holder`). The client
keeps only each table's global row order (:mod:`embedtools.sharded.placement`), the experiment
config and where each shard can be reloaded from. A search runs every shard's own search on its
worker and merges their ``(queries, k)`` candidates exactly on the client
(:mod:`embedtools.sharded.merge`); a change asks every shard first and changes them only if all
can take it, so a refusal anywhere changes nothing anywhere.

This module is the facade: the shards and their calls are :mod:`embedtools.sharded.group`, the
client's picture :mod:`embedtools.sharded.state`, the changes :mod:`embedtools.sharded.changes`,
the search :mod:`embedtools.sharded.searching` and the files :mod:`embedtools.sharded.files`.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, cast

from embedtools.errors import InvalidArgumentError
from embedtools.hashing import DEFAULT_HASH_LENGTH, Sha256Hasher
from embedtools.protocols import Metric, Quantization
from embedtools.results import MemoryInfo, SearchResult
from embedtools.sharded import changes, files, searching
from embedtools.sharded.cluster import worker_addresses
from embedtools.sharded.group import ShardGroup, shard_configs
from embedtools.sharded.results import SearchStats, ShardedMemoryInfo, ShardedTable
from embedtools.sharded.state import ShardedState
from embedtools.validation import JSONObject, LabelsArg, as_config, check_positive_int

if TYPE_CHECKING:
    from distributed import Client

    from embedtools.container import Config
    from embedtools.store import EmbeddingStore

__all__ = ["ShardedStore"]

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", bound="ShardedStore")

#: How long a new store waits for its cluster's first worker.
_START_SECONDS = 60.0


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
            with self._state.lock:
                return method(self, *args, **kwargs)

        return locked

    def __init__(self, client: Client, config: Config | Sequence[Config] | None = None, *, shards: int | None = None,
                 workers: Sequence[str] | None = None, timeout: float | None = None) -> None:  # fmt: skip
        addresses = list(workers) if workers is not None else worker_addresses(client, wait=_START_SECONDS if timeout is None else timeout)
        if not addresses:
            raise InvalidArgumentError("the client's cluster has no workers")
        count = len(addresses) if shards is None else check_positive_int(shards, "shards")
        configs = shard_configs(config, count)
        length = configs[0].get("hash_length", DEFAULT_HASH_LENGTH)
        hasher = Sha256Hasher(check_positive_int(length, "hash_length", upper=64))
        self.last_search: SearchStats | None = None
        """The traffic and timing of the last search (``None`` before the first)."""
        self._state = ShardedState(ShardGroup(client, configs, addresses, timeout), hasher)

    # ------------------------------------------------------------------ shape

    @property
    def shard_count(self) -> int:
        return self._state.shard_count

    @property
    def workers(self) -> tuple[str, ...]:
        """The address of each shard's worker."""
        return self._state.group.workers

    def __len__(self) -> int:
        return sum(runs.rows for runs in self._state.runs.values())

    @property
    def dimensions(self) -> tuple[int, ...]:
        return self._state.dimensions

    def __repr__(self) -> str:
        tables = ", ".join(f"{d}d: {self._state.runs[d].rows} rows" for d in self.dimensions)
        return f"ShardedStore(shards={self.shard_count}, tables={{{tables}}})"

    @property
    def bytes_through_client(self) -> int:
        """Bytes this store has sent to and received from its shards since it was made (the pickled
        arguments and results of every shard call; the transport's framing is not counted)."""
        return self._state.group.traffic

    @_exclusive
    def table(self, dimension: int) -> ShardedTable:
        return self._state.table(self._state.dimension(dimension))

    @_exclusive
    def ids(self, dimension: int) -> tuple[str, ...]:
        """Every id of a table in global row order (gathered from the shards: inspection, not a hot path)."""
        state = self._state
        d = state.dimension(dimension)
        ids = state.group.call("ids_of", {s: (d,) for s in state.holding(d)})
        out: list[str] = []
        for shard, start, n in state.runs[d].global_order(self.shard_count):
            out.extend(ids[shard][start : start + n])
        return tuple(out)

    @_exclusive
    def memory_info(self) -> ShardedMemoryInfo:
        infos = self._state.group.all("memory_info")
        return ShardedMemoryInfo(tuple(cast("MemoryInfo", infos[s]) for s in range(self.shard_count)), self.workers)

    @property
    def config(self) -> JSONObject:
        copy: JSONObject = json.loads(json.dumps(self._state.config))
        return copy

    @config.setter
    def config(self, value: Mapping[str, object]) -> None:
        state = self._state
        with state.lock:
            state.hasher.hash_config(value)
            checked = as_config(value)
            state.group.all("set_config", checked)
            state.config = checked
            state.changed(range(self.shard_count))

    @property
    def config_hash(self) -> str:
        return self._state.config_hash

    # ------------------------------------------------------------------ changes: check every shard, then change (sharded.changes)

    @_exclusive
    def add(self, vectors: object, ids: Sequence[str] | None = None, labels: LabelsArg | None = None,
            metadata: Sequence[Mapping[str, object]] | None = None) -> tuple[str, ...]:  # fmt: skip
        """Append rows ``(n, d)`` to the table of dimension ``d``, placed on the shards by the rule of
        :mod:`embedtools.sharded.placement`; return their ids (generated as a single store does).

        First every shard is asked whether it holds any of the ids and whether its piece fits its
        budget; only if all agree are the pieces sent. A refusal (:class:`DuplicateIdError`,
        :class:`MemoryLimitError`, bad labels or metadata) leaves every shard as it was.
        """
        return changes.add(self._state, vectors, ids, labels, metadata)

    @_exclusive
    def remove(self, ids: Sequence[str], dimension: int | None = None) -> int:
        """Remove the rows with these ids from the table of ``dimension`` (or every table that has
        them); return how many went. An id no shard holds raises :class:`UnknownIdError` first."""
        return changes.remove(self._state, ids, dimension)

    @_exclusive
    def update(self, ids: Sequence[str], vectors: object = None, labels: LabelsArg | None = None,
               metadata: Sequence[Mapping[str, object]] | None = None, *, dimension: int | None = None) -> None:  # fmt: skip
        """Replace the vectors, labels and/or metadata of existing rows, found by id, in one table;
        rows keep their shards and positions. Every id is found before any shard changes."""
        changes.update(self._state, ids, vectors, labels, metadata, dimension)

    @_exclusive
    def quantize(self, dimension: int, kind: Quantization) -> None:
        """Give every shard's table of ``dimension`` a quantised index of ``kind`` (each calibrated on
        its shard's rows); if one shard refuses, the index is dropped again where it was added."""
        changes.quantize(self._state, dimension, kind)

    @_exclusive
    def drop(self, dimension: int) -> None:
        changes.drop(self._state, dimension)

    @_exclusive
    def materialize(self) -> None:
        """Copy memory-mapped shards into their workers' memory and make the store writable."""
        self._state.group.all("materialize")
        self._state.mapped = False

    # ------------------------------------------------------------------ search (sharded.searching)

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
        request = searching.check_request(queries, k, metric)
        with self._state.lock:
            result, self.last_search = searching.search(self._state, request, dimension, options)
        return result

    # ------------------------------------------------------------------ files (sharded.files)

    @_exclusive
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a folder: one embedtools file per shard, written by the shards' workers at once
        (each atomically), then ``manifest.json`` (atomically, last) with each file's SHA-256. The
        folder must be on storage every worker and the client see. A saved, unchanged shard can be
        reloaded from its file if its worker is lost."""
        files.save(self._state, path)

    @classmethod
    def load(cls, client: Client, path: str | os.PathLike[str], config: Config | Sequence[Config] | None = None, *,
             shards: int | None = None, mmap: bool | None = None, workers: Sequence[str] | None = None,
             timeout: float | None = None) -> ShardedStore:  # fmt: skip
        """A sharded store from a saved sharded folder, or from one embedtools file cut into
        ``shards`` (default: one per worker) by the placement rule. Each worker reads its own file
        (or its row ranges of the one file) from storage it shares with the client: no row passes
        through the client. ``mmap=None`` maps the files on NumPy workers (read-only until
        :meth:`materialize`); ``mmap=False`` reads them into memory."""

        def start(count: int | None) -> tuple[ShardedStore, ShardedState]:
            store = cls(client, config, shards=count, workers=workers, timeout=timeout)
            return store, store._state

        return files.load(path, shards, mmap, start)

    def to_store(self, store: EmbeddingStore) -> EmbeddingStore:
        """Copy every row into one (empty) :class:`EmbeddingStore`, in global order, with the same
        indexes and config (through the client: for stores that fit one machine)."""
        return files.to_store(self._state, store)

    def close(self) -> None:
        """Release the shards' actors (their stores go with them); the client stays open."""
        with self._state.lock:
            self._state.group.close()
