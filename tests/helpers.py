"""Shared test data and the float64 brute-force reference every search is checked against."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from embedtools import Metric, NumpyBackend

F32 = npt.NDArray[np.float32]


def clustered(rows: int, dim: int, *, clusters: int = 8, seed: int = 0) -> F32:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    data = centres[rng.integers(0, clusters, rows)] + 0.6 * rng.standard_normal((rows, dim))
    return data.astype(np.float32)


def reference_scores(queries: npt.NDArray[Any], corpus: npt.NDArray[Any], metric: Metric) -> npt.NDArray[np.float64]:
    """Scores in float64 where larger is better (negated distance for l2)."""
    q = np.atleast_2d(queries).astype(np.float64)
    x = np.asarray(corpus, dtype=np.float64)
    if metric == "dot":
        out: npt.NDArray[np.float64] = q @ x.T
        return out
    if metric == "cosine":
        qn = np.linalg.norm(q, axis=1, keepdims=True)
        xn = np.linalg.norm(x, axis=1, keepdims=True)
        qn[qn == 0] = 1.0
        xn[xn == 0] = 1.0
        cos: npt.NDArray[np.float64] = (q / qn) @ (x / xn).T
        return cos
    dist: npt.NDArray[np.float64] = -np.sqrt(((q[:, None, :] - x[None, :, :]) ** 2).sum(axis=2))
    return dist


def assert_exact_topk(
    queries: npt.NDArray[Any],
    corpus: npt.NDArray[Any],
    metric: Metric,
    k: int,
    indices: npt.NDArray[np.int64],
    scores: npt.NDArray[np.float32],
    *,
    tol: float = 1e-4,
) -> None:
    """``indices`` is a true top-k by the float64 reference, except for swaps within ``tol`` (ties).

    Each returned row's reference score must equal the reference's i-th best score up to ``tol``
    (relative to the score scale); and the returned scores must match the reference for those rows.
    """
    ref = reference_scores(queries, corpus, metric)
    kk = min(k, corpus.shape[0])
    assert indices.shape == scores.shape == (ref.shape[0], kk)
    best = -np.sort(-ref, axis=1)[:, :kk]
    got = np.take_along_axis(ref, indices, axis=1)
    scale = max(float(np.abs(ref).max()), 1.0)
    np.testing.assert_allclose(got, best, atol=tol * scale, rtol=0)
    shown = -scores.astype(np.float64) if metric == "l2" else scores.astype(np.float64)
    np.testing.assert_allclose(shown, got, atol=tol * scale, rtol=0)
    for row in indices:
        assert len(set(row.tolist())) == kk, "a row was returned twice"


def matryoshka_like(rows: int, dim: int, *, seed: int = 0, clusters: int = 20) -> F32:
    """Clusters whose variance falls along the dimensions (PCA-rotated), so prefixes carry the most."""
    rng = np.random.default_rng(seed)
    scale = np.exp(-np.arange(dim) / (dim / 6))
    centres = rng.standard_normal((clusters, dim)) * scale
    data = centres[rng.integers(0, clusters, rows)] + 0.3 * rng.standard_normal((rows, dim)) * scale
    return data.astype(np.float32)


def sample_adversary() -> tuple[F32, F32, int]:
    """``(corpus, query, m)``: every ``SAMPLE_STRIDE``-th row is a near-duplicate of the query, so a
    strided sample holds far more of its top ``m`` than its share."""
    from embedtools.search import SAMPLE_STRIDE

    rng = np.random.default_rng(11)
    corpus = rng.standard_normal((9000, 16)).astype(np.float32)
    query = rng.standard_normal((1, 16)).astype(np.float32)
    near = np.arange(0, 9000, SAMPLE_STRIDE)
    corpus[near] = 3 * query + 0.05 * rng.standard_normal((near.size, 16)).astype(np.float32)
    return corpus, query, 400


class GatherCounting(NumpyBackend):
    """A NumPy backend that records how many rows each ``take_rows`` gathers."""

    def __init__(self) -> None:
        super().__init__()
        self.gathered: list[int] = []

    def take_rows(self, array: npt.NDArray[Any], indices: npt.NDArray[np.int64]) -> npt.NDArray[Any]:
        self.gathered.append(int(np.asarray(indices).size))
        return super().take_rows(array, indices)
