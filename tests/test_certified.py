"""Certified screening: ids equal the exact top k (float64 over the stored rows, ties to the lower
row) for every query, whatever the data; the bound is what makes it so (a zero bound misses rows),
shortlists that would grow past their limit fall back to every row, and the automatic rule
screens only where it pays."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import embedtools as et
from embedtools import ByteBudget, EmbeddingStore, Metric, NumpyBackend, Sha256Hasher
from embedtools.errors import InvalidArgumentError
from embedtools.filters import Label
from embedtools.quantize import QuantizedIndex
from embedtools.search.certified import Listed, certified_topk, low_rounding, unit_bounds
from embedtools.search.select import HostBlock
from embedtools.search.auto_screen import AUTO_SCREEN_MIN_QUERIES, AUTO_SCREEN_MIN_ROWS
from embedtools.testing import overriding
from tests.helpers import GatherCounting, matryoshka_like, reference_scores

BACKENDS = [name for name in ("numpy", "torch", "mlx") if name in et.available_backends()]
METRICS: tuple[Metric, ...] = ("cosine", "dot", "l2")


def exact_ids(queries: npt.NDArray[Any], corpus: npt.NDArray[Any], metric: Metric, k: int,
              mask: npt.NDArray[np.bool_] | None = None) -> npt.NDArray[np.int64]:  # fmt: skip
    """The exact top k by the float64 reference, ties to the lower row index."""
    ref = reference_scores(queries, corpus, metric)
    if mask is not None:
        ref = np.where(mask[None, :], ref, -np.inf)
    kk = min(k, corpus.shape[0] if mask is None else int(mask.sum()))
    order = np.lexsort((np.broadcast_to(np.arange(corpus.shape[0]), ref.shape), -ref), axis=1)
    out: npt.NDArray[np.int64] = order[:, :kk].astype(np.int64)
    return out


@functools.cache
def backend_of(name: str) -> et.Backend[Any]:
    """One backend per library for the whole module: each instance times its low-precision GEMMs
    once, on first use, and a new one per hypothesis example would time them again."""
    return et.make_backend(name, "cpu")


def store_on(name: str, rows: npt.NDArray[np.float32], *kinds: str, labels: list[str] | None = None) -> EmbeddingStore:
    store = EmbeddingStore(backend_of(name), ByteBudget(1 << 30), Sha256Hasher(), search_block_bytes=1 << 16)
    store.add(rows, labels=labels)
    for kind in kinds:
        store.quantize(rows.shape[1], kind)  # type: ignore[arg-type]
    return store


def near_ties(seed: int, n: int, dim: int, spread: float) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Rows crowded around a few queries' directions, ``spread`` apart (about the screens' bounds),
    with exact duplicates: the rows a screen must not drop."""
    rng = np.random.default_rng(seed)
    queries = rng.standard_normal((4, dim)).astype(np.float32)
    base = queries[rng.integers(0, 4, n)]
    rows = base + spread * rng.standard_normal((n, dim)) * np.linalg.norm(base, axis=1, keepdims=True) / np.sqrt(dim)
    rows[rng.integers(0, n, n // 10)] = rows[rng.integers(0, n, n // 10)]  # duplicates, lower index must win
    scales = rng.choice([1.0, 0.5, 3.0], size=(n, 1))  # dot and l2 see different norms
    return (rows * scales).astype(np.float32), (queries + 0.01 * rng.standard_normal(queries.shape)).astype(np.float32)


@pytest.mark.parametrize("name", BACKENDS)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), spread=st.sampled_from([0.003, 0.01, 0.05]), k=st.integers(1, 12))
def test_certified_ids_are_exact_on_adversarial_near_ties(name: str, seed: int, spread: float, k: int) -> None:
    rows, queries = near_ties(seed, 240, 24, spread)
    labels = ["a" if i % 3 else "b" for i in range(rows.shape[0])]
    store = store_on(name, rows, "bfloat16", "float16", "int8", labels=labels)
    mask = np.array([label == "a" for label in labels])
    for metric in METRICS:
        want = exact_ids(queries, rows, metric, k)
        want_a = exact_ids(queries, rows, metric, k, mask)
        for kind in ("bfloat16", "float16", "int8"):
            got = store.search(queries, k, metric=metric, quantized=kind, rescore="certified")
            np.testing.assert_array_equal(got.indices, want, err_msg=f"{name} {metric} {kind}")
            assert got.screen == kind and got.rescored is not None and (got.rescored >= k).all()
            filtered = store.search(queries, k, metric=metric, quantized=kind, rescore="certified", where=Label("a"))
            np.testing.assert_array_equal(filtered.indices, want_a, err_msg=f"{name} {metric} {kind} filtered")
        funnel = store.search(queries, k, metric=metric, funnel=[(8, k + 2)], rescore="certified")
        np.testing.assert_array_equal(funnel.indices, want, err_msg=f"{name} {metric} funnel")
        plain = store.search(queries, k, metric=metric, rescore="certified")
        np.testing.assert_array_equal(plain.indices, want, err_msg=f"{name} {metric} float32 screen")


def _on_the_bound(kind: str, dim: int, k: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Rows whose exact cosine sits at the k-th best minus multiples of the screen's own bound
    (0, 1/2, 1, 3/2 and 2 bounds below it, and just either side of those): every one of them the
    screen cannot tell apart from the k-th."""
    u = 2.0**-8 if kind == "bfloat16" else 2.0**-11
    worst = low_rounding(kind, np.full(1, u), native=True)  # rows and queries rounded by a whole u
    bounds = unit_bounds("cosine", worst, np.ones(1, dtype=np.float32), np.full(1, u), dim)
    bound = float(-bounds.shift[0]) + float(bounds.add[0]) if bounds.shift is not None else 0.0
    top = 0.8
    cosines = [0.9] * (k - 1) + [top]
    for step in (0.0, 0.5, 1.0, 1.5, 2.0):
        for nudge in (-1e-6, 0.0, 1e-6):
            cosines.append(top - step * bound + nudge)
    rows = np.zeros((len(cosines), dim))
    rng = np.random.default_rng(dim)
    for i, c in enumerate(cosines):
        side = rng.standard_normal(dim - 1)
        side /= np.linalg.norm(side)
        rows[i, 0], rows[i, 1:] = c, np.sqrt(1 - c * c) * side
    order = rng.permutation(len(cosines))
    query = np.zeros((1, dim))
    query[0, 0] = 1.0
    return rows[order].astype(np.float32), query.astype(np.float32)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
def test_rows_built_to_sit_on_the_bound_are_kept(name: str, kind: str) -> None:
    rows, query = _on_the_bound(kind, 32, 3)
    filler = np.random.default_rng(1).standard_normal((400, 32)).astype(np.float32) * 0.05  # far below
    data = np.vstack([rows, filler]).astype(np.float32)
    store = store_on(name, data, kind)
    for k in (1, 3, 4, 8):
        got = store.search(query, k, quantized=kind, rescore="certified")  # type: ignore[arg-type]
        np.testing.assert_array_equal(got.indices, exact_ids(query, data, "cosine", k))


def test_a_zero_bound_screen_misses_rows_the_bounded_one_keeps() -> None:
    """The same bfloat16 screen with its bound set to zero certifies wrong shortlists: the bound
    is what makes the result exact, and this test would notice if it stopped being used."""
    rng = np.random.default_rng(7)
    dim, n = 32, 600
    queries = rng.standard_normal((60, dim)).astype(np.float32)
    rows = (queries[rng.integers(0, 60, n)] + 0.005 * rng.standard_normal((n, dim))).astype(np.float32)
    backend = NumpyBackend()
    index = QuantizedIndex.build("bfloat16", rows)
    decoded = backend.dequantize(index.codes, "bfloat16", width=dim).astype(np.float64)
    q_low = backend.dequantize(QuantizedIndex.build("bfloat16", queries).codes, "bfloat16", width=dim).astype(np.float64)
    norms = np.linalg.norm(rows, axis=1).astype(np.float32)
    screened = (q_low @ decoded.T).astype(np.float32).astype(np.float64)  # what a bf16 GEMM sees
    exact = queries.astype(np.float64) @ rows.astype(np.float64).T
    want = exact_ids(queries, rows, "dot", 5)

    def run(bound: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        upper = screened + bound[None, :]
        order = np.lexsort((np.broadcast_to(np.arange(n), upper.shape), -upper), axis=1)

        def screen(which: npt.NDArray[np.intp], width: int) -> Listed:
            idx = order[which, :width]
            return Listed(np.take_along_axis(upper[which], idx, axis=1), idx.astype(np.int64), np.ones(which.size), np.zeros(which.size))

        def fallback(which: npt.NDArray[np.intp]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
            return np.take_along_axis(exact[which], want[which], axis=1), want[which]

        found = certified_topk(queries.shape[0], 5, n, screen=screen, exact=lambda w, i: np.take_along_axis(exact[w], i, axis=1),
                               fallback=fallback, first=6, width=49)  # fmt: skip
        return found.indices

    # the screen's scores here are unnormalised dot products: the unit query's bound times |q|
    q_norm = float(np.linalg.norm(queries, axis=1).max())
    errors = np.linalg.norm(decoded - rows, axis=1)
    q_errors = np.linalg.norm(q_low - queries, axis=1) / np.linalg.norm(queries, axis=1)
    bounds = unit_bounds("dot", low_rounding("bfloat16", errors, native=True), norms, q_errors, dim)
    assert bounds.shift is not None
    bounded = run((-bounds.shift.astype(np.float64) * (1 + 2**-7) + float(bounds.tail.max())) * q_norm)
    np.testing.assert_array_equal(bounded, want)
    missed = run(np.zeros(n))
    assert (missed != want).any(), "with no bound the screen should have certified a wrong shortlist"


@pytest.mark.parametrize("slack, rescored", [(0.5, 6), (5.5, 12), (11.5, 24), (23.5, 48)])
def test_a_shortlist_grows_by_doubling_within_its_listing(slack: float, rescored: int) -> None:
    """Row i ranks -i exactly and is listed with upper bound -i + slack: a shortlist of m
    certifies once the (m+1)-th listed bound is below the 2nd best (-1), so the first shortlist
    of 6 doubles inside the 49-row listing until it does, rescoring no more rows than that."""
    n, k = 400, 2  # a quarter of the rows (the shortlist cap) is more than the listing
    exact = -np.arange(n, dtype=np.float64)[None, :]
    listed_calls: list[int] = []

    def screen(which: npt.NDArray[np.intp], width: int) -> Listed:
        listed_calls.append(width)
        idx = np.broadcast_to(np.arange(width, dtype=np.int64), (which.size, width))
        return Listed(exact[:, :width] + slack, idx, np.ones(which.size), np.zeros(which.size))

    def fallback(which: npt.NDArray[np.intp]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
        raise AssertionError("a listing this long certifies without the fallback")

    found = certified_topk(1, k, n, screen=screen, exact=lambda w, i: np.take_along_axis(exact[w], i, axis=1),
                           fallback=fallback, first=6, width=49)  # fmt: skip
    np.testing.assert_array_equal(found.indices, [[0, 1]])
    assert found.rescored.tolist() == [rescored]
    assert listed_calls == [49]  # every step rescored rows of the first listing


def test_a_funnel_whose_bound_keeps_everything_falls_back_before_long_shortlists() -> None:
    """Isotropic rows give an 8-d prefix no grip on 64-d scores: no shortlist certifies, and each
    query goes to the float32 search over every row once its shortlist would pass 1/32 of the
    table, rather than first gathering and rescoring hundreds of rows at full width."""
    rng = np.random.default_rng(11)
    rows = rng.standard_normal((6400, 64)).astype(np.float32)
    queries = rng.standard_normal((20, 64)).astype(np.float32)
    backend = GatherCounting()
    store = EmbeddingStore(backend, ByteBudget(1 << 30), Sha256Hasher())
    store.add(rows)
    store.search(queries, k=5, funnel=[(8, 10)], rescore="certified")  # builds the bounded prefix
    backend.gathered.clear()
    found = store.search(queries, k=5, funnel=[(8, 10)], rescore="certified")
    np.testing.assert_array_equal(found.indices, exact_ids(queries, rows, "cosine", 5))
    assert found.rescored is not None and found.rescored.tolist() == [6400] * 20  # every query fell back
    # the funnel's own shortlists double to 80 inside its 81-row listing, then stop: 6400 // 32 = 200
    # rows is the cap, and the next step would list 640 (which, under the old 1/4 cap, it rescored)
    assert sum(backend.gathered) < 20 * 200


@pytest.mark.parametrize("name", BACKENDS)
def test_shortlists_past_the_limit_fall_back_to_every_row(name: str) -> None:
    rng = np.random.default_rng(3)
    rows = (np.ones((2000, 16)) + 1e-4 * rng.standard_normal((2000, 16))).astype(np.float32)  # all within the bound
    queries = np.ones((3, 16), dtype=np.float32) + 1e-3 * rng.standard_normal((3, 16)).astype(np.float32)
    store = store_on(name, rows, "bfloat16")
    for metric in METRICS:
        got = store.search(queries, 10, metric=metric, quantized="bfloat16", rescore="certified")
        np.testing.assert_array_equal(got.indices, exact_ids(queries, rows, metric, 10))
        assert got.rescored is not None
        np.testing.assert_array_equal(got.rescored, np.full(3, 2000))


@pytest.mark.parametrize("name", BACKENDS)
def test_certified_funnel_is_exact_with_and_without_a_rotation(name: str) -> None:
    rows = matryoshka_like(3000, 64, seed=5)
    queries = matryoshka_like(12, 64, seed=6)
    store = store_on(name, rows)
    for rotated in (False, True):
        if rotated:
            store.fit_rotation(64, components=32)
        for metric in METRICS:
            got = store.search(queries, 10, metric=metric, funnel=[(16, 40)], rescore="certified")
            np.testing.assert_array_equal(got.indices, exact_ids(queries, rows, metric, 10), err_msg=f"{metric} rotated={rotated}")
            assert got.screen == "prefix:16" and got.rescored is not None
            assert float(np.median(got.rescored)) < 3000 / 4, "the prefix bound should spare most rows on Matryoshka-like data"
    caches = store.table(64).caches
    assert "bound_prefix/16" in caches and "rotation_bound_prefix/16" in caches  # charged
    assert caches["bound_prefix/16"] == 3000 * 17 * 4


def test_bad_certified_arguments_are_refused_and_change_nothing() -> None:
    rows = matryoshka_like(300, 32, seed=1)
    store = store_on("numpy", rows, "binary")
    before = (store.memory_info().store_bytes, dict(store.table(32).caches))
    cases: list[dict[str, Any]] = [
        {"quantized": "bfloat16", "rescore": "certfied"},
        {"rescore": "certfied"},
        {"funnel": [(8, 40), (16, 20)], "rescore": "certified"},
        {"quantized": "bfloat16", "rescore": "certified"},  # no such index
        {"quantized": "binary", "rescore": "certified"},  # no bound for signs
        {"quantized": "binary", "rescore": "certified", "rescore_with": "binary"},
    ]
    for case in cases:
        with pytest.raises(InvalidArgumentError):
            store.search(rows[:3], 5, **case)
    assert (store.memory_info().store_bytes, dict(store.table(32).caches)) == before


class _FastLowPrecision(NumpyBackend):
    """A NumPy backend that reports a measured low-precision speedup (the rule's only input from
    the device), so both sides of the automatic rule run on any machine."""

    def __init__(self, speedup: float) -> None:
        super().__init__()
        self.speedup = speedup
        self.asked: list[str] = []

    def gemm_speedup(self, kind: et.Quantization) -> float:
        self.asked.append(kind)
        return self.speedup


@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
@pytest.mark.parametrize(("speedup", "auto", "screens"), [(3.0, True, True), (2.5, True, True), (2.3, True, False), (1.2, True, False), (3.0, False, False)])
def test_the_automatic_rule_screens_only_where_it_pays(speedup: float, auto: bool, screens: bool, kind: et.Quantization) -> None:
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((AUTO_SCREEN_MIN_ROWS, 16)).astype(np.float32)
    queries = rng.standard_normal((AUTO_SCREEN_MIN_QUERIES, 16)).astype(np.float32)
    container = et.make_container({"backend": "numpy", "max_memory_gb": 1.0, "auto_screen": auto})
    with overriding(container, backend=_FastLowPrecision(speedup)):
        store = container.store()
        store.add(rows)
        plain = store.search(queries, 10)
        assert plain.screen is None  # no index: nothing to screen by
        store.quantize(16, kind)
        got = store.search(queries, 10)
        assert (got.screen == kind) is screens
        assert (got.rescored is not None) is screens
        np.testing.assert_array_equal(got.indices, exact_ids(queries, rows, "cosine", 10))
        assert store.search(queries[:1], 10).screen is None  # one query does not pay for the rescoring


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
def test_a_certified_screen_through_torchs_native_product_on_a_cpu_is_exact(kind: et.Quantization) -> None:
    """The native low-precision GEMM runs only where it measured faster (an AMX CPU, a GPU); a torch
    backend that reports so runs it here, on rows of spread norms (the row scale applies on the block)."""
    pytest.importorskip("torch")
    from embedtools.backends.torch import TorchBackend

    asked: list[str] = []

    class NativeTorch(TorchBackend):
        def gemm_speedup(self, kind: et.Quantization) -> float:
            asked.append(kind)
            return 3.0

    rng = np.random.default_rng(4)
    rows = (rng.standard_normal((3000, 32)) * rng.uniform(0.5, 3.0, (3000, 1))).astype(np.float32)
    queries = rows[rng.integers(0, 3000, 12)] + np.float32(0.05) * rng.standard_normal((12, 32)).astype(np.float32)
    container = et.make_container({"backend": "torch", "max_memory_gb": 1.0})
    with overriding(container, backend=NativeTorch("cpu")):
        store = container.store()
        store.add(rows)
        store.quantize(32, kind)
        for metric in ("cosine", "dot", "l2"):
            got = store.search(queries, 10, metric=metric, quantized=kind, rescore="certified")
            assert got.rescored is not None
            np.testing.assert_array_equal(got.indices, exact_ids(queries, rows, metric, 10))
    assert kind in asked  # the screen took the native product


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_a_native_bfloat16_screen_selecting_from_its_words_is_exact(metric: et.Metric) -> None:
    """Unit rows over several blocks: the bound's row shift and cosine's row scale are left to the
    host selection, and the bfloat16 block reaches it as its 16-bit words (compared as they are)."""
    pytest.importorskip("torch")
    from embedtools.backends.torch import TorchBackend

    host_dtypes: list[str] = []

    class NativeTorch(TorchBackend):
        def gemm_speedup(self, kind: et.Quantization) -> float:
            return 3.0

        def host_block(self, block: Any) -> HostBlock:
            found = super().host_block(block)
            host_dtypes.append(str(found.dtype))
            return found

    rng = np.random.default_rng(5)
    centres = rng.standard_normal((40, 48)).astype(np.float32)
    raw = centres[rng.integers(0, 40, 20_000)] + np.float32(0.4) * rng.standard_normal((20_000, 48)).astype(np.float32)
    rows = (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32)
    queries = rows[rng.integers(0, 20_000, 24)] + np.float32(0.02) * rng.standard_normal((24, 48)).astype(np.float32)
    container = et.make_container({"backend": "torch", "max_memory_gb": 1.0})
    with overriding(container, backend=NativeTorch("cpu")):
        store = container.store()
        store.add(rows)
        store.quantize(48, "bfloat16")
        got = store.search(queries, 10, metric=metric, quantized="bfloat16", rescore="certified")
    np.testing.assert_array_equal(got.indices, exact_ids(queries, rows, metric, 10))
    assert "int16" in host_dtypes  # blocks past the first were selected from their words


def test_describe_reports_the_measured_speedups_and_the_rule() -> None:
    found = et.describe("numpy")
    assert found.screen_speedups == {"bfloat16": 0.0, "float16": 0.0, "int8": 0.0}
    assert "auto_screen: off" in str(found)
    assert found.float32_products == {} and "float32 block product" not in str(found)  # one way only


def test_describe_names_the_block_product_of_each_screen_whose_native_product_runs() -> None:
    pytest.importorskip("torch")
    from embedtools.backends.torch_products import BLOCK_PRODUCTS

    found = et.describe("torch", "cpu")
    running = {kind for kind in ("bfloat16", "float16") if found.screen_speedups[kind] >= 1.0}
    assert set(found.screen_products) == running  # a decoded screen has no product of its own to name
    assert set(found.screen_products.values()) <= set(BLOCK_PRODUCTS)
    assert ("screen block product" in str(found)) == bool(running)
    assert et.describe("numpy").screen_products == {}


def test_describe_reports_the_torch_float32_product_of_each_query_class() -> None:
    pytest.importorskip("torch")
    from embedtools.backends.torch_products import BLOCK_PRODUCTS, PLAIN_PRODUCT

    found = et.describe("torch", "cpu")
    assert list(found.float32_products) == ["1 query", "2-15 queries", "16+ queries"]
    assert set(found.float32_products.values()) <= set(BLOCK_PRODUCTS)
    assert found.float32_products["2-15 queries"] == PLAIN_PRODUCT  # untimed
    assert f"16+ queries: {found.float32_products['16+ queries']}" in str(found)


def test_a_certified_funnel_on_a_prefix_search_uses_its_own_tails() -> None:
    rows = matryoshka_like(1500, 48, seed=8)
    queries = matryoshka_like(5, 48, seed=9)
    store = store_on("numpy", rows)
    full = store.search(queries, 5, funnel=[(8, 20)], rescore="certified")  # caches the 48-wide tails
    np.testing.assert_array_equal(full.indices, exact_ids(queries, rows, "cosine", 5))
    narrow = store.search(queries, 5, dimension=24, funnel=[(8, 20)], rescore="certified")
    np.testing.assert_array_equal(narrow.indices, exact_ids(queries[:, :24], rows[:, :24], "cosine", 5))
