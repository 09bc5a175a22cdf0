"""The host-side pieces of the top-k driver that every backend shares (``embedtools.search``)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from embedtools.search import SAMPLE_STRIDE, best_first, group_floor, host_candidates, host_nth_best, sampled_floor, unscaled_bound
from embedtools.search.select import finished, host_float32, shifted_bound
from tests.helpers import clustered, reference_scores


def lexsorted(values: npt.NDArray[np.float32], indices: npt.NDArray[np.int64], ascending: bool) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The definition: by value (best first), equal values by lower index; -0.0 equals 0.0."""
    order = np.lexsort((indices, values if ascending else -values), axis=1)
    return np.take_along_axis(values, order, axis=1), np.take_along_axis(indices, order, axis=1)


values_2d = hnp.arrays(
    np.float32,
    st.tuples(st.integers(1, 4), st.integers(1, 40)),
    elements=st.sampled_from([0.0, -0.0, 1.5, -1.5, 2.0, -3.25, np.inf, -np.inf, 1e-30, -1e-30, 3.4e38]) | st.floats(-1e6, 1e6, width=32),
)


@given(values_2d, st.booleans(), st.integers(0, 2**32 - 10**4))
def test_best_first_equals_the_lexsort_definition(values: npt.NDArray[np.float32], ascending: bool, base: int) -> None:
    rng = np.random.default_rng(values.size)
    indices = (base + np.stack([rng.permutation(values.shape[1]) for _ in range(values.shape[0])])).astype(np.int64)
    got_vals, got_idx = best_first(values, indices, ascending=ascending)
    want_vals, want_idx = lexsorted(values, indices, ascending)
    np.testing.assert_array_equal(got_idx, want_idx)
    np.testing.assert_array_equal(got_vals, want_vals)
    assert got_vals.dtype == np.float32 and got_idx.dtype == np.int64


def test_best_first_with_indices_beyond_32_bits_or_negative() -> None:
    values = np.array([[1.0, 2.0, 2.0, -1.0]], np.float32)
    for indices in ([[2**40, 7, 2**33, 0]], [[-1, 7, 3, 0]]):
        idx = np.array(indices, np.int64)
        got_vals, got_idx = best_first(values, idx)
        want_vals, want_idx = lexsorted(values, idx, False)
        np.testing.assert_array_equal(got_idx, want_idx)
        np.testing.assert_array_equal(got_vals, want_vals)


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_sampled_floor_stays_below_every_true_threshold_on_unordered_rows(metric: str) -> None:
    corpus = clustered(40_000, 16, clusters=30, seed=2)
    queries = clustered(40, 16, clusters=30, seed=3)
    scores = reference_scores(queries, corpus, metric).astype(np.float32)  # type: ignore[arg-type]
    for m in (101, 1001):
        floor = sampled_floor(lambda rows, n: host_nth_best(scores[:, rows], n), len(corpus), m, None, 1 << 20)
        assert floor is not None
        true_mth = np.sort(scores, axis=1)[:, -m]
        assert (floor <= true_mth).all()
        # and it is worth having: a few times m rows score above it, of 400 or 40 times m
        above = (scores > floor[:, None]).sum(axis=1)
        assert above.mean() < 5 * m and (above < len(corpus) // 8).all()


def test_sampled_floor_counts_only_unmasked_rows_and_declines_small_samples() -> None:
    scores = np.arange(20_000, dtype=np.float32)[None, :]
    keep = np.zeros(20_000, bool)
    keep[:2_000] = True  # a tenth of the rows can rank: m is a tenth as rare among them
    masked = np.where(keep, scores, -np.inf).astype(np.float32)
    floor = sampled_floor(lambda rows, n: host_nth_best(masked[:, rows], n), 20_000, 100, keep, 1 << 20)
    assert floor is not None and np.isfinite(floor).all() and floor[0] <= 2_000 - 100
    assert sampled_floor(lambda rows, n: host_nth_best(scores[:, rows], n), 20 * SAMPLE_STRIDE, 100, None, 1 << 20) is None
    # a sample block larger than the caller allows takes a wider stride, not more memory
    seen: list[int] = []

    def spy(rows: slice, n: int) -> npt.NDArray[np.float32]:
        seen.append(len(range(20_000)[rows]))
        return host_nth_best(scores[:, rows], n)

    sampled_floor(spy, 20_000, 101, None, 300)
    assert seen and seen[0] <= 300


@pytest.mark.parametrize(("per_query", "path"), [(20, "_fold_dense"), (2_000, "_fold_each")])
def test_running_top_m_equals_brute_force(per_query: int, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from embedtools.search import RunningTop

    calls: list[str] = []
    for name in ("_fold_dense", "_fold_each"):
        original = getattr(RunningTop, name)

        def spy(self: RunningTop, *args: object, _name: str = name, _original: object = original) -> object:
            calls.append(_name)
            return _original(self, *args)  # type: ignore[operator]

        monkeypatch.setattr(RunningTop, name, spy)
    rng = np.random.default_rng(per_query)
    n_queries, m = 6, 15
    running = RunningTop(n_queries, m)
    every: list[list[tuple[float, int]]] = [[] for _ in range(n_queries)]
    column = 0
    for _ in range(3):  # three merges, so a fold meets a running top m that is already full
        rows = np.repeat(np.arange(n_queries), per_query)
        rng.shuffle(rows)
        vals = rng.standard_normal(rows.size).astype(np.float32)
        cols = np.arange(column, column + rows.size, dtype=np.int64)
        column += rows.size
        running.merge(rows, vals, cols)
        running.fold()
        for r, v, c in zip(rows.tolist(), vals.tolist(), cols.tolist(), strict=True):
            every[r].append((v, c))
    assert set(calls) == {path}
    got_vals, got_cols = running.result()
    for q in range(n_queries):
        best = sorted(every[q], key=lambda vc: (-vc[0], vc[1]))[:m]
        assert got_cols[q].tolist() == [c for _, c in best]
        np.testing.assert_array_equal(got_vals[q], np.array([v for v, _ in best], np.float32))


def test_a_large_k_over_many_queries_stays_within_a_small_multiple_of_the_block_bound() -> None:
    """Each query's shortlist (k + 1 candidates, the buffer awaiting a fold) counts against
    ``max_block_bytes`` with its scores: 2,000 queries x k=500 once held ~4x the bound."""
    import tracemalloc

    from embedtools import make_backend

    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((20_000, 16)).astype(np.float32)
    queries = rng.standard_normal((2_000, 16)).astype(np.float32)
    bound = 4 << 20
    tracemalloc.start()
    try:
        scores, indices = make_backend("numpy").topk(queries, corpus, 500, "cosine", max_block_bytes=bound)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak - scores.nbytes - indices.nbytes < 2 * bound
    assert indices.shape == (2_000, 500)


def candidate_set(found: tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64]]) -> dict[tuple[int, int], int]:
    """Each candidate's float32 bits by (query, row): NaN equals NaN, ``-0.0`` differs from ``0.0``."""
    rows, vals, cols = found
    bits = np.asarray(vals, np.float32).view(np.int32)
    return {(int(r), int(c)): int(b) for r, b, c in zip(rows.tolist(), bits.tolist(), cols.tolist(), strict=True)}


@st.composite
def unscaled_blocks(draw: st.DrawFn) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Raw products, positive row scales and finite thresholds, with products put a few ulps either
    side of ``threshold / scale``: where a bound one rounding too tight would lose a row."""
    n, queries = draw(st.integers(2, 12)), draw(st.integers(1, 5))
    spread = draw(st.sampled_from([1.0, 1.000001, 1.01, 3.0]))
    scale = np.float32(draw(st.floats(0.25, 4.0, width=32))) * np.linspace(1.0, spread, n, dtype=np.float32)
    threshold = np.array(draw(st.lists(st.sampled_from([0.0, 1e-38, 2.0**-110, -1e-38]) | st.floats(-2.0, 2.0, width=32), min_size=queries, max_size=queries)), np.float32)
    ulps = np.array(draw(st.lists(st.integers(-4, 4), min_size=n * queries, max_size=n * queries)), np.int32).reshape(n, queries)
    edge = (threshold[None, :] / scale[:, None]).astype(np.float32)
    raw = (edge.view(np.int32) + np.where(edge >= 0, ulps, -ulps)).view(np.float32)
    noise = np.array(draw(st.lists(st.floats(-3.0, 3.0, width=32), min_size=n * queries, max_size=n * queries)), np.float32).reshape(n, queries)
    far = np.array(draw(st.lists(st.booleans(), min_size=n * queries, max_size=n * queries))).reshape(n, queries)
    return np.where(far, noise, raw).astype(np.float32), scale.astype(np.float32), threshold


@given(unscaled_blocks(), st.integers(1, 3))
@example(  # a subnormal quotient: -1e-45 / 2 rounds to -0.0, which -0.0 does not exceed
    (np.array([[-0.0], [-0.0]], np.float32), np.array([2.0, 2.0], np.float32), np.array([-1e-45], np.float32)), 1
)
def test_host_candidates_with_a_row_scale_are_exactly_the_scaled_blocks(drawn: tuple[npt.NDArray[np.float32], ...], m: int) -> None:
    """Comparing unscaled products against ``unscaled_bound`` and scaling what passes must give the
    candidates (and the very float32 values) that scaling the whole block gave."""
    raw, scale, threshold = drawn
    want = candidate_set(host_candidates(raw * scale[:, None], m, threshold))
    got = candidate_set(host_candidates(raw.copy(), m, threshold, scale))
    assert got == want


@st.composite
def shifted_blocks(draw: st.DrawFn) -> tuple[npt.NDArray[np.float32], ...]:
    """Products, row scales (``None``-able: all ones) and row shifts as a certified screen's bounds
    and a mask make them (small negatives a few float32 steps apart, some ``+inf``), with products put
    a few ulps either side of where ``fl(fl(p·s) - h)`` crosses the threshold."""
    raw, scale, threshold = draw(unscaled_blocks())
    n, queries = raw.shape
    base = np.float32(draw(st.sampled_from([-0.0, -2.0**-9, -0.004, -1e-30])))  # every one negative (-0.0 too)
    steps = np.array(draw(st.lists(st.integers(0, 8), min_size=n, max_size=n)), np.int32)
    shift = (np.full(n, base, np.float32).view(np.int32) + steps).view(np.float32)  # a few steps further from 0
    shift[np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))] = np.inf  # masked rows
    ulps = np.array(draw(st.lists(st.integers(-3, 3), min_size=n * queries, max_size=n * queries)), np.int32).reshape(n, queries)
    with np.errstate(over="ignore", invalid="ignore"):
        edge = ((threshold[None, :] + np.where(np.isfinite(shift), shift, 0)[:, None]) / scale[:, None]).astype(np.float32)
    near = (edge.view(np.int32) + np.where(edge >= 0, ulps, -ulps)).view(np.float32)
    raw = np.where(np.array(draw(st.lists(st.booleans(), min_size=n * queries, max_size=n * queries))).reshape(n, queries), near, raw)
    return raw.astype(np.float32), scale, shift, threshold


@given(shifted_blocks(), st.integers(1, 3), st.booleans(), st.booleans())
def test_host_candidates_with_a_row_shift_are_exactly_the_finished_blocks(
    drawn: tuple[npt.NDArray[np.float32], ...], m: int, scaled: bool, filling: bool
) -> None:
    """Leaving a block's row shift (and scale) to the selection must give the candidates, and the
    very float32 values, that finishing the whole block first gave: scaled, then shifted."""
    raw, scale, shift, threshold = drawn
    if filling:
        threshold = threshold.copy()
        threshold[0] = -np.inf
    row_scale = scale if scaled else None
    with np.errstate(invalid="ignore"):
        whole = finished(raw, row_scale, shift)
    want = candidate_set(host_candidates(whole, m, threshold))
    with np.errstate(invalid="ignore"):
        got = candidate_set(host_candidates(raw.copy(), m, threshold, row_scale, shift))
    assert got == want


def bfloat16_words(values: npt.NDArray[np.float32]) -> npt.NDArray[np.int16]:
    """The words of float32 values cut to bfloat16 (their high halves), as a host block holds them."""
    return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.int16)


@given(shifted_blocks(), st.integers(1, 3), st.booleans(), st.booleans(), st.sampled_from(["positive", "any", "filling"]), st.booleans())
def test_host_candidates_of_bfloat16_words_are_the_widened_blocks(
    drawn: tuple[npt.NDArray[np.float32], ...], m: int, scaled: bool, shifted: bool, thresholds: str, query_major: bool
) -> None:
    """A bfloat16 block's words, compared as 16-bit integers against each bound's word, must give
    the candidates and float32 values of the same block widened first, whatever the thresholds'
    signs (a non-positive one widens the block), NaN and infinite scores included."""
    raw, scale, shift, threshold = drawn
    if thresholds == "positive":  # where every query's bound is positive: the words' own compare
        threshold = np.abs(threshold) + np.float32(2.0**-20)
    elif thresholds == "filling":  # a query with fewer than m candidates yet: the whole block, widened
        threshold = threshold.copy()
        threshold[0] = -np.inf
    cut = bfloat16_words(raw)
    cut.reshape(-1)[:: 7] = np.int16(0x7FC0)  # a NaN score now and then
    cut.reshape(-1)[3:: 11] = np.int16(0x7F80)  # and +inf
    words = np.asfortranarray(cut) if query_major else cut
    widened = host_float32(words)
    assert widened.dtype == np.float32 and np.array_equal(widened.view(np.uint32) >> 16, cut.view(np.uint16).astype(np.uint32))
    row_scale, row_shift = (scale if scaled else None), (shift if shifted else None)
    with np.errstate(invalid="ignore"):
        want = candidate_set(host_candidates(widened, m, threshold, row_scale, row_shift))
        got = candidate_set(host_candidates(words, m, threshold, row_scale, row_shift))
    assert got == want


def test_shifted_bound_is_below_every_sum_and_keeps_what_passes_nothing() -> None:
    threshold = np.array([0.5, -0.25, np.inf, np.nan, 1e-30], np.float32)
    shift = np.array([-0.004, 0.1, np.inf], np.float32)
    bound = shifted_bound(threshold, shift)
    exact = threshold.astype(np.float64) + np.float64(np.float32(-0.004))
    assert np.all(bound[[0, 1, 4]].astype(np.float64) <= exact[[0, 1, 4]])
    assert np.all(bound[[0, 1, 4]].astype(np.float64) > exact[[0, 1, 4]] - 1e-6)  # one step below, not a loose bound
    assert bound[2] == np.inf and np.isnan(bound[3])
    every_row_masked = shifted_bound(np.array([0.5, -3.0], np.float32), np.full(4, np.inf, np.float32))
    assert np.all(every_row_masked == np.inf)  # nothing passes


@given(unscaled_blocks(), st.integers(1, 3), st.booleans(), st.booleans())
def test_host_candidates_of_a_query_major_block_are_the_row_major_ones(
    drawn: tuple[npt.NDArray[np.float32], ...], m: int, filling: bool, scaled: bool
) -> None:
    """A ``(rows, queries)`` block laid out query by query (torch's CPU product) is walked in its own
    memory order: it must give the very candidates, values and ``group_floor`` of a row-major one."""
    raw, scale, threshold = drawn
    if filling:
        threshold = threshold.copy()
        threshold[0] = -np.inf
    query_major = np.asfortranarray(raw)
    assert query_major.flags.f_contiguous and not query_major.flags.c_contiguous or raw.shape[1] == 1
    row_scale = scale if scaled else None
    want = candidate_set(host_candidates(raw, m, threshold, row_scale))
    assert candidate_set(host_candidates(query_major, m, threshold, row_scale)) == want
    if m < raw.shape[0]:
        np.testing.assert_array_equal(group_floor(query_major, m), group_floor(raw, m))


def test_unscaled_bound_keeps_infinite_and_nan_thresholds() -> None:
    threshold = np.array([np.inf, np.nan, -np.inf, 0.5, -0.5], np.float32)
    bound = unscaled_bound(threshold, np.array([0.5, 2.0], np.float32))
    assert bound[0] == np.inf and np.isnan(bound[1]) and bound[2] == -np.inf
    assert 0.25 > bound[3] > 0.2499 and -1.0 > bound[4] > -1.0001  # t / max(s) just below, t / min(s) just beyond


def test_a_nan_row_shift_costs_its_own_row_only() -> None:
    """A block whose shifts hold a NaN is shifted by the backend (NaN scores lose), not left to the
    selection, whose one bound per block a NaN would make pass nothing."""
    from embedtools import NumpyBackend
    from embedtools.search.exact import blocked_topk

    backend = NumpyBackend()
    rng = np.random.default_rng(8)
    rows = rng.standard_normal((20_000, 16)).astype(np.float32)  # blocks of 8,192 rows: the NaN's is the second
    queries = rng.standard_normal((4, 16)).astype(np.float32)
    shift = np.full(20_000, np.float32(-0.001))
    nan_shift, dropped = shift.copy(), shift.copy()
    nan_shift[12_345], dropped[12_345] = np.nan, np.inf
    block_bytes = 64 << 20
    got = blocked_topk(backend, queries, rows, 10, "dot", block_bytes, scale=None, shift=nan_shift, mask=None, rows_of=None, settle_ties=False)
    want = blocked_topk(backend, queries, rows, 10, "dot", block_bytes, scale=None, shift=dropped, mask=None, rows_of=None, settle_ties=False)
    assert np.any((want[1] >= 8192) & (want[1] < 16384))  # the NaN's block holds winners
    np.testing.assert_array_equal(got[1], want[1])
