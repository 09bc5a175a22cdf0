"""Device-side block primitives of the torch and MLX top-k, and the block plans, that the core Protocol does not expose.

Their results feed only the driver's speed (a wrong n-th best makes the driver redo queries, never
return wrong rows), so the conformance suite cannot see them: they are checked here against NumPy.
torch and MLX are installed in every CI run (the ``all`` extra).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedtools import make_backend
from embedtools.protocols import Metric, Quantization, SearchBackend
from embedtools.search.select import host_float32
from embedtools.search.kernel import FEW_QUERIES, FEW_QUERY_BLOCK_ROWS
from embedtools.search import (
    BLOCK_ROWS,
    DEVICE_BLOCK_ROWS,
    MIN_BATCH_BLOCK_ROWS,
    ONE_QUERY_BLOCK_ROWS,
    SCORE_BLOCK_BYTES,
    host_nth_best,
    plan_blocks,
    rows_per_block,
    stable_top,
)


@pytest.mark.parametrize("n", [1, 7, 64])
def test_torch_nth_best_of_a_rows_by_queries_block(n: int) -> None:
    torch = pytest.importorskip("torch")
    from embedtools.backends.torch import TorchBackend

    block = np.random.default_rng(n).standard_normal((300, 9)).astype(np.float32)
    found = TorchBackend("cpu").nth_best(torch.from_numpy(block), n)
    np.testing.assert_array_equal(found, host_nth_best(np.ascontiguousarray(block.T), n))


@pytest.mark.parametrize("n", [1, 7, 64])
def test_mlx_nth_best_of_a_rows_by_queries_block(n: int) -> None:
    mx = pytest.importorskip("mlx.core")
    from embedtools.backends.mlx import MlxBackend

    block = np.random.default_rng(n).standard_normal((300, 9)).astype(np.float32)
    found = MlxBackend("cpu").nth_best(mx.array(block), n)
    np.testing.assert_array_equal(found, host_nth_best(np.ascontiguousarray(block.T), n))


@pytest.mark.parametrize("name", ["torch", "mlx"])
@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
@pytest.mark.parametrize(("n_queries", "k", "rows"), [(1, 1, 9_000), (5, 10, 9_000), (3, 150, 9_000), (4, 150, 120)])
def test_selection_on_the_device_finds_what_numpy_finds(name: str, metric: Metric, n_queries: int, k: int, rows: int) -> None:
    """The GPU's selection (torch: topk, compare and nonzero; MLX: a count and an argpartition, all
    on the device), run here on the CPU: CPU backends select on the host, so nothing else in CI
    runs it. 9,000 rows are three blocks; k=150 starts from a sampled floor; over 120 rows it
    keeps every row."""
    pytest.importorskip("mlx.core" if name == "mlx" else name)
    rng = np.random.default_rng(k)
    corpus = rng.standard_normal((rows, 24)).astype(np.float32)
    queries = rng.standard_normal((n_queries, 24)).astype(np.float32)
    backend = _device_selecting_cpu_backend(name)
    assert backend.capabilities.select_on_device and not backend.capabilities.gpu
    scores, indices = backend.topk(backend.from_numpy(queries), backend.from_numpy(corpus), k, metric)
    expected_scores, expected = make_backend("numpy").topk(queries, corpus, k, metric)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)


def _device_selecting_cpu_backend(name: str) -> SearchBackend[Any]:
    """A CPU backend told (through its constructor) to select as on a GPU."""
    if name == "torch":
        from embedtools.backends.torch import TorchBackend

        return TorchBackend("cpu", select_on_device=True)
    from embedtools.backends.mlx import MlxBackend

    return MlxBackend("cpu", select_on_device=True)


def test_host_nth_best_is_the_nth_largest() -> None:
    scores = np.array([[3.0, 1.0, 2.0, 5.0], [0.0, -1.0, 4.0, 4.0]], np.float32)
    np.testing.assert_array_equal(host_nth_best(scores, 1), [5.0, 4.0])
    np.testing.assert_array_equal(host_nth_best(scores, 2), [3.0, 4.0])
    np.testing.assert_array_equal(host_nth_best(scores, 4), [1.0, -1.0])


@pytest.mark.parametrize(
    ("queries", "rows", "budget", "block_rows", "expected"),
    [
        (100, 200_000, 128 << 20, BLOCK_ROWS, (100, BLOCK_ROWS)),
        (100, 200_000, 128 << 20, DEVICE_BLOCK_ROWS, (100, DEVICE_BLOCK_ROWS)),
        (10_000, 200_000, 128 << 20, DEVICE_BLOCK_ROWS, (512, DEVICE_BLOCK_ROWS)),  # queries fill the budget
        (100, 1_000, 128 << 20, DEVICE_BLOCK_ROWS, (100, 1_000)),  # never more rows than the corpus
        (100, 200_000, 4_000, DEVICE_BLOCK_ROWS, (1, 1_000)),  # nor more bytes than allowed
    ],
)
def test_plan_blocks(queries: int, rows: int, budget: int, block_rows: int, expected: tuple[int, int]) -> None:
    assert plan_blocks(queries, rows, budget, block_rows=block_rows) == expected


def test_plan_blocks_counts_each_querys_shortlist_against_the_bound() -> None:
    # BLOCK_ROWS x 4 bytes of scores plus 1 MiB of shortlist per query (124 queries in 128 MiB at
    # 8,192 rows); without the shortlists 4,096 would fit
    fitting = (128 << 20) // (BLOCK_ROWS * 4 + (1 << 20))
    assert fitting < (128 << 20) // (BLOCK_ROWS * 4)
    assert plan_blocks(10_000, 200_000, 128 << 20, per_query_bytes=1 << 20) == (fitting, BLOCK_ROWS)
    assert plan_blocks(10_000, 200_000, 1 << 20, per_query_bytes=1 << 30) == (1, BLOCK_ROWS)  # at least one


def test_blocks_are_cache_sized_for_a_cpu_batch_streaming_for_one_query_and_launch_sized_on_a_gpu() -> None:
    assert rows_per_block(1, gpu=False) == ONE_QUERY_BLOCK_ROWS > BLOCK_ROWS
    sizes = [rows_per_block(n, gpu=False) for n in (2, FEW_QUERIES - 1, FEW_QUERIES, 128, 300, 500, 1_000, 4_096, 100_000)]
    assert sizes[:4] == [FEW_QUERY_BLOCK_ROWS, FEW_QUERY_BLOCK_ROWS, BLOCK_ROWS, BLOCK_ROWS]  # a few queries stream, like one
    assert (FEW_QUERIES - 1) * 4 * sizes[1] <= SCORE_BLOCK_BYTES  # within the same bytes of scores
    assert sizes == sorted(sizes, reverse=True)  # a larger batch never gets more rows
    assert all(size % 64 == 0 for size in sizes)
    assert 1_000 * 4 * sizes[6] <= SCORE_BLOCK_BYTES < 1_000 * 4 * BLOCK_ROWS  # its scores fit
    assert sizes[-1] == MIN_BATCH_BLOCK_ROWS
    assert rows_per_block(1, gpu=True) == rows_per_block(10_000, gpu=True) == DEVICE_BLOCK_ROWS


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([0.0, 1.0, -1.0, 2.5, float("inf"), float("-inf"), float("nan")]), min_size=1, max_size=60),
    st.integers(1, 70),
)
def test_stable_top_is_the_stable_argsort_of_a_tied_querys_scores(values: list[float], k: int) -> None:
    """The tied-query redo's top k: ties (few distinct values), infinities and NaN included."""
    scores = np.asarray(values, dtype=np.float32)
    want = np.argsort(-scores, kind="stable")[:k]
    np.testing.assert_array_equal(stable_top(scores, k), want)


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
def test_a_native_low_precision_block_comes_back_float32_scaled_after_its_one_rounding(kind: Quantization) -> None:
    """The certified bound allows the product one rounding to ``kind``: the row scale and the bound's
    shift must then apply in float32 (a block scaled in bfloat16 would round a second time)."""
    torch = pytest.importorskip("torch")
    from embedtools.backends.torch import TorchBackend

    backend = TorchBackend("cpu")
    low = backend.low_precision(kind)
    assert low is not None
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((300, 24)).astype(np.float32)
    queries = rng.standard_normal((7, 24)).astype(np.float32)
    as_torch = torch.from_numpy(rows)
    codes = as_torch.to(torch.bfloat16).view(torch.int16) if kind == "bfloat16" else as_torch.to(torch.float16)  # the index's codes
    scale, shift = rng.uniform(0.5, 2.0, 300).astype(np.float32), rng.uniform(-1.0, 1.0, 300).astype(np.float32)
    operand = low.operand(queries)
    unscaled = backend.host_block(backend.block_scores(codes, slice(0, 300), operand, None, None, low.rows))
    # with nothing to scale, a bfloat16 block reaches the host as its words, for the selection to compare as they are
    assert unscaled.dtype == (np.int16 if kind == "bfloat16" else np.float32)
    plain = host_float32(unscaled)
    block = backend.block_scores(codes, slice(0, 300), operand, backend.from_numpy(scale), backend.from_numpy(shift), low.rows)
    assert backend.dtype(block) == "float32"
    low_dtype = torch.bfloat16 if kind == "bfloat16" else torch.float16
    np.testing.assert_array_equal(torch.from_numpy(plain).to(low_dtype).to(torch.float32).numpy(), plain)  # one rounding to kind
    np.testing.assert_array_equal(backend.host_block(block), plain * scale[:, None] - shift[:, None])


@pytest.mark.parametrize("queries", [1, 3, 40])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_torch_block_product_makes_the_plain_products_block(queries: int, dtype: str) -> None:
    """The ways the torch backend may time and pick are one product: contiguous rows, a prefix
    view (strided rows) and every 7th row (the sampled floor's kind of slice) alike; a bfloat16
    way's block is the exact product of its rounded inputs, rounded once to bfloat16 (the bound's model)."""
    torch = pytest.importorskip("torch")
    from embedtools.backends.torch_products import BLOCK_PRODUCTS, PLAIN_PRODUCT

    kind = getattr(torch, dtype)
    rng = np.random.default_rng(queries)
    table = torch.from_numpy(rng.standard_normal((500, 48)).astype(np.float32)).to(kind)
    query_rows = torch.from_numpy(rng.standard_normal((queries, 48)).astype(np.float32)).to(kind)
    for rows in (table, table[:, :20], table[::7]):
        operand = query_rows[:, : rows.shape[1]].contiguous().T
        expected = rows.float().numpy().astype(np.float64) @ operand.float().numpy().astype(np.float64)
        for name, product in BLOCK_PRODUCTS.items():
            try:
                block = product(rows, operand)
            except (RuntimeError, NotImplementedError):  # an op this torch lacks is never picked (test below)
                assert name != PLAIN_PRODUCT
                continue
            assert block.shape == (rows.shape[0], queries) and block.dtype == kind, name
            # float32 sums (a few ulps of float32), then for bfloat16 one rounding: half a step of 2^-8
            tolerance = 1e-4 if dtype == "float32" else 2.0**-8 * np.abs(expected) + 1e-4
            assert np.all(np.abs(block.float().numpy() - expected) <= tolerance), name


def test_torch_float32_product_is_timed_per_class_and_few_queries_take_the_plain_one() -> None:
    pytest.importorskip("torch")
    from embedtools.backends.torch import TorchBackend
    from embedtools.backends.torch_products import BLOCK_PRODUCTS, PLAIN_PRODUCT, QUERY_CLASSES

    backend = TorchBackend("cpu")
    few = [q for q, timed in QUERY_CLASSES.items() if timed is None]
    assert few and all(backend.float32_product(q) == PLAIN_PRODUCT for q in few)
    for queries in (1, 100, 5000):
        assert backend.float32_product(queries) in BLOCK_PRODUCTS
    assert backend.float32_product(100) == backend.float32_product(5000)  # one class, timed once
    assert backend.block_product(100, "bfloat16") in BLOCK_PRODUCTS  # timed for its own dtype
    assert backend.block_product(3, "bfloat16") == PLAIN_PRODUCT


def test_fastest_picks_the_quicker_way_and_leaves_out_one_that_raises() -> None:
    import time

    from embedtools.backends._shared import fastest

    def slow() -> None:
        time.sleep(0.002)

    def missing() -> None:
        raise NotImplementedError("no such op here")

    assert fastest({"slow": slow, "quick": lambda: None}, lambda _: None) == "quick"
    assert fastest({"slow": slow, "missing": missing}, lambda _: None) == "slow"
    with pytest.raises(NotImplementedError):  # the plain way must run: nothing to fall back on
        fastest({"missing": missing, "quick": lambda: None}, lambda _: None)


@settings(max_examples=300, deadline=None)
@given(
    queries=st.integers(1, 12),
    width=st.integers(1, 400),
    n=st.integers(1, 30),
    values=st.sampled_from(["normal", "straddling", "ties", "nan", "-inf", "sorted"]),
    by_column=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_host_nth_best_equals_a_partition_of_each_row(queries: int, width: int, n: int, values: str, by_column: bool, seed: int) -> None:
    """The group-maximum floor path (wide rows) and the partition path (narrow rows, NaN rows)
    agree with a partition, in both memory orders (a (rows, queries) block's transpose too)."""
    n = min(n, width)
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((queries, width)).astype(np.float32)
    if values == "straddling":  # a row's best scores on both sides of zero: their bits order differently
        scores -= np.float32(2.0)
    elif values == "ties":
        scores = np.round(scores).astype(np.float32)
    elif values == "nan":
        scores[rng.random(scores.shape) < 0.05] = np.nan
    elif values == "-inf":
        scores[rng.random(scores.shape) < 0.7] = -np.inf
    elif values == "sorted":  # the best scores all in the first groups
        scores = np.ascontiguousarray(np.sort(scores, axis=1)[:, ::-1])
    laid = np.ascontiguousarray(scores.T).T if by_column else scores
    expected = np.partition(scores, width - n, axis=1)[:, width - n]
    np.testing.assert_array_equal(host_nth_best(laid, n), expected)
