"""Plain exact search is exact: float32 near-ties are settled in float64 (embedtools.search.settle),
so its ids equal the float64 reference (ties to the lower row) and a certified search's, every query."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedtools import ByteBudget, EmbeddingStore, Metric, NumpyBackend, Sha256Hasher
from embedtools.search.settle import LIST_MARGIN_MIN, listed_rows, settles
from tests.helpers import GatherCounting, reference_scores
from tests.test_certified import BACKENDS, exact_ids, store_on


def crowded(seed: int, n: int, dim: int, spread: float) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Rows a few float32 ulps of score apart around each query (``spread`` ~ 1e-7 relative), where
    a float32 GEMM's rounding alone decides the order, with exact duplicates among them."""
    rng = np.random.default_rng(seed)
    queries = rng.standard_normal((3, dim)).astype(np.float32)
    base = queries[rng.integers(0, 3, n)].astype(np.float64)
    rows = base + spread * rng.standard_normal((n, dim)) * np.linalg.norm(base, axis=1, keepdims=True)
    rows[rng.integers(0, n, n // 8)] = rows[rng.integers(0, n, n // 8)]
    return rows.astype(np.float32), (queries + 1e-3 * rng.standard_normal(queries.shape)).astype(np.float32)


def assert_float64_order(found: npt.NDArray[np.int64], queries: npt.NDArray[np.float32], rows: npt.NDArray[np.float32],
                         metric: Metric, k: int, mask: npt.NDArray[np.bool_] | None = None) -> None:  # fmt: skip
    """``found`` is the float64 reference's top ``k`` (ties to the lower row) but where the two
    rows at a place score within float64 rounding of each other: rows ``1e-7`` apart have cosines
    ``1e-16`` apart, and the reference's formula (unit rows, then a product) and the library's
    (a product, then the norms) may round such a pair either way."""
    want = exact_ids(queries, rows, metric, k, mask)
    assert found.shape == want.shape
    which, place = np.nonzero(found != want)
    if which.size:
        ref = reference_scores(queries, rows, metric)
        scale = 1.0 if metric == "cosine" else np.linalg.norm(queries[which].astype(np.float64), axis=1) * float(np.linalg.norm(rows.astype(np.float64), axis=1).max())
        tolerance = 16 * (rows.shape[1] + 4) * 2.0**-53 * scale
        gaps = np.abs(ref[which, found[which, place]] - ref[which, want[which, place]])
        assert np.all(gaps <= tolerance), (which, place, gaps)


@pytest.mark.parametrize("name", BACKENDS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), spread=st.sampled_from([3e-8, 1e-7, 1e-6]), k=st.integers(1, 40),
       metric=st.sampled_from(["cosine", "dot"]))  # fmt: skip
def test_plain_search_ids_are_the_float64_order_on_crowded_scores(name: str, seed: int, spread: float, k: int, metric: Metric) -> None:
    rows, queries = crowded(seed, 300, 48, spread)
    store = store_on(name, rows)
    plain = store.search(queries, k=k, metric=metric)
    assert_float64_order(plain.indices, queries, rows, metric, k)
    np.testing.assert_array_equal(plain.indices, store.search(queries, k=k, metric=metric, rescore="certified").indices)
    assert np.all(np.diff(plain.scores, axis=1) <= 0)


def test_a_filtered_search_settles_among_the_rows_it_keeps() -> None:
    rows, queries = crowded(5, 400, 32, 1e-7)
    store = store_on("numpy", rows, labels=["a" if i % 4 else "b" for i in range(400)])
    from embedtools.filters import Label

    for where in (Label("a"), Label("b")):  # a broad filter (a mask in the kernel) and a selective one (gathered)
        keep = np.array([(i % 4 != 0) == (where == Label("a")) for i in range(400)])
        found = store.search(queries, k=25, where=where)
        assert_float64_order(found.indices, queries, rows, "cosine", 25, keep)


def test_the_list_has_a_margin_beyond_k() -> None:
    assert listed_rows(10, 10_000) == 10 + LIST_MARGIN_MIN
    assert listed_rows(3_200, 100_000) == 3_300
    assert listed_rows(10, 12) == 12


def test_settling_stops_where_its_rescoring_would_rival_the_scan() -> None:
    assert settles(10, 36_500) and settles(40, 300)
    assert not settles(1_000, 200_000) and settles(150, 200_000)


def test_only_the_rows_of_a_near_chain_reaching_the_top_k_are_rescored() -> None:
    """Scores 1e-3 apart (far beyond the float32 bound) but for one duplicated row among the top
    five and one beyond the list: settling gathers that top pair, not the query's whole list."""
    cosines = 0.9 - 1e-3 * np.arange(200)
    rows = np.zeros((200, 16))
    rows[:, 0], rows[:, 1] = cosines, np.sqrt(1 - cosines**2)
    rows[150], rows[190] = rows[2], rows[100]  # a tie inside the top 5, and one far below it
    backend = GatherCounting()
    store = EmbeddingStore(backend, ByteBudget(1 << 30), Sha256Hasher())
    store.add(rows.astype(np.float32))
    query = np.eye(1, 16, dtype=np.float32)
    found = store.search(query, k=5)
    assert found.indices.tolist() == [[0, 1, 2, 150, 3]]
    assert max(backend.gathered) == 2 and backend.gathered.count(2) == 1  # the pair; the whole list is 21 rows
