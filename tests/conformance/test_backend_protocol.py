"""Every ArrayBackend method, for every backend and device usable here (``backends.PAIRS``)."""

from __future__ import annotations

from typing import Any, get_args

import numpy as np
import pytest

import embedtools as et
from embedtools import Backend, DimensionError, InvalidArgumentError, Metric
from embedtools.protocols import DTypeName
from embedtools.quantize import QuantizedIndex
from embedtools.search import host_nth_best, sampled_floor
from tests.conformance.backends import IDS, PAIRS
from tests.helpers import (
    assert_exact_topk,
    clustered,
    reference_scores,
    sample_adversary,
)


@pytest.fixture(params=PAIRS, ids=IDS)
def backend(request: pytest.FixtureRequest) -> Backend[Any]:
    name, device = request.param
    return et.make_backend(name, device)


def test_name_and_device(backend: Backend[Any]) -> None:
    assert backend.name in {"numpy", "torch", "mlx"}
    assert backend.device


def test_asarray_copies_and_casts(backend: Backend[Any]) -> None:
    source = [[1, 2], [3, 4]]
    a = backend.asarray(source)
    assert backend.dtype(a) == "float32"
    assert backend.shape(a) == (2, 2)
    source[0][0] = 99
    assert backend.to_list(a) == [[1.0, 2.0], [3.0, 4.0]]
    assert backend.dtype(backend.asarray([1, 2], dtype="int64")) == "int64"
    with pytest.raises(InvalidArgumentError):
        backend.asarray([1.0], dtype="complex64")  # type: ignore[arg-type]


def test_numpy_round_trip(backend: Backend[Any]) -> None:
    host = np.arange(12, dtype=np.float64).reshape(3, 4)
    a = backend.from_numpy(host)
    assert backend.dtype(a) == "float32"
    back = backend.to_numpy(a)
    assert isinstance(back, np.ndarray)
    np.testing.assert_array_equal(back, host.astype(np.float32))
    assert backend.to_list(backend.from_numpy(np.array([1.5], dtype=np.float32))) == [1.5]


def test_shape_dtype_nbytes(backend: Backend[Any]) -> None:
    a = backend.zeros((5, 7))
    assert backend.shape(a) == (5, 7)
    assert backend.dtype(a) == "float32"
    assert backend.nbytes(a) == 5 * 7 * 4
    assert backend.nbytes(backend.zeros((5, 7), dtype="float16")) == 5 * 7 * 2


def test_zeros_ones(backend: Backend[Any]) -> None:
    assert backend.to_list(backend.zeros((2,))) == [0.0, 0.0]
    assert backend.to_list(backend.ones((1, 3), dtype="int32")) == [[1, 1, 1]]


def test_random_normal_is_seeded_without_global_state(backend: Backend[Any]) -> None:
    a = backend.to_numpy(backend.random_normal((200, 50), seed=7))
    np.random.seed(0)  # the global numpy state must not matter
    b = backend.to_numpy(backend.random_normal((200, 50), seed=7))
    c = backend.to_numpy(backend.random_normal((200, 50), seed=8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    shifted = backend.to_numpy(backend.random_normal((20_000,), seed=1, mean=3.0, std=0.5))
    assert abs(float(shifted.mean()) - 3.0) < 0.02
    assert abs(float(shifted.std()) - 0.5) < 0.02
    with pytest.raises(InvalidArgumentError):
        backend.random_normal((2,), dtype="int8")


def test_matmul(backend: Backend[Any]) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.arange(12, dtype=np.float32).reshape(3, 4)
    got = backend.to_numpy(backend.matmul(backend.from_numpy(a), backend.from_numpy(b)))
    np.testing.assert_allclose(got, a @ b)


def test_host_matmul_is_numpys_product_in_its_dtype(backend: Backend[Any]) -> None:
    rng = np.random.default_rng(3)
    q = rng.standard_normal((5, 16))
    matrix = rng.standard_normal((24, 16))[:8].T  # a strided view, as a rotation's first columns are
    matrix.flags.writeable = False  # a loaded store's rotation may be read-only
    got64 = backend.host_matmul(q, matrix)
    assert got64.dtype == np.float64 and isinstance(got64, np.ndarray)
    np.testing.assert_allclose(got64, q @ matrix, rtol=1e-12)
    rows = rng.standard_normal((5, 7, 16)).astype(np.float32)
    unit = q.astype(np.float32)
    got32 = backend.host_matmul(rows, unit[:, :, None])  # stacked: each query against its own rows
    assert got32.dtype == np.float32 and got32.shape == (5, 7, 1)
    np.testing.assert_allclose(got32[..., 0], np.einsum("qmd,qd->qm", rows, unit), rtol=1e-5, atol=1e-5)


def test_row_norms_and_normalize_keep_zero_rows_finite(backend: Backend[Any]) -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]], dtype=np.float32)
    norms = backend.to_numpy(backend.row_norms(backend.from_numpy(x)))
    np.testing.assert_allclose(norms, [5.0, 0.0, 1.0])
    unit = backend.to_numpy(backend.normalize(backend.from_numpy(x)))
    assert np.isfinite(unit).all()
    np.testing.assert_allclose(unit, [[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(backend.to_numpy(backend.normalize(backend.from_numpy(x[0]))), [0.6, 0.8], rtol=1e-6)


def test_cosine_similarity_shapes_and_zero_vectors(backend: Backend[Any]) -> None:
    a = np.array([[1.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    b = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]], dtype=np.float32)
    sims = backend.to_numpy(backend.cosine_similarity(backend.from_numpy(a), backend.from_numpy(b)))
    assert sims.shape == (2, 3)
    np.testing.assert_allclose(sims, [[1.0, 0.0, np.sqrt(0.5)], [0.0, 0.0, 0.0]], rtol=1e-6, atol=1e-7)
    swapped = backend.to_numpy(backend.cosine_similarity(backend.from_numpy(b), backend.from_numpy(a)))
    np.testing.assert_allclose(swapped, sims.T, rtol=1e-6, atol=1e-7)  # the larger side first, too
    one = backend.to_numpy(backend.cosine_similarity(backend.from_numpy(a[0]), backend.from_numpy(b)))
    assert one.shape == (1, 3), "a single query is one row, as for a batch"
    with pytest.raises(DimensionError):
        backend.cosine_similarity(backend.from_numpy(a), backend.from_numpy(np.ones((2, 3), np.float32)))


def test_concatenate_and_stack(backend: Backend[Any]) -> None:
    a = backend.from_numpy(np.ones((2, 3), np.float32))
    b = backend.from_numpy(np.zeros((1, 3), np.float32))
    assert backend.shape(backend.concatenate([a, b])) == (3, 3)
    assert backend.shape(backend.concatenate([a, a], axis=1)) == (2, 6)
    assert backend.shape(backend.stack([a, a])) == (2, 2, 3)
    assert backend.shape(backend.stack([a, a], axis=2)) == (2, 3, 2)


def test_slice_last_dim_is_a_prefix(backend: Backend[Any]) -> None:
    host = np.arange(20, dtype=np.float32).reshape(4, 5)
    a = backend.from_numpy(host)
    prefix = backend.slice_last_dim(a, 2)
    np.testing.assert_array_equal(backend.to_numpy(prefix), host[:, :2])
    for bad in (0, 6, -1):
        with pytest.raises(DimensionError):
            backend.slice_last_dim(a, bad)


def test_slice_last_dim_is_a_view_on_numpy() -> None:
    backend = et.make_backend("numpy")
    host = np.arange(20, dtype=np.float32).reshape(4, 5)
    prefix = backend.slice_last_dim(host, 3)
    assert np.shares_memory(prefix, host)


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
@pytest.mark.parametrize("block", [1, 4096, 1 << 30])
def test_topk_matches_float64_reference(backend: Backend[Any], metric: Metric, block: int) -> None:
    corpus = clustered(700, 24, seed=3)
    queries = clustered(37, 24, seed=4)
    scores, indices = backend.topk(backend.from_numpy(queries), backend.from_numpy(corpus), 9, metric, max_block_bytes=block)
    assert scores.dtype == np.float32 and indices.dtype == np.int64
    assert_exact_topk(queries, corpus, metric, 9, indices, scores)
    order = scores if metric == "l2" else -scores
    assert (np.diff(order, axis=1) >= 0).all(), "best first"


@pytest.mark.parametrize("k", [1, 10, 60])
def test_cosine_topk_over_unit_rows_is_exact(backend: Backend[Any], k: int) -> None:
    """Rows normalised to float32 rounding (sentence embeddings) are selected on their unscaled
    products (their scales are within ``ROW_SCALE_SPREAD``), over several blocks from a sampled floor."""
    corpus = clustered(9000, 16, seed=11)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = clustered(12, 16, seed=12)
    scores, indices = backend.topk(backend.from_numpy(queries), backend.from_numpy(corpus), k, "cosine")
    assert_exact_topk(queries, corpus, "cosine", k, indices, scores)


def test_topk_uses_given_norms_and_handles_zero_rows(backend: Backend[Any]) -> None:
    corpus = clustered(50, 8, seed=1)
    corpus[[3, 10]] = 0.0
    x = backend.from_numpy(corpus)
    norms = backend.row_norms(x)
    queries = np.vstack([corpus[:4], np.zeros((1, 8), np.float32)])
    for metric in ("cosine", "l2", "dot"):
        scores, indices = backend.topk(backend.from_numpy(queries), x, 50, metric, corpus_norms=norms)
        assert np.isfinite(scores).all()
        assert sorted(indices[0].tolist()) == list(range(50))
    scores, indices = backend.topk(backend.from_numpy(queries), x, 5, "cosine")
    np.testing.assert_array_equal(indices[-1], [0, 1, 2, 3, 4])  # a zero query ties everywhere
    assert (scores[-1] == 0).all()


def test_topk_breaks_ties_by_lower_index(backend: Backend[Any]) -> None:
    corpus = np.tile(np.array([[1.0, 2.0, 3.0]], np.float32), (40, 1))
    corpus[17] = [3.0, 2.0, 1.0]  # the one distinct row scores lower for the query below
    q = np.array([1.0, 2.0, 3.0], np.float32)
    for metric in ("cosine", "dot", "l2"):
        _, indices = backend.topk(backend.from_numpy(q), backend.from_numpy(corpus), 5, metric)
        np.testing.assert_array_equal(indices, [[0, 1, 2, 3, 4]])
        _, all_rows = backend.topk(backend.from_numpy(q), backend.from_numpy(corpus), 40, metric)
        assert all_rows[0, -1] == 17 and all_rows[0, :5].tolist() == [0, 1, 2, 3, 4]


def test_topk_k_beyond_rows_and_bad_arguments(backend: Backend[Any]) -> None:
    corpus = backend.from_numpy(clustered(6, 4))
    q = backend.from_numpy(clustered(2, 4, seed=9))
    scores, indices = backend.topk(q, corpus, 100, "dot")
    assert scores.shape == indices.shape == (2, 6)
    with pytest.raises(InvalidArgumentError):
        backend.topk(q, corpus, 0, "dot")
    with pytest.raises(InvalidArgumentError):
        backend.topk(q, corpus, 3, "manhattan")  # type: ignore[arg-type]
    with pytest.raises(DimensionError):
        backend.topk(backend.from_numpy(np.ones((1, 5), np.float32)), corpus, 3, "dot")


def test_every_dtype_name_round_trips(backend: Backend[Any]) -> None:
    for name in get_args(DTypeName):
        if name == "float64" and (backend.name, backend.device) == ("mlx", "gpu"):
            continue  # Metal has no float64
        array = backend.zeros((2, 3), dtype=name)
        assert backend.dtype(array) == name
        assert backend.to_numpy(array).dtype == np.dtype(name)


def test_take_rows(backend: Backend[Any]) -> None:
    host = np.arange(20, dtype=np.float32).reshape(5, 4)
    a = backend.from_numpy(host)
    picked = backend.take_rows(a, np.array([[4, 0], [1, 1]], dtype=np.int64))
    assert backend.shape(picked) == (2, 2, 4)
    np.testing.assert_array_equal(backend.to_numpy(picked), host[[[4, 0], [1, 1]]])
    norms = backend.row_norms(a)
    np.testing.assert_allclose(backend.to_numpy(backend.take_rows(norms, np.array([3, 2], np.int64))), np.linalg.norm(host[[3, 2]], axis=1), rtol=1e-6)


@pytest.mark.parametrize("kind", ["float16", "bfloat16", "int8", "binary"])
def test_dequantize_matches_the_host_reference_for_any_leading_shape(backend: Backend[Any], kind: Any) -> None:
    x = clustered(24, 13, seed=9) * 5.0  # 13: binary rows end in a part-filled byte
    host = QuantizedIndex.build(kind, x)
    if kind == "float16":
        reference = x.astype(np.float16).astype(np.float32)
    elif kind == "bfloat16":
        reference = (np.asarray(host.codes, np.uint32) << np.uint32(16)).view(np.float32)
    elif kind == "binary":
        reference = np.where(x > 0, 1.0, -1.0).astype(np.float32)
    else:
        assert host.scale is not None and host.offset is not None
        reference = np.asarray(host.codes, np.float32) * host.scale + host.offset
    index = host.to_backend(backend)
    decoded = backend.to_numpy(index.decoder(backend)(index.codes))
    assert decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, reference, rtol=1e-6)
    picked = backend.take_rows(index.codes, np.array([[3, 0], [5, 5]], dtype=np.int64))
    np.testing.assert_allclose(backend.to_numpy(index.decoder(backend)(picked)), reference[[[3, 0], [5, 5]]], rtol=1e-6)


def test_dequantize_refuses_codes_it_cannot_read(backend: Backend[Any]) -> None:
    codes = backend.from_numpy(np.zeros((4, 2), np.uint8), dtype="uint8")
    scale = backend.from_numpy(np.ones(16, np.float32))
    with pytest.raises(DimensionError):
        backend.dequantize(codes, "binary", width=17)  # 17 bits need 3 bytes a row
    with pytest.raises(InvalidArgumentError):
        backend.dequantize(codes, "binary", width=16, scale=scale, offset=scale)
    with pytest.raises(InvalidArgumentError):
        backend.dequantize(backend.zeros((4, 16), dtype="int8"), "int8", width=16)
    with pytest.raises(InvalidArgumentError):
        backend.dequantize(codes, "int4", width=16)  # type: ignore[arg-type]


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
@pytest.mark.parametrize("kind", ["float16", "int8", "binary"])
def test_topk_over_codes_ranks_their_decoded_values(backend: Backend[Any], kind: Any, metric: Metric) -> None:
    x = clustered(700, 24, seed=11)
    q = clustered(9, 24, seed=12)
    index = QuantizedIndex.build(kind, x).to_backend(backend)
    decoded = backend.to_numpy(index.decoder(backend)(index.codes))
    norms = backend.row_norms(backend.from_numpy(x))
    # scores as the kernel ranks them: decoded rows, the original rows' norms
    raw = q.astype(np.float64) @ decoded.T.astype(np.float64)
    x_norms = np.linalg.norm(x.astype(np.float64), axis=1)
    ranking = {"dot": raw, "cosine": raw / x_norms, "l2": raw - 0.5 * x_norms**2}[metric]
    _, found = backend.topk(
        backend.from_numpy(q), index.codes, 20, metric, corpus_norms=norms, decode=index.decoder(backend), max_block_bytes=4096
    )
    chosen = np.take_along_axis(ranking, found, axis=1)
    cut = np.sort(ranking, axis=1)[:, ::-1][:, 19:20]
    assert (chosen >= cut - 1e-4 * np.abs(cut)).all()  # the 20 best by decoded values, ties aside
    assert all(len(set(row)) == 20 for row in found.tolist())
    if metric != "dot":
        with pytest.raises(InvalidArgumentError, match="corpus_norms"):
            backend.topk(backend.from_numpy(q), index.codes, 5, metric, decode=index.decoder(backend))


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
@pytest.mark.parametrize("k", [150, 700])
def test_large_k_is_exact(backend: Backend[Any], metric: Metric, k: int) -> None:
    """k + 1 >= SAMPLED_FLOOR_MIN over several blocks: the driver starts from a sampled floor."""
    corpus = clustered(9000, 16, seed=5)
    queries = clustered(12, 16, seed=6)
    scores, indices = backend.topk(backend.from_numpy(queries), backend.from_numpy(corpus), k, metric)
    assert_exact_topk(queries, corpus, metric, k, indices, scores)


def test_large_k_with_a_row_mask_is_exact_among_unmasked_rows(backend: Backend[Any]) -> None:
    corpus = clustered(9000, 16, seed=7)
    queries = clustered(5, 16, seed=8)
    keep = np.random.default_rng(0).random(9000) < 0.5
    _, indices = backend.topk(backend.from_numpy(queries), backend.from_numpy(corpus), 300, "cosine", row_mask=keep)
    rows = np.flatnonzero(keep)
    ref = reference_scores(queries, corpus[rows], "cosine")
    expected = rows[np.argsort(-ref, axis=1, kind="stable")[:, :300]]
    assert keep[indices].all()
    np.testing.assert_array_equal(np.sort(indices, axis=1), np.sort(expected, axis=1))


def test_large_k_is_exact_when_the_sample_overrates_the_table(backend: Backend[Any]) -> None:
    """Rows the stride samples are the query's near-duplicates, so every sampled row scores far above
    the true (k+1)-th best: the floor starves the query, and the driver must redo it without one."""
    corpus, query, m = sample_adversary()
    queries = np.vstack([query, 2 * query])  # a batch: one query alone is searched in one block, with no floor
    scores = reference_scores(queries, corpus, "dot").astype(np.float32)
    floor = sampled_floor(lambda rows, n: host_nth_best(scores[:, rows], n), len(corpus), m, None, 1 << 20)
    true_mth = np.sort(scores, axis=1)[:, -m]
    assert floor is not None and (floor > true_mth).all()
    x = backend.from_numpy(corpus)
    scores, indices = backend.topk(backend.from_numpy(queries), x, m - 1, "dot")
    assert_exact_topk(queries, corpus, "dot", m - 1, indices, scores)
    # a decoded corpus skips the tie redo, which would otherwise also mend a starved query
    scores, indices = backend.topk(backend.from_numpy(queries), x, m - 1, "dot", decode=lambda codes: codes)
    assert_exact_topk(queries, corpus, "dot", m - 1, indices, scores)


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_small_k_over_full_blocks_is_exact(backend: Backend[Any], metric: Metric) -> None:
    """Blocks of 4,096 rows and k=10: NumPy's first block is thresholded by the m-th best of its
    head rows. Queries near rows of the first block put their best rows in it, and beyond the head."""
    corpus = clustered(9000, 16, seed=9)
    queries = np.vstack([corpus[[5, 1500, 3000, 4000]] + 0.01, clustered(4, 16, seed=10)])
    scores, indices = backend.topk(backend.from_numpy(queries), backend.from_numpy(corpus), 10, metric)
    assert_exact_topk(queries, corpus, metric, 10, indices, scores)
    keep = np.arange(9000) % 3 != 0
    _, masked = backend.topk(backend.from_numpy(queries), backend.from_numpy(corpus), 10, metric, row_mask=keep)
    rows = np.flatnonzero(keep)
    ref = reference_scores(queries, corpus[rows], metric)
    np.testing.assert_array_equal(np.sort(masked, axis=1), np.sort(rows[np.argsort(-ref, axis=1, kind="stable")[:, :10]], axis=1))
