"""Filtered search: exact top-k among the matching rows, on every backend, by both strategies."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import embedtools as et
import embedtools.search.searcher as searcher_module
from embedtools import ByteBudget, EmbeddingStore, Ids, InvalidArgumentError, Label, Meta, Metric, Sha256Hasher
from tests.conformance.backends import IDS, PAIRS
from tests.helpers import assert_exact_topk, clustered
from tests.test_store import snapshot

N = 600


def make_store(pair: tuple[str, str] = ("numpy", "cpu")) -> tuple[EmbeddingStore, np.ndarray]:
    store = EmbeddingStore(et.make_backend(*pair), ByteBudget(1 << 30), Sha256Hasher(), search_block_bytes=20_000)
    corpus = clustered(N, 24, seed=11)
    metadata: list[dict[str, Any]] = [{"year": 2000 + i % 25, "lang": "en" if i % 3 else "de", "flag": i % 2 == 0} for i in range(N)]
    for i in range(0, N, 7):
        del metadata[i]["year"]  # some rows lack the key
    store.add(corpus, ids=[f"r{i}" for i in range(N)], labels=["news" if i % 10 == 0 else "blog" for i in range(N)], metadata=metadata)
    return store, corpus


def expected_mask(where: str) -> np.ndarray:
    i = np.arange(N)
    has_year = i % 7 != 0
    year = 2000 + i % 25
    masks: dict[str, np.ndarray] = {
        "news": i % 10 == 0,
        "not news": i % 10 != 0,
        "years": has_year & (year >= 2010) & (year <= 2012),
        "en or flag": (i % 3 != 0) | (i % 2 == 0),
        "ids": np.isin(i, [5, 17, 400]),
        "most": ~np.isin(i, [5, 17, 400]),
    }
    return masks[where]


FILTERS = {
    "news": Label("news"),
    "not news": ~Label("news"),
    "years": Meta("year").between(2010, 2012),
    "en or flag": Meta("lang").eq("en") | Meta("flag").eq(True),
    "ids": Ids("r5", "r17", "r400", "not-there"),
    "most": ~Ids("r5", "r17", "r400"),
}


@pytest.mark.parametrize("pair", PAIRS, ids=IDS)
@pytest.mark.parametrize("name", list(FILTERS))
@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_filtered_search_is_exact_among_matches(pair: tuple[str, str], name: str, metric: Metric) -> None:
    store, corpus = make_store(pair)
    mask = expected_mask(name)
    queries = clustered(7, 24, seed=12)
    result = store.search(queries, k=8, metric=metric, where=FILTERS[name])
    rows = np.flatnonzero(mask)
    assert set(result.indices.ravel().tolist()) <= set(rows.tolist())
    local = np.searchsorted(rows, result.indices)
    assert_exact_topk(queries, corpus[rows], metric, 8, local, result.scores)
    assert result.ids == [[f"r{i}" for i in row] for row in result.indices.tolist()]


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_both_strategies_agree(fraction: float, monkeypatch: pytest.MonkeyPatch) -> None:
    store, _ = make_store()
    queries = clustered(5, 24, seed=3)
    baseline = {name: store.search(queries, k=6, where=f).indices for name, f in FILTERS.items()}
    monkeypatch.setattr(searcher_module, "GATHER_FRACTION", fraction)  # 0: always mask; 1: always gather
    for name, f in FILTERS.items():
        np.testing.assert_array_equal(store.search(queries, k=6, where=f).indices, baseline[name])


def test_empty_matches_give_an_empty_result_and_few_matches_fewer_columns() -> None:
    store, _ = make_store()
    q = clustered(2, 24, seed=1)
    empty = store.search(q, k=5, where=Label("none-such"))
    assert empty.indices.shape == (2, 0) and empty.ids == [[], []]
    few = store.search(q, k=5, where=Ids("r1", "r2"))
    assert few.indices.shape == (2, 2) and {i for row in few.ids for i in row} == {"r1", "r2"}


def test_filters_combine_with_funnel_and_prefix() -> None:
    store, corpus = make_store()
    q = clustered(4, 24, seed=5)
    rows = np.flatnonzero(expected_mask("not news"))
    exact = store.search(q, k=5, where=~Label("news"))
    funnel = store.search(q, k=5, where=~Label("news"), funnel=[(8, N)])
    np.testing.assert_array_equal(funnel.indices, exact.indices)
    prefix = store.search(q, k=5, dimension=12, where=~Label("news"))
    assert_exact_topk(q[:, :12], corpus[rows][:, :12], "cosine", 5, np.searchsorted(rows, prefix.indices), prefix.scores)


def test_meta_equality_follows_json_types() -> None:
    store = EmbeddingStore(et.make_backend("numpy"), ByteBudget(1 << 20), Sha256Hasher())
    store.add(np.eye(4, dtype=np.float32), metadata=[{"v": 1}, {"v": 1.0}, {"v": True}, {"v": "1"}])
    q = np.ones(4, np.float32)
    assert sorted(store.search(q, k=4, where=Meta("v").eq(1)).indices[0].tolist()) == [0, 1]
    assert store.search(q, k=4, where=Meta("v").eq(True)).indices[0].tolist() == [2]
    assert store.search(q, k=4, where=Meta("v").isin("1", None)).indices[0].tolist() == [3]
    assert sorted(store.search(q, k=4, where=Meta("v").between(0.5, 1)).indices[0].tolist()) == [0, 1]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Label(), "one or more"),
        (lambda: Label(1.5), "str or int"),  # type: ignore[arg-type]
        (lambda: Ids(), "one or more"),
        (lambda: Meta(3), "str"),  # type: ignore[arg-type]
        (lambda: Meta("a").between(5, 1), "empty range"),
        (lambda: Meta("a").between(), "at least one"),
        (lambda: Meta("a").between(float("nan"), 1), "finite"),
        (lambda: Meta("a").isin(), "one or more"),
        (lambda: Meta("a").isin([1]), "JSON scalars"),
        (lambda: Label("a") & "b", "combine"),  # type: ignore[operator]
    ],
)
def test_bad_filters_are_refused(build: Any, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        build()


@pytest.mark.parametrize(
    ("where", "kwargs", "message"),
    [
        (Meta("colour").eq("red"), {}, "no row has metadata key 'colour'"),
        ("lang == en", {}, "where takes a filter"),
        (Label("news"), {"quantized": "binary"}, "no binary index"),
    ],
)
def test_bad_filtered_searches_change_nothing(where: Any, kwargs: dict[str, Any], message: str) -> None:
    store, _ = make_store()
    store.quantize(24, "int8")
    before = snapshot(store)
    with pytest.raises(InvalidArgumentError, match=message):
        store.search(clustered(1, 24, seed=2), k=3, where=where, **kwargs)
    assert snapshot(store) == before


def test_removed_rows_never_match_and_filters_see_updates() -> None:
    store, _ = make_store()
    store.remove(["r10", "r20"])
    store.update(["r30"], labels=["blog"], dimension=24)
    found = {i for row in store.search(clustered(3, 24, seed=8), k=N, where=Label("news")).ids for i in row}
    assert found == {f"r{i}" for i in range(0, N, 10)} - {"r10", "r20", "r30"}


@pytest.mark.parametrize("pair", PAIRS, ids=IDS)
def test_backend_topk_row_mask(pair: tuple[str, str]) -> None:
    backend = et.make_backend(*pair)
    corpus = clustered(300, 8, seed=1)
    mask = np.zeros(300, dtype=bool)
    mask[[3, 50, 51, 299]] = True
    scores, indices = backend.topk(backend.from_numpy(corpus[:2]), backend.from_numpy(corpus), 10, "cosine", row_mask=mask, max_block_bytes=4000)
    assert indices.shape == (2, 4) and set(indices.ravel().tolist()) == {3, 50, 51, 299}
    assert np.isfinite(scores).all()
    with pytest.raises(et.DimensionError):
        backend.topk(backend.from_numpy(corpus[:2]), backend.from_numpy(corpus), 3, "dot", row_mask=mask[:10])
