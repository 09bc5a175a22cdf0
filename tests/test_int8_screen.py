"""The integer screen over an int8 index: the query grid's errors and the float32 arithmetic bound
hold against exact arithmetic for the scores torch's integer product hands back, and searches
through that product (certified, and approximate shortlists) return what they should."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import embedtools as et
from embedtools.filters import Label
from embedtools.search.int8_screen import STEPS, decode_slack, int8_queries
from embedtools.testing import overriding
from tests.test_certified import exact_ids, near_ties

torch = pytest.importorskip("torch")
from embedtools.backends.torch import TorchBackend  # noqa: E402


class NativeTorch(TorchBackend):
    """A CPU torch backend that reports its integer product faster (as a VNNI CPU measures it), so
    the native path runs on any machine, and records which native products the search asked for."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.native: list[str] = []

    def gemm_speedup(self, kind: et.Quantization) -> float:
        return 3.0 if kind == "int8" else 0.0

    def low_precision(self, kind: et.Quantization) -> Any:
        self.native.append(kind)
        return super().low_precision(kind)


def exact_decode(codes: npt.NDArray[np.int8], scale: npt.NDArray[np.float32], offset: npt.NDArray[np.float32]) -> list[list[Fraction]]:
    return [[Fraction(float(o)) + Fraction(float(s)) * int(c) for c, s, o in zip(row, scale, offset, strict=True)] for row in codes]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    dim=st.sampled_from([1, 3, 16, 1100]),
    offset_size=st.sampled_from([0.0, 1.0, 1e4]),
    scale_size=st.sampled_from([1e-30, 1e-3, 1.0]),
)
@example(seed=0, dim=1100, offset_size=0.0, scale_size=1.0)  # |codes·steps| past 2²⁴: the int32 -> float32 conversion rounds
def test_the_integer_products_scores_stay_within_the_arithmetic_bound(seed: int, dim: int, offset_size: float, scale_size: float) -> None:
    rng = np.random.default_rng(seed)
    queries = (rng.standard_normal((3, dim)) * rng.choice([1e-3, 1.0, 50.0], (3, 1))).astype(np.float32)
    scale = (rng.uniform(0.2, 2.0, dim) * scale_size).astype(np.float32)
    offset = (rng.standard_normal(dim) * offset_size).astype(np.float32)
    codes = rng.choice(np.array([-128, 127, -1, 0, 5], dtype=np.int8), size=(4, dim))
    codes[0] = np.where(rng.standard_normal(dim) > 0, 127, -128)  # the largest products
    grid = int8_queries(queries, scale, offset)
    steps = grid.packed[:, :dim]
    assert np.array_equal(steps, np.rint(steps)) and np.abs(steps).max() <= STEPS
    backend = TorchBackend("cpu")
    native = backend.low_precision("int8")
    assert native is not None and native.values is None
    block = backend.to_numpy(backend.block_scores(backend.from_numpy(codes, dtype="int8"), slice(0, 4), native.operand(grid.packed), None, None, None))
    decoded = exact_decode(codes, scale, offset)
    for qi in range(queries.shape[0]):
        alpha = Fraction(float(grid.packed[qi, dim]))
        effective = [alpha * int(t) / Fraction(float(s)) for t, s in zip(steps[qi], scale, strict=True)]  # q̃, exactly
        error = sum((e - Fraction(float(v))) ** 2 for e, v in zip(effective, queries[qi], strict=True))
        assert float(error) <= float(grid.errors[qi]) ** 2 * (1 + 1e-12) + 1e-300
        for ri in range(codes.shape[0]):
            want = sum((e * x for e, x in zip(effective, decoded[ri], strict=True)), Fraction(0))
            assert abs(Fraction(float(block[ri, qi])) - want) <= Fraction(float(grid.arithmetic[qi])), (qi, ri)
    # the backends' float32 decode is within decode_slack of the exact one, per row
    slack = decode_slack(scale, offset)
    float_decode = backend.to_numpy(backend.dequantize(backend.from_numpy(codes, dtype="int8"), "int8", width=dim,
                                                       scale=backend.from_numpy(scale), offset=backend.from_numpy(offset)))  # fmt: skip
    for ri in range(codes.shape[0]):
        gap = sum((Fraction(float(v)) - x) ** 2 for v, x in zip(float_decode[ri], decoded[ri], strict=True))
        assert float(gap) <= slack**2


def store_on(backend: et.Backend[Any], rows: npt.NDArray[np.float32], labels: list[str] | None = None) -> et.EmbeddingStore:
    container = et.make_container({"backend": "torch", "max_memory_gb": 1.0})
    with overriding(container, backend=backend):
        store = container.store()
    store.add(rows, labels=labels)
    store.quantize(rows.shape[1], "int8")
    return store


# (3, 2000, 64, 0.003): a set whose dot screen certified a wrong shortlist when the queries' rounding was left out of the bound
@pytest.mark.parametrize(("seed", "n", "dim", "spread"), [(5, 600, 48, 0.003), (5, 600, 48, 0.05), (3, 2000, 64, 0.003)])
def test_a_certified_screen_through_the_integer_product_is_exact(seed: int, n: int, dim: int, spread: float) -> None:
    rows, queries = near_ties(seed, n, dim, spread)
    labels = ["a" if i % 3 else "b" for i in range(rows.shape[0])]
    backend = NativeTorch()
    store = store_on(backend, rows, labels)
    mask = np.array([label == "a" for label in labels])
    for metric in ("cosine", "dot", "l2"):
        for k in (1, 10):
            got = store.search(queries, k, metric=metric, quantized="int8", rescore="certified")
            np.testing.assert_array_equal(got.indices, exact_ids(queries, rows, metric, k), err_msg=f"{metric} k={k}")
            filtered = store.search(queries, k, metric=metric, quantized="int8", rescore="certified", where=Label("a"))
            np.testing.assert_array_equal(filtered.indices, exact_ids(queries, rows, metric, k, mask), err_msg=f"{metric} k={k} filtered")
    assert "int8" in backend.native


def test_an_approximate_int8_shortlist_through_the_integer_product() -> None:
    """The shortlist the integer product ranks is rescored exactly: a shortlist as long as the table
    gives the exact ids, a filter keeps to its rows, and on clustered rows recall stays high."""
    rng = np.random.default_rng(8)
    centres = rng.standard_normal((40, 32))
    rows = (centres[rng.integers(0, 40, 4000)] + 0.3 * rng.standard_normal((4000, 32))).astype(np.float32)
    queries = (rows[rng.integers(0, 4000, 30)] + 0.1 * rng.standard_normal((30, 32))).astype(np.float32)
    labels = ["a" if i % 2 else "b" for i in range(rows.shape[0])]
    backend = NativeTorch()
    store = store_on(backend, rows, labels)
    for metric in ("cosine", "dot", "l2"):
        want = exact_ids(queries, rows, metric, 10)
        whole = store.search(queries, 10, metric=metric, quantized="int8", rescore=400)
        np.testing.assert_array_equal(whole.indices, want, err_msg=metric)
        short = store.search(queries, 10, metric=metric, quantized="int8", rescore=4)
        hits = sum(len(set(a) & set(b)) for a, b in zip(short.indices.tolist(), want.tolist(), strict=True))
        assert hits / want.size >= 0.97, metric
        filtered = store.search(queries, 10, metric=metric, quantized="int8", rescore=4, where=Label("a"))
        assert (filtered.indices % 2 == 1).all()
    assert backend.native.count("int8") >= 9  # every one of them ranked by the integer product
