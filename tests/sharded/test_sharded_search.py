"""Sharded search equals single-store search, on a LocalCluster of 2 worker processes.

Each example builds one EmbeddingStore and one ShardedStore from the same adds (and removals),
then compares searches, for every metric, with duplicates, exact ties (small-integer vectors,
whose products are exact in float32), near-ties, filters, prefixes, uneven shards (3 shards on 2
workers, odd batch sizes) and empty ones (fewer rows than shards).

Where the single store's scores are exact arithmetic (``l2``, rescored in float64; ``dot`` and
of small-integer rows) ids, indices and scores are equal bit for bit. ``cosine``, and ``dot`` of
other float rows, are float32 GEMM scores, whose last bit depends on how the GEMM
was blocked (one store searching with another block size differs the same way): there scores
agree to a few ulps and ids are equal wherever the single store's scores are separated by more.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import embedtools as et
from embedtools.sharded import ShardedStore
from tests.sharded.conftest import CALL_SECONDS, CONFIG

METRICS: tuple[et.Metric, ...] = ("cosine", "dot", "l2")
# A Dask client thread (its event loop runs beside the main thread) can draw from the global random
# module while hypothesis generates an example in the main thread; hypothesis then
# warns that a strategy used ``random`` (an error under filterwarnings = error) and, replaying,
# calls the strategy flaky. Our strategies use no ``random``: the warning is about that thread.
pytestmark = pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies:hypothesis.errors.HypothesisDeprecationWarning")
PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def corpora(draw: st.DrawFn, dim: int | None = None) -> tuple[list[np.ndarray[Any, Any]], np.ndarray[Any, Any]]:
    """Batches of rows (small ints, floats, or repeats of earlier rows) and queries like them."""
    d = dim if dim is not None else draw(st.integers(2, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batches: list[np.ndarray[Any, Any]] = []
    rows: list[np.ndarray[Any, Any]] = []
    for n in draw(st.lists(st.integers(1, 7), min_size=1, max_size=4)):
        kind = draw(st.sampled_from(["ints", "floats", "repeats"]))
        if kind == "ints" or not rows:
            batch = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
        elif kind == "floats":
            batch = rng.standard_normal((n, d)).astype(np.float32)
        else:
            pool = np.vstack(rows)
            batch = pool[rng.integers(0, len(pool), n)]
        batches.append(batch)
        rows.append(batch)
    pool = np.vstack(rows)
    q = draw(st.integers(1, 3))
    queries = np.vstack([pool[rng.integers(0, len(pool), q)], rng.integers(-2, 3, size=(1, d)).astype(np.float32)])
    queries[np.all(queries == 0, axis=1)] = 1.0
    return batches, queries


def build(client: Any, batches: list[np.ndarray[Any, Any]], shards: int, labels: bool = False) -> tuple[et.EmbeddingStore, ShardedStore]:
    single = et.make_container(CONFIG).store()
    sharded = ShardedStore(client, CONFIG, shards=shards, timeout=CALL_SECONDS)
    for batch in batches:
        tags = [("a", "b", "c")[int(abs(r.sum())) % 3] for r in batch] if labels else None
        meta = [{"n": int(r[0])} for r in batch]
        assert sharded.add(batch, labels=tags, metadata=meta) == single.add(batch, labels=tags, metadata=meta)
    return single, sharded


def assert_same(a: et.SearchResult, b: et.SearchResult, *, exact: bool = True, wider: et.SearchResult | None = None) -> None:
    """``a`` (sharded) is ``b`` (single); with ``exact=False`` up to float32 GEMM rounding, where
    ``wider`` is the single store's search for one more row (the score just below the cut)."""
    assert (a.dimension, a.source_dimension, a.metric) == (b.dimension, b.source_dimension, b.metric)
    assert a.indices.shape == b.indices.shape
    if exact:
        assert a.ids == b.ids
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.scores, b.scores)
        return
    assert wider is not None
    tol = 1e-5 * max(1.0, float(np.abs(wider.scores).max(initial=0.0)))
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=tol)
    for got, want, ranked in zip(a.ids, b.ids, wider.scores.tolist(), strict=True):
        for j in range(len(want)):
            if all(abs(ranked[j] - other) > tol for i, other in enumerate(ranked) if i != j):
                assert got[j] == want[j]  # a score clear of every other: the same row at the same rank


def exact_arithmetic(batches: list[np.ndarray[Any, Any]], queries: np.ndarray[Any, Any], metric: et.Metric) -> bool:
    """Whether the single store's scores are exact arithmetic: l2 (rescored in float64) always, dot
    of small-integer rows (exact products); cosine scales by 1/|x|, which rounds."""
    whole = np.vstack([*batches, queries])
    return metric == "l2" or (metric == "dot" and bool(np.array_equal(whole, np.rint(whole))))


def compare(sharded: ShardedStore, single: et.EmbeddingStore, queries: Any, k: int, exact: bool, **options: Any) -> None:
    wider = None if exact else single.search(queries, k + 1, **options)
    assert_same(sharded.search(queries, k, **options), single.search(queries, k, **options), exact=exact, wider=wider)


@PROPERTY
@given(corpora(), st.integers(1, 3), st.sampled_from(METRICS), st.integers(1, 12), st.data())
def test_exact_search_equals_the_single_store(client: Any, corpus: Any, shards: int, metric: et.Metric, k: int, data: st.DataObject) -> None:
    batches, queries = corpus
    single, sharded = build(client, batches, shards)
    exact = exact_arithmetic(batches, queries, metric)
    try:
        compare(sharded, single, queries, k, exact, metric=metric)
        gone = data.draw(st.sets(st.sampled_from(single.table(queries.shape[1]).ids), max_size=len(single) - 1))
        if gone:
            assert sharded.remove(sorted(gone)) == single.remove(sorted(gone))
            assert sharded.ids(queries.shape[1]) == single.table(queries.shape[1]).ids
            compare(sharded, single, queries, k, exact, metric=metric)
        stats = sharded.last_search
        assert stats is not None
        winners = sum(len(i.encode()) for row in single.search(queries, k, metric=metric).ids for i in row)
        assert stats.query_bytes == stats.shards * queries.nbytes
        assert stats.candidate_bytes + stats.id_bytes <= stats.shards * stats.queries * k * 16 + winners
    finally:
        sharded.close()


@settings(max_examples=90, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(corpora(dim=6), st.integers(2, 3), st.sampled_from(METRICS), st.integers(1, 8), st.data())
def test_filtered_and_prefix_search_equal_the_single_store(client: Any, corpus: Any, shards: int, metric: et.Metric, k: int,
                                                           data: st.DataObject) -> None:  # fmt: skip
    batches, queries = corpus
    single, sharded = build(client, batches, shards, labels=True)
    exact = exact_arithmetic(batches, queries, metric)
    try:
        where = data.draw(st.sampled_from([et.Label("a"), et.Label("b") | et.Label("c"), et.Meta("n").between(0, None),
                                           et.Ids("0", "3", "5", "nope")]))  # fmt: skip
        compare(sharded, single, queries, k, exact, metric=metric, where=where)
        prefix = data.draw(st.integers(1, 6))
        compare(sharded, single, queries, k, exact, dimension=prefix, metric=metric)
    finally:
        sharded.close()


def test_update_keeps_positions_and_search_stays_equal(client: Any) -> None:
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((n, 8)).astype(np.float32) for n in (5, 9, 2)]
    single, sharded = build(client, batches, 3)
    try:
        new = rng.standard_normal((3, 8)).astype(np.float32)
        sharded.update(["1", "7", "15"], new, labels=["x", "y", "z"])
        single.update(["1", "7", "15"], new, labels=["x", "y", "z"])
        queries = np.vstack([new, rng.standard_normal((2, 8)).astype(np.float32)])
        for metric in METRICS:
            compare(sharded, single, queries, 6, metric == "l2", metric=metric)
        compare(sharded, single, queries, 6, False, where=et.Label("y"))
        assert sharded.ids(8) == single.table(8).ids and len(sharded) == len(single) == 16
    finally:
        sharded.close()


def test_memory_info_per_worker_and_in_all(client: Any) -> None:
    rng = np.random.default_rng(4)
    single, sharded = build(client, [rng.standard_normal((10, 4)).astype(np.float32)], 2)
    try:
        info = sharded.memory_info()
        assert len(info.shards) == 2 and len(set(info.workers)) == 2
        assert info.store_bytes == single.memory_info().store_bytes == sum(m.store_bytes for m in info.shards)
        assert info.limit_bytes == 2 * single.memory_info().limit_bytes
        assert [m.tables[4].rows for m in info.shards] == [5, 5]
        table = sharded.table(4)
        assert (table.rows, table.shard_rows) == (10, (5, 5))
        sharded.config = {"model": "m", "seed": 1}
        single.config = {"model": "m", "seed": 1}
        assert sharded.config_hash == single.config_hash and sharded.config == single.config
    finally:
        sharded.close()


@pytest.mark.parametrize("stages", [[(3, 12)], [(4, 20)]])
def test_one_stage_funnel_recall_is_at_least_the_single_stores(client: Any, stages: list[tuple[int, int]]) -> None:
    """Per-shard shortlists of the funnel's size hold the single store's shortlist, so every true
    top-k row the single store finds, the sharded search finds too."""
    rng = np.random.default_rng(5)
    scale = np.exp(-np.arange(16) / 3).astype(np.float32)
    batches = [(rng.standard_normal((n, 16)) * scale).astype(np.float32) for n in (70, 45, 33)]
    single, sharded = build(client, batches, 3)
    try:
        queries = (rng.standard_normal((25, 16)) * scale).astype(np.float32)
        truth = single.search(queries, 5).ids
        for funnel, one, many in ((stages, single.search(queries, 5, funnel=stages), sharded.search(queries, 5, funnel=stages)),):
            assert funnel
            for t, a, b in zip(truth, one.ids, many.ids, strict=True):
                assert set(t) & set(a) <= set(b)
    finally:
        sharded.close()


def test_quantized_shortlist_recall_is_at_least_the_single_stores(client: Any) -> None:
    rng = np.random.default_rng(6)
    batches = [rng.standard_normal((n, 12)).astype(np.float32) for n in (60, 50, 41)]
    single, sharded = build(client, batches, 2)
    try:
        single.quantize(12, "float16")
        sharded.quantize(12, "float16")
        assert sharded.table(12).quantized == ("float16",)
        queries = rng.standard_normal((30, 12)).astype(np.float32)
        truth = single.search(queries, 4).ids
        one = single.search(queries, 4, quantized="float16", rescore=1)
        many = sharded.search(queries, 4, quantized="float16", rescore=1)
        for t, a, b in zip(truth, one.ids, many.ids, strict=True):
            assert set(t) & set(a) <= set(b)
    finally:
        sharded.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(corpora(), st.integers(1, 3), st.sampled_from(METRICS), st.integers(1, 12))
def test_certified_search_equals_the_single_store_bit_for_bit(client: Any, corpus: Any, shards: int, metric: et.Metric, k: int) -> None:
    """``rescore="certified"`` makes every metric exact (float64 rescoring of a proven shortlist),
    so cosine and dot of any float rows are equal bit for bit too, not only to GEMM rounding."""
    batches, queries = corpus
    single, sharded = build(client, batches, shards)
    try:
        compare(sharded, single, queries, k, True, metric=metric, rescore="certified")
    finally:
        sharded.close()
