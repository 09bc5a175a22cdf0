"""A sharded search: every shard's own search on its worker, the exact merge on the client.

The shards holding the table searched each send back their ``(queries, k)`` scores and local rows;
:func:`~embedtools.sharded.merge.merge_topk` merges them over global rows, and only the winners'
ids are fetched from their shards. A shard lost mid-search is reloaded from its file and the search
run again (all shards), or :class:`~embedtools.errors.ShardLostError` names it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from embedtools.protocols import Metric
from embedtools.results import SearchResult
from embedtools.search.kernel import check_k, check_metric
from embedtools.sharded.group import ShardsLost
from embedtools.sharded.merge import merge_topk
from embedtools.sharded.results import SearchStats, WinnerIds
from embedtools.sharded.state import ShardedState
from embedtools.validation import as_queries, check_dimension

__all__ = ["Request", "check_request", "search"]

#: Searches tried again after reloading lost shards from their files.
_RETRIES = 2


class Request(NamedTuple):
    """A search's checked arguments, and when it started."""

    queries: npt.NDArray[np.float32]
    k: int
    metric: Metric
    started: float


def check_request(queries: object, k: int, metric: Metric) -> Request:
    """Check a search's arguments (before it waits for the store's lock)."""
    started = time.perf_counter()
    k = check_k(k)
    metric = check_metric(metric)
    return Request(as_queries(queries), k, metric, started)


def search(state: ShardedState, request: Request, dimension: int | None, options: Mapping[str, Any]) -> tuple[SearchResult, SearchStats]:
    """:meth:`ShardedStore.search <embedtools.sharded.store.ShardedStore.search>` and its stats
    (called under the state's lock)."""
    q, k, metric, started = request
    width = q.shape[1]
    source = _source_dimension(state, dimension if dimension is not None else width, exact=dimension is None)
    attempt = 1
    while True:
        try:
            result, stats = _search_once(state, q, k, dimension, metric, options, source)
        except ShardsLost as lost:
            if attempt > _RETRIES or not state.group.recover():
                raise state.group.lost_error(sorted(state.group.lost | set(lost.shards))) from None
            attempt += 1
            continue
        return result, replace(stats, seconds=time.perf_counter() - started, attempts=attempt)


def _source_dimension(state: ShardedState, width: object, *, exact: bool) -> int:
    """The table a search of ``width`` reads, by the single store's rule (the table of that
    width, or for a prefix the narrowest wider one), chosen over every shard's tables."""
    d = check_dimension(width)
    if d in state.runs:
        return d
    wider = [t for t in state.runs if t > d]
    if exact or not wider:
        raise state.no_table(d)
    return min(wider)


def _search_once(state: ShardedState, q: npt.NDArray[np.float32], k: int, dimension: int | None, metric: Metric,
                 options: Mapping[str, Any], source: int) -> tuple[SearchResult, SearchStats]:  # fmt: skip
    group = state.group
    group.refuse_lost()
    runs = state.runs[source]
    holding = state.holding(source)
    found = group.gather({s: group.send(s, "search", q, k, dimension, metric, dict(options)) for s in holding})
    merge_started = time.perf_counter()
    parts = [(found[s][0], runs.to_global(s, found[s][1])) for s in holding]
    n_queries = q.shape[0]
    scores, winners = merge_topk(parts, k, metric, n_queries)
    merge_seconds = time.perf_counter() - merge_started
    shard_of, local = runs.locate(winners.reshape(-1))
    ask = {int(s): np.unique(local[shard_of == s]) for s in np.unique(shard_of)}
    named = group.gather({s: group.send(s, "ids_at", source, rows.astype(np.int32)) for s, rows in ask.items()})
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
