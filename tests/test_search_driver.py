"""The host-side pieces of the top-k driver that every backend shares (``embedtools.search``)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from embedtools.search import best_first


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
