"""Exact rescoring of shortlists: each query's own candidate rows scored on the host, exactly.

The funnel's later stages, quantised search's rescoring, settled near-ties and every certified
search end here: rows are gathered on the backend (``take_rows``) and scored on the host —
cosine and dot as the full search's float32 GEMM scores them (:func:`rescore_shortlists`), or in
float64 (:func:`exact_ranks`: l2 from float64 differences, so offset data loses nothing) where a
certificate needs exact ranks — in blocks that stay within a byte budget, ties to the lower row
index. The certified exact l2 top-k that rescores its float32 screen here is
:mod:`embedtools.search.l2_certified`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from embedtools.backends._norms import COSINE_RANGE
from embedtools.protocols import ArrayBackend, ArrayT, HostFloat, Metric, block_primitives
from embedtools.search.certified import top_by_rank

__all__ = [
    "GATHER_BLOCK_BYTES",
    "exact_ranks",
    "exact_topk_over",
    "host64",
    "host_product",
    "norms64",
    "ranks_to_scores",
    "rescore",
    "rescore_shortlists",
    "shortlist_ranks",
]

F32 = np.float32
#: Largest gathered block of shortlist rows (with its float64 copies): a block that stays in
#: cache is gathered and scored faster than one as large as the search's score block may be.
GATHER_BLOCK_BYTES = 16 << 20


def norms64(a: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """Row norms of float32 rows, accumulated in float64."""
    out: npt.NDArray[np.float64] = np.sqrt(np.einsum("...d,...d->...", a, a, dtype=np.float64))
    return out


HostRows = npt.NDArray[np.float32] | npt.NDArray[np.float64]


def exact_ranks(
    queries: npt.NDArray[np.float64],
    rows: HostRows,
    metric: Metric,
    row_norms: npt.NDArray[np.float64] | None = None,
) -> npt.NDArray[np.float64]:
    """float64 scores where larger is better: ``(q, d)`` queries against ``(q, m, d)`` rows (each
    query its own) or ``(m, d)`` rows (shared). ``l2`` is ``-Σ(q - x)²``; cosine divides by the
    rows' norms (``row_norms``, e.g. the original rows' when ``rows`` are decoded codes) and the
    query's, zero norms counting as one so that zero vectors score 0. float32 rows are widened
    inside each product, a buffer at a time, to the same float64 values a float64 copy would
    hold: a shortlist's float64 copy cost more than the products themselves."""
    shared = rows.ndim == 2
    if metric == "l2":
        diff = (rows[None, :, :] if shared else rows) - queries[:, None, :]
        l2: npt.NDArray[np.float64] = -np.einsum("qmd,qmd->qm", diff, diff)
        return l2
    if shared:
        dots: npt.NDArray[np.float64] = queries @ rows.T.astype(np.float64, copy=False)
    else:
        dots = np.einsum("qmd,qd->qm", rows, queries, dtype=np.float64)
    if metric == "dot":
        return dots
    xn = np.sqrt(np.einsum("...d,...d->...", rows, rows, dtype=np.float64)) if row_norms is None else row_norms
    qn = np.sqrt(np.einsum("qd,qd->q", queries, queries))
    cos: npt.NDArray[np.float64] = dots / np.where(xn > 0, xn, 1.0) / np.where(qn > 0, qn, 1.0)[:, None]
    return cos


def ranks_to_scores(ranks: npt.NDArray[np.float64], metric: Metric) -> npt.NDArray[np.float32]:
    """Returned scores: distances for ``l2``, the scores themselves otherwise, as float32."""
    with np.errstate(over="ignore"):  # a dot product beyond float32 is returned as inf, as the GEMM's
        if metric == "l2":
            return np.sqrt(np.maximum(-ranks, 0.0)).astype(F32)
        return ranks.astype(F32)


def host_product(backend: ArrayBackend[Any], a: npt.NDArray[HostFloat], b: npt.NDArray[HostFloat]) -> npt.NDArray[HostFloat]:
    """``np.matmul(a, b)`` on ``backend``'s own host threads where it has them
    (:meth:`~embedtools.protocols.BlockPrimitives.host_matmul`), NumPy's otherwise."""
    blocks = block_primitives(backend)
    out: npt.NDArray[HostFloat] = np.matmul(a, b) if blocks is None else blocks.host_matmul(a, b)
    return out


def host64(backend: ArrayBackend[Any], array: Any) -> npt.NDArray[np.float64]:
    """A backend array on the host as float64."""
    return np.asarray(backend.to_numpy(array), dtype=np.float64)


def _float_rows(host: npt.NDArray[Any]) -> HostRows:
    """Rows for :func:`exact_ranks`: float32 or float64 ones as they are, anything else as float64."""
    return cast("HostRows", host) if host.dtype in (np.dtype(np.float32), np.dtype(np.float64)) else host.astype(np.float64)


def _host_rows(backend: ArrayBackend[Any], array: Any) -> HostRows:
    return _float_rows(np.asarray(backend.to_numpy(array)))


def rescore_shortlists(
    backend: ArrayBackend[Any],
    queries: npt.NDArray[np.float32],
    corpus: Any,
    shortlists: npt.NDArray[np.int64],
    k: int,
    metric: Metric,
    max_block_bytes: int,
    *,
    decode: Callable[[Any], Any] | None = None,
    norms: Any = None,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Each query's own candidate rows (``(q, m)`` indices into ``corpus``, ``-1`` unused) scored
    exactly for ``l2`` (:func:`exact_ranks`) and as the full search's GEMM scores them for cosine
    and dot (:func:`_gemm_ranks`); the best ``k`` ranks and indices. Gathered in blocks of queries and
    candidates whose float64 copies stay within ``max_block_bytes``; ``decode`` turns gathered
    codes into rows, ``norms`` (cosine) are the rows' norms to divide by."""
    n_queries, m = shortlists.shape
    dim = queries.shape[1]
    k = min(k, m)
    q64 = queries.astype(np.float64)
    if metric == "cosine":  # unit queries, so that products stay within float32 (a query of 1e20s)
        q_norms = np.sqrt(np.einsum("qd,qd->q", q64, q64))
        q32 = (q64 / np.where(q_norms > 0, q_norms, 1.0)[:, None]).astype(F32)
    else:
        q32 = np.asarray(queries, dtype=F32)
    out_ranks = np.empty((n_queries, k), dtype=np.float64)
    out_idx = np.empty((n_queries, k), dtype=np.int64)
    per_candidate = 3 * 8 * max(dim, 1)
    cols = max(min(m, max_block_bytes // per_candidate), 1)
    step = max(min(max_block_bytes, GATHER_BLOCK_BYTES) // (per_candidate * cols), 1)
    # One column block (the usual shortlist): every query's ranks are kept, shortlist-sized, and
    # ordered by one top_by_rank at the end, not by one per block of queries.
    whole = np.empty((n_queries, m), dtype=np.float64) if cols >= m else None
    for q0 in range(0, n_queries, step):
        qs = slice(q0, min(q0 + step, n_queries))
        best_r, best_i = np.full((qs.stop - qs.start, 0), -np.inf), np.empty((qs.stop - qs.start, 0), dtype=np.int64)
        for c0 in range(0, m, cols):
            idx = shortlists[qs, c0 : c0 + cols]
            valid = idx >= 0
            complete = bool(valid.all())
            safe = idx if complete else np.where(valid, idx, 0)
            gathered = backend.take_rows(corpus, safe)
            host = np.asarray(backend.to_numpy(gathered if decode is None else decode(gathered)))
            if metric == "l2":
                ranks = exact_ranks(q64[qs], _float_rows(host), "l2")
            else:
                row_norms = None if norms is None else host64(backend, backend.take_rows(norms, safe))
                ranks = _gemm_ranks(np.asarray(host, dtype=F32), q32[qs], q64[qs], metric, row_norms)
            if not complete:
                ranks = np.where(valid, ranks, -np.inf)
            if whole is not None:
                whole[qs] = ranks
            else:
                best_r, best_i = top_by_rank(np.hstack([best_r, ranks]), np.hstack([best_i, idx]), k)
        if whole is None:
            out_ranks[qs], out_idx[qs] = best_r, best_i
    if whole is not None:
        out_ranks, out_idx = top_by_rank(whole, shortlists, k)
    return out_ranks, out_idx


def _gemm_ranks(
    rows: npt.NDArray[np.float32],
    unit_or_raw: npt.NDArray[np.float32],
    queries: npt.NDArray[np.float64],
    metric: Metric,
    row_norms: npt.NDArray[np.float64] | None,
) -> npt.NDArray[np.float64]:
    """Cosine or dot of ``(q, m, d)`` rows against their queries as the exact search scores them:
    a float32 product (cosine: of the unit query, divided by the row's norm), so a shortlist
    costs what the full search's GEMM would; rows whose norm is beyond :data:`COSINE_RANGE`,
    where that product loses precision, are scored in float64 instead. It is NumPy's own einsum
    loop, not a BLAS call: each query's product is a matrix-vector one, as fast there, and it
    wakes no BLAS threads to spin beside a torch search."""
    with np.errstate(over="ignore", under="ignore"):  # as the BLAS GEMM: inf beyond float32, silently
        dots: npt.NDArray[np.float64] = np.einsum("qmd,qd->qm", rows, unit_or_raw).astype(np.float64)
    if metric == "dot":
        return dots
    norms = norms64(rows) if row_norms is None else row_norms
    low, high = COSINE_RANGE
    out: npt.NDArray[np.float64] = dots / np.where(norms > 0, norms, 1.0)
    odd = (norms > 0) & ((norms < low) | (norms > high))
    if odd.any():
        which, _ = np.nonzero(odd)
        out[odd] = exact_ranks(queries[which], rows[odd].astype(np.float64)[:, None, :], "cosine")[:, 0]
    return out


def exact_topk_over(
    backend: ArrayBackend[Any],
    queries: npt.NDArray[np.float32],
    corpus: Any,
    rows: npt.NDArray[np.int64],
    k: int,
    metric: Metric,
    max_block_bytes: int,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Every query's exact best ``k`` among the corpus rows ``rows`` (1-D): the slow path for
    what the float32 kernel cannot score (rows outside its range, shortlists that will not
    certify), walked in blocks of rows so memory stays within ``max_block_bytes``."""
    n_queries, dim = queries.shape
    q64 = queries.astype(np.float64)
    k = min(k, rows.size)
    per_row = 8 * max(dim, 1) * (3 * n_queries if metric == "l2" else 2) + 16 * n_queries
    block = max(max_block_bytes // per_row, 1)
    best_r = np.full((n_queries, 0), -np.inf)
    best_i = np.empty((n_queries, 0), dtype=np.int64)
    for r0 in range(0, rows.size, block):
        idx = rows[r0 : r0 + block]
        ranks = exact_ranks(q64, _host_rows(backend, backend.take_rows(corpus, idx)), metric)
        cand = np.broadcast_to(idx, ranks.shape)
        best_r, best_i = top_by_rank(np.hstack([best_r, ranks]), np.hstack([best_i, cand]), k)
    return best_r, best_i


def shortlist_ranks(
    backend: ArrayBackend[Any],
    queries: npt.NDArray[np.float32],
    corpus: Any,
    shortlists: npt.NDArray[np.int64],
    metric: Metric,
    max_block_bytes: int,
) -> npt.NDArray[np.float64]:
    """:func:`exact_ranks` of each query's own ``(q, m)`` rows of ``corpus`` (``-1``: ``-inf``),
    gathered in blocks of queries whose float64 copies stay within ``max_block_bytes``."""
    n_queries, m = shortlists.shape
    out = np.full((n_queries, m), -np.inf)
    if not m or not n_queries:
        return out
    q64 = queries.astype(np.float64)
    step = max(max_block_bytes // (3 * 8 * max(queries.shape[1], 1) * m), 1)
    for q0 in range(0, n_queries, step):
        qs = slice(q0, min(q0 + step, n_queries))
        idx = shortlists[qs]
        valid = idx >= 0
        host = _host_rows(backend, backend.take_rows(corpus, np.where(valid, idx, 0)))
        out[qs] = np.where(valid, exact_ranks(q64[qs], host, metric), -np.inf)
    return out


def rescore(
    backend: ArrayBackend[ArrayT],
    queries: npt.NDArray[np.float32],
    corpus: ArrayT,
    norms: ArrayT | None,
    candidates: npt.NDArray[np.int64],
    metric: Metric,
    keep: int,
    max_block_bytes: int,
    decode: Callable[[ArrayT], ArrayT] | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Exact scores of each query's candidate rows of ``corpus`` (at the queries' width); the best ``keep``.

    The funnel's later stages and quantised search's rescoring both end here: the shortlist's rows
    are gathered on the backend (``take_rows``) and scored on the host in float64
    (:func:`rescore_shortlists`: cosine and dot by a float32 product as
    the full search scores them, rows whose norm is beyond float32's comfortable range exactly;
    ``l2`` as ``||q - x||`` from float64 differences, so offset data loses nothing), in blocks that stay
    within ``max_block_bytes``; ties go to the lower row index. With ``decode``, ``corpus`` is a
    quantised index's codes and the gathered rows are decoded first.
    """
    ranks, indices = rescore_shortlists(
        backend, queries, corpus, candidates, keep, metric, max_block_bytes, decode=decode, norms=norms
    )
    return ranks_to_scores(ranks, metric), indices
