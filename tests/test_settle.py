"""Plain exact search is exact: float32 near-ties are settled in float64 (embedtools.search.settle),
so its ids equal the float64 reference (ties to the lower row) and a certified search's, every query."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedtools import Metric
from embedtools.search.settle import LIST_MARGIN_MIN, listed_rows, settles
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


@pytest.mark.parametrize("name", BACKENDS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), spread=st.sampled_from([3e-8, 1e-7, 1e-6]), k=st.integers(1, 40),
       metric=st.sampled_from(["cosine", "dot"]))  # fmt: skip
def test_plain_search_ids_are_the_float64_order_on_crowded_scores(name: str, seed: int, spread: float, k: int, metric: Metric) -> None:
    rows, queries = crowded(seed, 300, 48, spread)
    store = store_on(name, rows)
    plain = store.search(queries, k=k, metric=metric)
    np.testing.assert_array_equal(plain.indices, exact_ids(queries, rows, metric, k))
    np.testing.assert_array_equal(plain.indices, store.search(queries, k=k, metric=metric, rescore="certified").indices)
    assert np.all(np.diff(plain.scores, axis=1) <= 0)


def test_a_filtered_search_settles_among_the_rows_it_keeps() -> None:
    rows, queries = crowded(5, 400, 32, 1e-7)
    store = store_on("numpy", rows, labels=["a" if i % 4 else "b" for i in range(400)])
    from embedtools.filters import Label

    for where in (Label("a"), Label("b")):  # a broad filter (a mask in the kernel) and a selective one (gathered)
        keep = np.array([(i % 4 != 0) == (where == Label("a")) for i in range(400)])
        found = store.search(queries, k=25, where=where)
        np.testing.assert_array_equal(found.indices, exact_ids(queries, rows, "cosine", 25, keep))


def test_the_list_has_a_margin_beyond_k() -> None:
    assert listed_rows(10, 10_000) == 10 + LIST_MARGIN_MIN
    assert listed_rows(3_200, 100_000) == 3_300
    assert listed_rows(10, 12) == 12


def test_settling_stops_where_its_rescoring_would_rival_the_scan() -> None:
    assert settles(10, 36_500) and settles(40, 300)
    assert not settles(1_000, 200_000) and settles(150, 200_000)
