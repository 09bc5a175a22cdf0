"""EmbeddingStore: add, tables, search, memory; every bad input leaves the store as it was."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

import embedtools as et
from embedtools import (
    ByteBudget,
    DimensionError,
    DuplicateIdError,
    EmbeddingStore,
    InvalidArgumentError,
    InvalidEmbeddingError,
    MemoryLimitError,
    Metric,
    Sha256Hasher,
)
from tests.helpers import assert_exact_topk, clustered


def snapshot(store: EmbeddingStore) -> Any:
    """Everything observable about a store, to compare before and after a failing call."""
    tables = {
        d: (store.table(d).to_numpy().tobytes(), store.table(d).ids, store.table(d).labels, store.table(d).metadata)
        for d in store.dimensions
    }
    info = store.memory_info()
    return tables, info.used_bytes, info.store_bytes, store.config


def make_store(limit_bytes: int = 1 << 30) -> EmbeddingStore:
    return EmbeddingStore(et.make_backend("numpy"), ByteBudget(limit_bytes), Sha256Hasher())


# ------------------------------------------------------------------------------------------ add


def test_add_keeps_a_float32_copy(store: EmbeddingStore) -> None:
    vectors = clustered(20, 8).astype(np.float64)
    ids = store.add(vectors)
    assert ids == tuple(str(i) for i in range(20))
    vectors[0, 0] = 1e6  # the seed aliased the caller's array
    table = store.table(8)
    assert table.to_numpy().dtype == np.float32
    np.testing.assert_array_equal(table.to_numpy(), clustered(20, 8))
    assert len(store) == 20 and store.dimensions == (8,)


def test_add_appends_and_keeps_ids_labels_metadata(store: EmbeddingStore) -> None:
    store.add(clustered(3, 4), ids=["a", "b", "c"], labels=["x", "y", "x"], metadata=[{"n": 1}, {}, {"t": [1, "s"]}])
    store.add(clustered(2, 4, seed=1))
    table = store.table(4)
    assert table.ids == ("a", "b", "c", "3", "4")
    assert table.labels == ("x", "y", "x", "", "")
    assert table.metadata == ({"n": 1}, {}, {"t": [1, "s"]}, {}, {})
    assert table.index_of("c") == 2 and len(table) == 5
    decoded = store.table(4).metadata  # (a fresh name: mypy narrows table.metadata by the == above)
    decoded[0]["n"] = 99  # decoded afresh: the store is unchanged
    assert store.table(4).metadata[0] == {"n": 1}
    with pytest.raises(et.UnknownIdError):
        table.index_of("zzz")


def test_table_is_a_snapshot(store: EmbeddingStore) -> None:
    store.add(clustered(3, 4), ids=["a", "b", "c"])
    before = store.table(4)
    store.add(clustered(2, 4, seed=1), ids=["d", "e"])
    assert len(before) == 3 and len(store.table(4)) == 5


def test_several_dimensions_side_by_side(store: EmbeddingStore) -> None:
    full = clustered(10, 16)
    store.add(full)
    store.add(full[:, :4], labels=["l"] * 10)
    assert store.dimensions == (4, 16) and len(store) == 20
    assert store.table(4).labels == ("l",) * 10 and store.table(16).labels == ("",) * 10


def test_replace_swaps_the_table_and_charges_the_difference() -> None:
    store = make_store(limit_bytes=(10 + 1) * (8 + 1) * 4)  # room for 11 rows of 8-d, not 10 + 8
    store.add(clustered(10, 8))
    store.add(clustered(8, 8, seed=1), ids=[f"n{i}" for i in range(8)], replace=True)
    assert store.table(8).ids == tuple(f"n{i}" for i in range(8))
    assert store.memory_info().used_bytes == 8 * 9 * 4
    store.add(clustered(11, 8, seed=2), replace=True)  # growing by the difference fits exactly
    assert store.memory_info().used_bytes == 11 * 9 * 4


VALID = clustered(4, 3)


@pytest.mark.parametrize(
    ("vectors", "kwargs", "error"),
    [
        (np.array([[1.0, np.nan, 0.0]]), {}, InvalidEmbeddingError),
        (np.array([[1.0, np.inf, 0.0]]), {}, InvalidEmbeddingError),
        (np.array([[1e39, 0.0, 0.0]]), {}, InvalidEmbeddingError),  # finite float64, inf as float32
        (np.full((1, 3), 3e38, np.float32), {}, InvalidEmbeddingError),  # norm (5.2e38) overflows float32
        (np.zeros((0, 3)), {}, InvalidEmbeddingError),
        (np.zeros((3, 0)), {}, InvalidEmbeddingError),
        (np.ones(3), {}, InvalidEmbeddingError),
        (np.ones((2, 3, 1)), {}, InvalidEmbeddingError),
        (np.float32(1.0), {}, InvalidEmbeddingError),
        (np.array([["a", "b", "c"]]), {}, InvalidEmbeddingError),
        (np.ones((1, 3), dtype=complex), {}, InvalidEmbeddingError),
        ([[1.0, 2.0], [3.0]], {}, InvalidEmbeddingError),
        ("not vectors", {}, InvalidEmbeddingError),
        (None, {}, InvalidEmbeddingError),
        (VALID, {"ids": ["a", "b"]}, InvalidArgumentError),
        (VALID, {"ids": ["a", "b", "c", "a"]}, DuplicateIdError),
        (VALID, {"ids": ["x0", "b", "c", "d"]}, DuplicateIdError),  # clashes with the existing table
        (VALID, {"ids": [1, 2, 3, 4]}, InvalidArgumentError),
        (VALID, {"ids": "abcd"}, InvalidArgumentError),
        (VALID, {"ids": ["\ud800", "b", "c", "d"]}, InvalidArgumentError),
        (VALID, {"labels": ["x"] * 5}, InvalidArgumentError),
        (VALID, {"labels": [None] * 4}, InvalidArgumentError),
        (VALID, {"metadata": [{}] * 3}, InvalidArgumentError),
        (VALID, {"metadata": [{"a": object()}] + [{}] * 3}, InvalidArgumentError),
        (VALID, {"metadata": [{"a": float("nan")}] + [{}] * 3}, InvalidArgumentError),
        (VALID, {"metadata": [{1: "int key"}] + [{}] * 3}, InvalidArgumentError),
        (VALID, {"metadata": [{"a": {2: "nested int key"}}] + [{}] * 3}, InvalidArgumentError),
        (VALID, {"metadata": ["not a mapping"] * 4}, InvalidArgumentError),
        (VALID, {"metadata": {"a": 1}}, InvalidArgumentError),
    ],
)
def test_bad_add_raises_and_changes_nothing(vectors: Any, kwargs: dict[str, Any], error: type[Exception]) -> None:
    store = make_store()
    store.add(clustered(2, 3, seed=5), ids=["x0", "x1"], metadata=[{"k": 1}, {}])
    before = snapshot(store)
    with pytest.raises(error):
        store.add(vectors, **kwargs)
    assert snapshot(store) == before


def test_zero_rows_are_accepted_and_stay_finite(store: EmbeddingStore) -> None:
    vectors = clustered(6, 4)
    vectors[2] = 0.0
    store.add(vectors)
    for metric in ("cosine", "dot", "l2"):
        result = store.search(vectors, k=6, metric=metric)
        assert np.isfinite(result.scores).all()
    result = store.search(np.zeros(4, np.float32), k=3)
    np.testing.assert_array_equal(result.scores, [[0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(result.indices, [[0, 1, 2]])


def test_over_budget_add_is_refused_before_allocating() -> None:
    store = make_store(limit_bytes=100 * 9 * 4)
    store.add(clustered(60, 8))
    before = snapshot(store)
    with pytest.raises(MemoryLimitError, match="asks for") as info:
        store.add(clustered(41, 8, seed=1))
    assert info.value.asked == 41 * 9 * 4
    assert snapshot(store) == before
    with pytest.raises(MemoryLimitError):
        store.add(clustered(101, 8, seed=2), replace=True)
    assert snapshot(store) == before
    store.add(clustered(40, 8, seed=3))  # exactly at the limit
    assert store.memory_info().available_bytes == 0


def test_drop_and_clear_release_memory(store: EmbeddingStore) -> None:
    store.add(clustered(5, 4))
    store.add(clustered(5, 6))
    store.drop(4)
    assert list(store.dimensions) == [6] and store.memory_info().used_bytes == 5 * 7 * 4
    store.clear()
    assert not store.dimensions and store.memory_info().used_bytes == 0
    with pytest.raises(DimensionError):
        store.drop(6)


def test_garbage_collected_store_returns_its_bytes_to_a_shared_accountant() -> None:
    import gc

    budget = ByteBudget(1 << 20)
    store = EmbeddingStore(et.make_backend("numpy"), budget, Sha256Hasher())
    store.add(clustered(10, 4))
    assert budget.report().used_bytes == 10 * 5 * 4
    del store
    gc.collect()
    assert budget.report().used_bytes == 0


def test_stores_sharing_an_accountant_do_not_mix_their_charges() -> None:
    budget = ByteBudget(1 << 20)
    a = EmbeddingStore(et.make_backend("numpy"), budget, Sha256Hasher())
    b = EmbeddingStore(et.make_backend("numpy"), budget, Sha256Hasher())
    a.add(clustered(10, 4))
    b.add(clustered(20, 4))
    assert budget.report().used_bytes == 30 * 5 * 4
    b.drop(4)
    assert budget.report().used_bytes == 10 * 5 * 4
    assert a.memory_info().store_bytes == 10 * 5 * 4


def test_memory_info(store: EmbeddingStore) -> None:
    store.add(clustered(10, 8))
    info = store.memory_info()
    assert info.limit_bytes == 2**30 and info.used_bytes == info.store_bytes == 10 * 9 * 4
    assert info.tables[8] == et.TableMemory(dimension=8, rows=10, dtype="float32", nbytes=10 * 9 * 4)
    assert info.utilization == pytest.approx(360 / 2**30)
    assert "8d: 10 rows" in repr(store)


def test_config_is_validated_copied_and_hashed(store: EmbeddingStore) -> None:
    assert store.config == {} and store.config_hash == "44136fa355b3678a"
    config = {"model": "bert", "dim": 768, "batch_size": 32}
    store.config = config
    config["dim"] = 1
    assert store.config_hash == "4864205289d401c2"
    store.config["model"] = "changed"
    assert store.config["model"] == "bert"
    with pytest.raises(et.UnhashableConfigError):
        store.config = {"a": {1, 2}}
    assert store.config_hash == "4864205289d401c2"


def test_constructor_checks_block_size() -> None:
    with pytest.raises(InvalidArgumentError):
        EmbeddingStore(et.make_backend("numpy"), ByteBudget(10), Sha256Hasher(), search_block_bytes=0)


# --------------------------------------------------------------------------------------- search


@pytest.mark.parametrize("k", [1, 2, 7])
def test_search_ids_follow_indices_for_any_k(k: int) -> None:
    store = EmbeddingStore(et.make_backend("numpy"), ByteBudget(1 << 30), Sha256Hasher())
    store.add(clustered(40, 8, seed=1), ids=[f"r{i}" for i in range(40)])
    result = store.search(clustered(3, 8, seed=2), k=k)
    assert result.ids == [[f"r{i}" for i in row] for row in result.indices.tolist()]
    assert all(len(row) == k for row in result.ids)
    nothing = store.search(clustered(2, 8, seed=2), k=k, where=et.Label("absent"))
    assert nothing.ids == [[], []]


def test_search_ids_are_the_table_ids_at_search_time_and_built_once() -> None:
    store = EmbeddingStore(et.make_backend("numpy"), ByteBudget(1 << 30), Sha256Hasher())
    store.add(clustered(40, 8, seed=1), ids=[f"r{i}" for i in range(40)])
    result = store.search(clustered(2, 8, seed=2), k=3)
    store.update(["r0", "r1"], labels=["x", "y"], dimension=8)
    store.add(clustered(40, 8, seed=3), ids=[f"s{i}" for i in range(40)], replace=True)
    assert result.ids == [[f"r{i}" for i in row] for row in result.indices.tolist()]
    assert result.ids is result.ids  # computed on first access, then kept
    assert len(result.row_ids) == 40 and "r39" not in repr(result)


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_search_matches_float64_reference_at_full_and_prefix_dimensions(metric: Metric) -> None:
    corpus = clustered(500, 32, seed=11)
    queries = clustered(25, 32, seed=12)
    store = EmbeddingStore(et.make_backend("numpy"), ByteBudget(1 << 30), Sha256Hasher(), search_block_bytes=10_000)
    store.add(corpus, ids=[f"r{i}" for i in range(500)])
    full = store.search(queries, k=10, metric=metric)
    assert (full.dimension, full.source_dimension, full.metric) == (32, 32, metric)
    assert_exact_topk(queries, corpus, metric, 10, full.indices, full.scores)
    assert full.ids == [[f"r{i}" for i in row] for row in full.indices.tolist()]
    for dim in (8, 20):
        prefix = store.search(queries, k=10, dimension=dim, metric=metric)
        assert (prefix.dimension, prefix.source_dimension) == (dim, 32)
        assert_exact_topk(queries[:, :dim], corpus[:, :dim], metric, 10, prefix.indices, prefix.scores)
        narrow = store.search(queries[:, :dim], k=10, dimension=dim, metric=metric)
        np.testing.assert_array_equal(narrow.indices, prefix.indices)


def test_prefix_norms_are_computed_once_and_charged() -> None:
    store = make_store()
    store.add(clustered(100, 16))
    base = store.memory_info().used_bytes
    store.search(clustered(3, 16, seed=1), k=5, dimension=8)
    assert store.memory_info().used_bytes == base + 100 * 4
    store.search(clustered(3, 16, seed=2), k=5, dimension=8)
    store.search(clustered(3, 16, seed=2), k=5, dimension=8, metric="dot")  # dot needs no norms
    assert store.memory_info().used_bytes == base + 100 * 4
    store.drop(16)
    assert store.memory_info().used_bytes == 0


def test_prefix_search_still_works_when_the_norm_cache_does_not_fit() -> None:
    store = make_store(limit_bytes=100 * 17 * 4)
    store.add(clustered(100, 16))
    result = store.search(clustered(3, 16, seed=1), k=5, dimension=8)
    assert result.indices.shape == (3, 5)
    assert store.memory_info().used_bytes == 100 * 17 * 4


def test_prefix_uses_the_narrowest_wider_table(store: EmbeddingStore) -> None:
    store.add(clustered(10, 64), ids=[f"w{i}" for i in range(10)])
    store.add(clustered(10, 32, seed=1), ids=[f"n{i}" for i in range(10)])
    result = store.search(clustered(1, 64, seed=2), k=2, dimension=16)
    assert result.source_dimension == 32 and result.ids[0][0].startswith("n")


def test_prefix_search_does_not_copy_the_table(store: EmbeddingStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.add(clustered(50, 16))
    backend = store.backend
    seen: list[Any] = []
    original = backend.topk

    def spy(queries: Any, corpus: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(corpus)
        return original(queries, corpus, *args, **kwargs)

    monkeypatch.setattr(backend, "topk", spy)
    store.search(clustered(2, 16, seed=3), k=3, dimension=4)
    assert seen[0].shape == (50, 4) and np.shares_memory(seen[0], store.table(16).vectors)


def test_single_query_result_shape_and_frozen_result(store: EmbeddingStore) -> None:
    store.add(clustered(30, 8))
    result = store.search(clustered(1, 8, seed=1)[0], k=4)
    assert result.indices.shape == result.scores.shape == (1, 4) and len(result.ids) == 1
    assert result.scores.dtype == np.float32 and result.indices.dtype == np.int64
    with pytest.raises(ValueError):
        result.scores[0, 0] = 1.0
    with pytest.raises(AttributeError):
        result.metric = "dot"  # type: ignore[misc]


def test_k_larger_than_table_and_empty_query_batch(store: EmbeddingStore) -> None:
    store.add(clustered(3, 8))
    result = store.search(clustered(2, 8, seed=1), k=50)
    assert result.indices.shape == (2, 3)
    empty = store.search(np.zeros((0, 8), np.float32), k=2)
    assert empty.indices.shape == (0, 2) and empty.ids == []


def test_ties_break_by_lower_index(store: EmbeddingStore) -> None:
    row = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    store.add(np.tile(row, (12, 1)))
    assert store.search(row, k=4).indices.tolist() == [[0, 1, 2, 3]]


def test_seed_search_parity_on_clustered_data(store: EmbeddingStore) -> None:
    corpus = clustered(300, 16, seed=2)
    store.add(corpus)
    q = clustered(1, 16, seed=3)[0]
    sims = (corpus / np.linalg.norm(corpus, axis=1, keepdims=True)) @ (q / np.linalg.norm(q))
    np.testing.assert_array_equal(store.search(q, k=5).indices[0], np.argsort(-sims)[:5])


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ({"queries": np.ones((1, 8), np.float32), "k": 0}, InvalidArgumentError),
        ({"queries": np.ones((1, 8), np.float32), "k": -3}, InvalidArgumentError),
        ({"queries": np.ones((1, 8), np.float32), "k": 2.0}, InvalidArgumentError),
        ({"queries": np.ones((1, 8), np.float32), "k": True}, InvalidArgumentError),
        ({"queries": np.ones((1, 8), np.float32), "k": None}, InvalidArgumentError),
        ({"queries": np.ones((1, 8), np.float32), "metric": "manhattan"}, InvalidArgumentError),
        ({"queries": np.ones((1, 7), np.float32)}, DimensionError),
        ({"queries": np.ones((1, 4), np.float32)}, DimensionError),  # no 4-d table, prefix needs dimension=
        ({"queries": np.ones((1, 8), np.float32), "dimension": 9}, DimensionError),
        ({"queries": np.ones((1, 16), np.float32), "dimension": 12}, DimensionError),
        ({"queries": np.ones((1, 8), np.float32), "dimension": 0}, InvalidArgumentError),
        ({"queries": np.ones((1, 8), np.float32), "dimension": "8"}, InvalidArgumentError),
        ({"queries": np.array([[np.nan] * 8])}, InvalidEmbeddingError),
        ({"queries": np.array([[np.inf] * 8])}, InvalidEmbeddingError),
        ({"queries": np.ones((2, 2, 8))}, InvalidEmbeddingError),
        ({"queries": np.ones((1, 0))}, InvalidEmbeddingError),
        ({"queries": [["a"] * 8]}, InvalidEmbeddingError),
    ],
)
def test_bad_search_raises_and_changes_nothing(args: dict[str, Any], error: type[Exception]) -> None:
    store = make_store()
    store.add(clustered(20, 8))
    before = snapshot(store)
    with pytest.raises(error):
        store.search(**args)
    assert snapshot(store) == before


def test_search_on_empty_store_names_what_is_stored() -> None:
    with pytest.raises(DimensionError, match="stored: none"):
        make_store().search(np.ones(4, np.float32))


def test_table_errors(store: EmbeddingStore) -> None:
    with pytest.raises(DimensionError):
        store.table(8)
    with pytest.raises(InvalidArgumentError):
        store.table(-1)


def test_metadata_deep_copy_on_add(store: EmbeddingStore) -> None:
    meta = [{"tags": ["a"]}]
    original = copy.deepcopy(meta)
    store.add(clustered(1, 4), metadata=meta)
    meta[0]["tags"].append("b")
    assert list(store.table(4).metadata) == original


@pytest.mark.parametrize(
    "funnel",
    [
        [(16, 100)],  # dimension not below the searched one
        [(4, 5)],  # shortlist below k
        [(8, 50), (4, 20)],  # dimensions must rise
        [(4, 20), (8, 50)],  # shortlists must not grow
        [(0, 50)],
        [(4,)],
        [("4", 50)],
        "4,50",
        [(4, 50.0)],
    ],
)
def test_bad_funnel_raises_and_changes_nothing(funnel: Any) -> None:
    store = make_store()
    store.add(clustered(100, 16))
    before = snapshot(store)
    with pytest.raises(InvalidArgumentError):
        store.search(clustered(2, 16, seed=1), k=10, funnel=funnel)
    assert snapshot(store) == before


def test_funnel_on_a_prefix_dimension_and_small_table() -> None:
    store = make_store()
    corpus = clustered(30, 16)
    store.add(corpus)
    exact = store.search(corpus[:3], k=5, dimension=8)
    funnel = store.search(corpus[:3], k=5, dimension=8, funnel=[(4, 1000)])
    np.testing.assert_array_equal(funnel.indices, exact.indices)
    assert funnel.source_dimension == 16 and funnel.dimension == 8


def test_funnel_caches_are_charged_and_released() -> None:
    store = make_store()
    store.add(clustered(100, 16))
    base = store.memory_info().used_bytes
    store.search(clustered(2, 16, seed=1), k=5, funnel=[(4, 20)])
    # cosine shortlists on a cached unit-normalised copy of the 4-d prefix
    assert store.memory_info().used_bytes == base + 100 * 4 * 4
    store.search(clustered(2, 16, seed=1), k=5, funnel=[(4, 20)], metric="l2")  # l2 needs the 4-d norms
    assert store.memory_info().used_bytes == base + 100 * 4 * 4 + 100 * 4
    store.add(clustered(1, 16, seed=3))  # the table changed: its caches go, and their bytes with them
    assert store.memory_info().used_bytes == 101 * 17 * 4


def test_a_table_shows_its_indexes_rotation_and_caches_with_their_bytes() -> None:
    store = make_store()
    store.add(clustered(100, 32))
    store.quantize(32, "int8")
    store.fit_rotation(32, components=8)
    table = store.table(32)
    assert set(table.quantized) == {"int8"} and table.caches == {}
    assert table.rotation is not None and table.rotation.components == 8
    with pytest.raises(TypeError):
        table.quantized["binary"] = table.quantized["int8"]  # type: ignore[index]
    store.search(clustered(2, 32, seed=1), k=3, funnel=[(8, 20), (16, 10)])  # fills prefix and rotated caches
    store.search(clustered(2, 32, seed=1), k=3, dimension=16)
    caches = dict(store.table(32).caches)
    assert caches and all(nbytes > 0 for nbytes in caches.values())
    assert set(caches) <= {f"{name}/{d}" for name in ("prefix_norms", "unit_prefix", "rotation_norms", "rotation_unit_prefix") for d in (8, 16)}
    info = store.memory_info().tables[32]
    assert info.caches == caches and info.rotation == 32 * 32 * 4 + 100 * 8 * 4
    # the parts add up to the charge: rows and norms, indexes, rotation, caches
    assert info.nbytes == 100 * 33 * 4 + sum(info.quantized.values()) + info.rotation + sum(info.caches.values())
    assert info.nbytes == store.memory_info().used_bytes
    store.drop_rotation(32)
    assert store.table(32).rotation is None and not any(name.startswith("rotation_") for name in store.table(32).caches)
    assert store.memory_info().used_bytes == 100 * 33 * 4 + sum(info.quantized.values()) + sum(
        b for name, b in caches.items() if not name.startswith("rotation_")
    )
