"""The int8 shortlist without a decode on a backend with no integer product: codes widened, the scale
folded into the queries, the offset's per-query term left out where it ranks no row above another
(``search.int8_screen.int8_shortlist``)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

import embedtools as et
from embedtools.protocols import Metric, block_primitives
from embedtools.quantize import QuantizedIndex
from embedtools.search.int8_screen import int8_shortlist

BLOCK_BYTES = 1 << 20


def decoded_ranks(queries: npt.NDArray[np.float32], index: QuantizedIndex[npt.NDArray[np.float32]], rows: npt.NDArray[np.float32],
                  metric: Metric) -> npt.NDArray[np.float64]:  # fmt: skip
    """The decoded ranking in float64: ``x̂ = o + s∘c`` against the queries, by the original rows' norms."""
    assert index.scale is not None and index.offset is not None
    decoded = np.asarray(index.offset, np.float64) + np.asarray(index.scale, np.float64) * np.asarray(index.codes, np.float64)
    q = queries.astype(np.float64)
    norms = np.linalg.norm(rows.astype(np.float64), axis=1)
    ranks: npt.NDArray[np.float64] = q @ decoded.T
    if metric == "cosine":
        ranks = ranks / np.linalg.norm(q, axis=1, keepdims=True) / norms
    elif metric == "l2":
        ranks = ranks - 0.5 * norms**2
    return ranks


def table(unit: bool, seed: int = 0) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, 32))
    rows = centres[rng.integers(0, 20, 6000)] + 0.5 * rng.standard_normal((6000, 32))
    if unit:
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    else:
        rows *= rng.uniform(0.5, 2.0, (6000, 1))
    return rows.astype(np.float32)


@pytest.mark.parametrize(("metric", "unit"), [("cosine", True), ("dot", True), ("dot", False), ("l2", False)])
def test_a_folded_shortlist_ranks_as_the_decoded_codes_do(metric: Metric, unit: bool) -> None:
    """Every row it lists is among the decoded ranking's best (to float32 noise), and it lists
    nearly the same rows: folding changes roundings, and drops only a per-query constant."""
    rows = table(unit)
    backend = block_primitives(et.make_backend("numpy"))
    assert backend is not None
    index = QuantizedIndex.build("int8", rows)
    rng = np.random.default_rng(1)
    queries = (rows[rng.integers(0, rows.shape[0], 16)] + 0.1 * rng.standard_normal((16, 32))).astype(np.float32)
    norms = None if metric == "dot" else np.linalg.norm(rows, axis=1).astype(np.float32)
    found = int8_shortlist(backend, queries, index, norms, 20, metric, None, BLOCK_BYTES)
    assert found is not None and found.shape == (16, 20)
    ranks = decoded_ranks(queries, index, rows, metric)
    kth = -np.sort(-ranks, axis=1)[:, 19]
    listed = np.take_along_axis(ranks, found, axis=1)
    assert np.all(listed >= kth[:, None] - 1e-4 * np.abs(kth[:, None]) - 1e-5)
    best = np.argsort(-ranks, axis=1)[:, :20]
    overlap = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(found.tolist(), best.tolist(), strict=True)])
    assert overlap > 0.95


def test_a_folded_shortlist_leaves_cosine_rows_of_spread_norms_to_the_decode_and_keeps_masked_rows_out() -> None:
    rows = table(unit=False)
    backend = block_primitives(et.make_backend("numpy"))
    assert backend is not None
    index = QuantizedIndex.build("int8", rows)
    queries = rows[:4].copy()
    norms = np.linalg.norm(rows, axis=1).astype(np.float32)
    assert int8_shortlist(backend, queries, index, norms, 10, "cosine", None, BLOCK_BYTES) is None  # o·q would rank rows by 1/|x|
    mask: npt.NDArray[np.bool_] = np.arange(rows.shape[0]) % 3 == 0
    found = int8_shortlist(backend, queries, index, None, 10, "dot", mask, BLOCK_BYTES)
    assert found is not None and bool(np.all(mask[found]))


def test_a_numpy_store_searches_int8_by_the_folded_shortlist_and_rescores_exactly() -> None:
    rows = table(unit=True, seed=2)
    store = et.EmbeddingStore(et.make_backend("numpy"), et.ByteBudget(1 << 30), et.Sha256Hasher())
    store.add(rows)
    store.quantize(32, "int8")
    queries = rows[[3, 500, 4000]] + np.float32(0.01)
    got = store.search(queries, k=5, quantized="int8", rescore=4)
    exact = store.search(queries, k=5)
    np.testing.assert_array_equal(got.indices, exact.indices)  # a shortlist of 20 holds the exact top 5 here
    np.testing.assert_allclose(got.scores, exact.scores, rtol=1e-6)
