"""The selection rules a top-k switches between as ``k`` grows, each checked at its switch point.

A block's first threshold (:func:`~embedtools.search.group_floor`, or the block's own top ``m``),
the sampled floor (``m >= SAMPLED_FLOOR_MIN``), and the redo of a query a floor starved decide only
how many candidates a search folds, never which rows it returns: these tests hold every rule to
the exact answer on integer data, where float32 products are exact and ties are everywhere.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedtools import make_backend
from embedtools.search.kernel import FEW_QUERIES, FEW_QUERY_BLOCK_ROWS
from embedtools.search import (
    BLOCK_ROWS,
    GROUPS_PER_SLOT,
    MIN_BATCH_BLOCK_ROWS,
    SAMPLED_FLOOR_MIN,
    RunningTop,
    group_floor,
    host_candidates,
    host_nth_best,
    rows_per_block,
    run_topk,
)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


def integer_rows(rows: int, dim: int, seed: int) -> F32:
    """Small integers: every product and sum is exact in float32, and scores tie often."""
    return np.random.default_rng(seed).integers(-3, 4, (rows, dim)).astype(np.float32)


def stable_topk(scores: npt.NDArray[np.float64], k: int) -> tuple[F32, I64]:
    """The definition: best first, equal scores by lower index."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1).astype(np.float32), order.astype(np.int64)


@st.composite
def blocks(draw: st.DrawFn) -> tuple[F32, int]:
    rows = draw(st.integers(4, 300))
    queries = draw(st.integers(1, 5))
    m = draw(st.integers(1, rows // GROUPS_PER_SLOT))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    block = rng.integers(-2, 3, (rows, queries)).astype(np.float32)
    order = draw(st.sampled_from(["random", "ascending", "descending"]))
    if order != "random":  # the best rows all in one group, or spread one per group
        block = np.sort(block, axis=0)
        if order == "descending":
            block = block[::-1].copy()
    odd = rng.random((rows, queries))
    block[odd < draw(st.sampled_from([0.0, 0.3]))] = -np.inf  # masked rows
    block[odd > 1.0 - draw(st.sampled_from([0.0, 0.05]))] = np.nan  # an overflowed product
    return block, m


@settings(max_examples=150, deadline=None)
@given(blocks())
def test_group_floor_lets_through_every_row_of_each_querys_top_m(case: tuple[F32, int]) -> None:
    block, m = case
    floor = group_floor(block, m)
    assert floor.shape == (block.shape[1],) and floor.dtype == np.float32 and not np.isnan(floor).any()
    for q in range(block.shape[1]):
        column = block[:, q]
        ranked = np.sort(column[~np.isnan(column)])[::-1]
        if ranked.size >= m:  # the m-th best (counting -inf rows) is at or above the floor
            assert ranked[m - 1] >= floor[q]


def test_group_floor_passes_little_more_than_m_rows_on_unordered_scores() -> None:
    block = np.random.default_rng(0).standard_normal((4096, 50)).astype(np.float32)
    for m in (1, 11, 41, 99, 1024):
        passed = (block >= group_floor(block, m)).sum(axis=0)
        assert (passed >= m).all() and passed.mean() < 1.5 * m


def test_a_first_block_gives_every_row_tied_with_its_m_th_best() -> None:
    """Small blocks (one group per row) as large ones: the rows equal to the m-th best all come,
    so the running top m can keep the lower indices among them."""
    for rows in (4 * 10 - 1, 4 * 10, 500):
        block = integer_rows(rows, 3, seed=rows)  # values in -18..18: ties at the cut
        got_rows, vals, cols = host_candidates(block, 10, np.full(3, -np.inf, np.float32))
        for q in range(3):
            mth = np.sort(block[:, q])[-10]
            want = np.flatnonzero(block[:, q] >= mth)
            np.testing.assert_array_equal(np.sort(cols[got_rows == q]), want)
            np.testing.assert_array_equal(block[cols[got_rows == q], q], vals[got_rows == q])


def test_running_top_m_keeps_the_lower_index_of_equal_scores() -> None:
    """Hamming scores tie by nature and are not settled by a redo: which tied rows a shortlist
    keeps must not depend on how candidates arrived (blocks, folds)."""
    rng = np.random.default_rng(9)
    n_queries, m = 5, 12
    values = rng.integers(0, 4, (n_queries, 600)).astype(np.float32)
    want = np.argsort(-values, axis=1, kind="stable")[:, :m]
    for cut in (50, 200, 600):
        running = RunningTop(n_queries, m)
        for start in range(0, 600, cut):
            block = np.ascontiguousarray(values[:, start : start + cut].T)
            rows, vals, cols = host_candidates(block, m, running.threshold)
            running.merge(rows, vals, cols + start)
        got_vals, got_cols = running.result()
        np.testing.assert_array_equal(got_cols, want)
        np.testing.assert_array_equal(got_vals, np.take_along_axis(values, want, axis=1))


#: ``k`` on both sides of each switch: the group floor's (``GROUPS_PER_SLOT * m`` rows per block),
#: the sampled floor's old one (``m = k + 1 >= 100``; now every ``k``), and the shortlists of the defaults.
SWITCH_KS = (1, 9, 10, 39, 40, 98, 99, 100,
             BLOCK_ROWS // GROUPS_PER_SLOT - 1, BLOCK_ROWS // GROUPS_PER_SLOT)  # fmt: skip


@pytest.mark.parametrize("k", SWITCH_KS)
def test_exact_search_at_every_switch_point_is_the_stable_top_k(k: int) -> None:
    corpus = integer_rows(3 * BLOCK_ROWS + 123, 6, seed=k)
    queries = integer_rows(FEW_QUERIES, 6, seed=k + 1)  # a batch: blocks of BLOCK_ROWS
    assert rows_per_block(FEW_QUERIES, gpu=False) == BLOCK_ROWS
    scores, indices = make_backend("numpy").topk(queries, corpus, k, "dot")
    want_scores, want_indices = stable_topk(queries.astype(np.float64) @ corpus.T.astype(np.float64), k)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(scores, want_scores)


@pytest.mark.parametrize("k", [1, 10, 99, 5000])
def test_exact_search_of_a_few_queries_over_their_longer_blocks_is_the_stable_top_k(k: int) -> None:
    n_queries = 7
    assert BLOCK_ROWS < rows_per_block(n_queries, gpu=False) <= FEW_QUERY_BLOCK_ROWS
    corpus = integer_rows(2 * FEW_QUERY_BLOCK_ROWS + 77, 6, seed=k)
    queries = integer_rows(n_queries, 6, seed=k + 1)
    scores, indices = make_backend("numpy").topk(queries, corpus, k, "dot")
    want_scores, want_indices = stable_topk(queries.astype(np.float64) @ corpus.T.astype(np.float64), k)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(scores, want_scores)


@pytest.mark.parametrize("k", [1, 10, 99])
def test_exact_search_of_a_large_batch_over_its_smaller_blocks_is_the_stable_top_k(k: int) -> None:
    n_queries = 1_500
    assert rows_per_block(n_queries, gpu=False) < BLOCK_ROWS
    corpus = integer_rows(3 * MIN_BATCH_BLOCK_ROWS + 77, 6, seed=k)
    queries = integer_rows(n_queries, 6, seed=k + 1)
    scores, indices = make_backend("numpy").topk(queries, corpus, k, "dot")
    want_scores, want_indices = stable_topk(queries.astype(np.float64) @ corpus.T.astype(np.float64), k)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(scores, want_scores)


def driver(scores: F32, k: int, nth_best: Callable[[F32, int], F32] | None = None) -> tuple[F32, I64]:
    """``run_topk`` over a host ``(rows, queries)`` score matrix, with ``nth_best`` (the sample's
    n-th best, from which the floor is taken) replaced when given."""

    def score_block(qs: slice, rs: slice) -> F32:
        return np.ascontiguousarray(scores[rs, qs])

    def to_host(block: F32) -> F32:
        return np.ascontiguousarray(block.T)

    def unused(chunk: slice, idx: I64) -> F32:
        raise AssertionError("dot needs no distances")

    return run_topk(scores.shape[1], scores.shape[0], 1, k, "dot", 1 << 26, score_block=score_block,
                    candidates=host_candidates, to_host=to_host, l2_distances=unused,
                    nth_best=nth_best)  # fmt: skip


@pytest.mark.parametrize("lie", ["above", "at"])
def test_a_floor_wrong_for_some_queries_still_gives_the_exact_result(lie: str) -> None:
    """A floor above a query's true m-th best hides rows from it: the driver must notice and redo
    that query; one exactly *at* the m-th best (rows equal to it are not candidates) is wrong too."""
    corpus, queries = integer_rows(5 * BLOCK_ROWS, 5, seed=3), integer_rows(6, 5, seed=4)
    exact = (corpus.astype(np.float64) @ queries.T.astype(np.float64)).astype(np.float32)
    k = 120
    true_mth = np.sort(exact, axis=0)[-(k + 1)]
    calls: list[int] = []

    def lying_nth_best(block: F32, n: int) -> F32:
        calls.append(n)
        honest = host_nth_best(np.ascontiguousarray(block.T), n)
        wrong = true_mth + 1 if lie == "above" else true_mth
        even = np.zeros(block.shape[1], dtype=bool)
        even[::2] = True
        return np.where(even, wrong, honest).astype(np.float32)

    scores, indices = driver(exact, k, lying_nth_best)
    assert calls  # the floor was taken, and was wrong for half the queries
    want_scores, want_indices = stable_topk(exact.T.astype(np.float64), k)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(scores, want_scores)


def test_the_sampled_floor_starts_at_its_threshold_and_only_over_several_blocks() -> None:
    exact = integer_rows(3 * BLOCK_ROWS, 4, seed=5)
    calls: list[int] = []

    def spy(block: F32, n: int) -> F32:
        calls.append(n)
        return host_nth_best(np.ascontiguousarray(block.T), n)

    for k in (SAMPLED_FLOOR_MIN - 1, 10, 40):  # every k, short shortlists too
        calls.clear()
        scores, indices = driver(exact, k, spy)
        assert calls
        want_scores, want_indices = stable_topk(exact.T.astype(np.float64), k)
        np.testing.assert_array_equal(indices, want_indices)
        np.testing.assert_array_equal(scores, want_scores)
    calls.clear()
    driver(exact[:BLOCK_ROWS], SAMPLED_FLOOR_MIN, spy)  # one block: its own selection, no sample
    assert not calls


def test_a_decoded_corpus_is_walked_in_cache_sized_blocks_even_for_one_query() -> None:
    """One query's blocks are a million rows (its product is a GEMV); decoded, such a block was the
    whole table in float32 at once: 60,000 x 64 int8 codes took 15 MB for one query."""
    import tracemalloc

    from embedtools import ByteBudget, EmbeddingStore, Sha256Hasher
    from embedtools.search import DECODED_BLOCK_BYTES, ONE_QUERY_BLOCK_ROWS, rows_per_block

    assert rows_per_block(1, gpu=False) == ONE_QUERY_BLOCK_ROWS
    assert rows_per_block(1, gpu=False, decoded_width=384) * 384 * 4 <= DECODED_BLOCK_BYTES
    assert rows_per_block(1_000, gpu=False, decoded_width=1 << 20) == 64  # never fewer rows
    assert rows_per_block(1, gpu=True, decoded_width=384) == rows_per_block(1, gpu=True)
    corpus = np.random.default_rng(0).standard_normal((60_000, 64)).astype(np.float32)
    store = EmbeddingStore(make_backend("numpy"), ByteBudget(1 << 30), Sha256Hasher())
    store.add(corpus)
    store.quantize(64, "int8")
    query = corpus[7:8] + np.float32(0.01)
    store.search(query, k=10, quantized="int8")
    tracemalloc.start()
    try:
        found = store.search(query, k=10, quantized="int8")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert found.indices[0, 0] == 7
    assert peak < 2 * DECODED_BLOCK_BYTES + (1 << 20) < corpus.nbytes // 2


def test_running_top_m_over_indices_beyond_32_bits_keeps_the_best_values() -> None:
    rng = np.random.default_rng(2)
    values = rng.permutation(300).astype(np.float32).reshape(3, 100)  # distinct: no tie to break
    running = RunningTop(3, 7)
    rows = np.repeat(np.arange(3), 100)
    running.merge(rows, values.reshape(-1), np.tile(np.arange(100, dtype=np.int64), 3) + (1 << 33))
    got_vals, got_cols = running.result()
    want = np.argsort(-values, axis=1)[:, :7]
    np.testing.assert_array_equal(got_cols, want + (1 << 33))
    np.testing.assert_array_equal(got_vals, np.take_along_axis(values, want, axis=1))


def test_a_binary_shortlist_keeps_the_lower_rows_of_equal_hamming_distance() -> None:
    """16-bit codes over 9,000 rows: hundreds of rows share each Hamming distance, so the
    shortlist's last places are a choice among ties, and the choice is the lower row."""
    from embedtools import ByteBudget, EmbeddingStore, Sha256Hasher

    rng = np.random.default_rng(4)
    corpus = rng.standard_normal((9_000, 16)).astype(np.float32)
    queries = rng.standard_normal((8, 16)).astype(np.float32)
    store = EmbeddingStore(make_backend("numpy"), ByteBudget(1 << 30), Sha256Hasher())
    store.add(corpus)
    store.quantize(16, "binary")
    k, rescore = 10, 3
    found = store.search(queries, k=k, quantized="binary", rescore=rescore)
    agreement = np.where(queries > 0, 1, -1) @ np.where(corpus > 0, 1, -1).T
    shortlist = np.argsort(-agreement, axis=1, kind="stable")[:, : k * rescore]
    unit = corpus.astype(np.float64) / np.linalg.norm(corpus.astype(np.float64), axis=1, keepdims=True)
    cosine = np.einsum("qsd,qd->qs", unit[shortlist], queries.astype(np.float64))
    want = np.take_along_axis(shortlist, np.argsort(-cosine, axis=1, kind="stable")[:, :k], axis=1)
    np.testing.assert_array_equal(found.indices, want)
