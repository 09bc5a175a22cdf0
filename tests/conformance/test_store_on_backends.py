"""The store's contract on every usable backend: same ids as NumPy (ties aside), scores within a
stated tolerance, the same errors for the same bad input, and files that move between backends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import embedtools as et
from embedtools import ByteBudget, EmbeddingStore, Metric, Sha256Hasher
from tests.conformance.backends import IDS, PAIRS
from tests.helpers import assert_exact_topk, clustered

#: float32 scores may differ between libraries by summation order; this is the tolerance they meet,
#: relative to the largest score magnitude.
SCORE_TOLERANCE = 1e-4


@pytest.fixture(params=PAIRS, ids=IDS)
def pair(request: pytest.FixtureRequest) -> tuple[str, str]:
    name, device = request.param
    return name, device


def make_store(pair: tuple[str, str], limit_bytes: int = 1 << 30, block: int = 1 << 27) -> EmbeddingStore:
    return EmbeddingStore(et.make_backend(*pair), ByteBudget(limit_bytes), Sha256Hasher(), search_block_bytes=block)


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_search_agrees_with_the_reference_and_with_numpy(pair: tuple[str, str], metric: Metric) -> None:
    corpus = clustered(800, 48, seed=21)
    corpus[5] = 0.0  # a zero row: finite everywhere (the seed's backends disagreed here)
    queries = np.vstack([clustered(20, 48, seed=22), np.zeros((1, 48), np.float32)])
    store = make_store(pair, block=50_000)
    reference = make_store(("numpy", "cpu"), block=50_000)
    for s in (store, reference):
        s.add(corpus)
    for dim in (48, 16):
        got = store.search(queries, k=7, dimension=dim, metric=metric)
        ref = reference.search(queries, k=7, dimension=dim, metric=metric)
        assert np.isfinite(got.scores).all()
        assert_exact_topk(queries[:, :dim], corpus[:, :dim], metric, 7, got.indices, got.scores, tol=SCORE_TOLERANCE)
        scale = max(float(np.abs(ref.scores).max()), 1.0)
        np.testing.assert_allclose(got.scores, ref.scores, atol=SCORE_TOLERANCE * scale, rtol=0)
        assert got.indices.shape == ref.indices.shape == (21, 7)


def test_single_query_shape_and_ties(pair: tuple[str, str]) -> None:
    store = make_store(pair)
    row = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    store.add(np.tile(row, (9, 1)))
    result = store.search(row, k=3)
    assert result.indices.tolist() == [[0, 1, 2]] and result.scores.shape == (1, 3)


BAD_SEARCHES: list[tuple[dict[str, Any], type[Exception]]] = [
    ({"queries": np.ones((1, 8), np.float32), "k": 0}, et.InvalidArgumentError),
    ({"queries": np.ones((1, 8), np.float32), "metric": "hamming"}, et.InvalidArgumentError),
    ({"queries": np.ones((1, 5), np.float32)}, et.DimensionError),
    ({"queries": np.array([[np.nan] * 8])}, et.InvalidEmbeddingError),
]


@pytest.mark.parametrize(("kwargs", "error"), BAD_SEARCHES)
def test_same_errors_for_the_same_bad_search(pair: tuple[str, str], kwargs: dict[str, Any], error: type[Exception]) -> None:
    store = make_store(pair)
    store.add(clustered(10, 8))
    with pytest.raises(error):
        store.search(**kwargs)


@pytest.mark.parametrize(
    ("vectors", "error"),
    [(np.array([[np.inf, 0.0]]), et.InvalidEmbeddingError), (np.zeros((0, 2)), et.InvalidEmbeddingError)],
)
def test_same_errors_for_the_same_bad_add(pair: tuple[str, str], vectors: Any, error: type[Exception]) -> None:
    store = make_store(pair)
    with pytest.raises(error):
        store.add(vectors)
    assert store.dimensions == () and store.memory_info().used_bytes == 0


def test_memory_is_charged_as_device_bytes(pair: tuple[str, str]) -> None:
    store = make_store(pair, limit_bytes=50 * 17 * 4)
    store.add(clustered(50, 16))
    assert store.memory_info().used_bytes == 50 * 17 * 4 == et.make_backend(*pair).nbytes(store.table(16).vectors) + 50 * 4
    with pytest.raises(et.MemoryLimitError):
        store.add(clustered(1, 16, seed=1))


@pytest.mark.parametrize("target", PAIRS, ids=IDS)
def test_a_file_saved_on_one_backend_loads_on_another(pair: tuple[str, str], target: tuple[str, str], tmp_path: Path) -> None:
    source = make_store(pair)
    corpus = clustered(200, 12, seed=3)
    source.add(corpus, ids=[f"r{i}" for i in range(200)], labels=["a", "b"] * 100)
    source.save(tmp_path / "s")
    loaded = make_store(target).load(tmp_path / "s")
    assert loaded.backend.name == target[0]
    np.testing.assert_array_equal(loaded.table(12).to_numpy(), corpus)
    queries = clustered(5, 12, seed=4)
    a, b = source.search(queries, k=5), loaded.search(queries, k=5)
    assert a.ids == b.ids
    np.testing.assert_allclose(a.scores, b.scores, atol=SCORE_TOLERANCE, rtol=0)


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_funnel_with_a_full_shortlist_is_exact_search(pair: tuple[str, str], metric: Metric) -> None:
    corpus = clustered(300, 32, seed=31)
    queries = clustered(9, 32, seed=32)
    store = make_store(pair)
    store.add(corpus)
    exact = store.search(queries, k=6, metric=metric)
    funnel = store.search(queries, k=6, metric=metric, funnel=[(8, 300), (16, 300)])
    np.testing.assert_array_equal(funnel.indices, exact.indices)
    np.testing.assert_allclose(funnel.scores, exact.scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_funnel_scores_are_full_dimension_scores_and_recall_is_high_on_matryoshka_data(pair: tuple[str, str], metric: Metric) -> None:
    from tests.helpers import matryoshka_like, reference_scores

    corpus = matryoshka_like(2000, 64, seed=41)
    queries = matryoshka_like(30, 64, seed=42)
    store = make_store(pair)
    store.add(corpus)
    result = store.search(queries, k=10, metric=metric, funnel=[(16, 100)])
    ref = reference_scores(queries, corpus, metric)
    got = np.take_along_axis(ref, result.indices, axis=1)
    shown = -result.scores if metric == "l2" else result.scores
    np.testing.assert_allclose(shown, got, atol=SCORE_TOLERANCE * max(float(np.abs(ref).max()), 1.0), rtol=0)
    truth = np.argsort(-ref, axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(result.indices.tolist(), truth.tolist(), strict=True)])
    assert recall >= 0.9
