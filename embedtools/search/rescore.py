"""Exact rescoring of shortlists, and the certified exact l2 top-k: screen in float32, bound the screen's error, rescore what the bound keeps in float64.

A float32 GEMM ranks millions of rows fast but not exactly: ``l2`` ranks by ``q·x - |x|²/2``,
whose rounding error grows with ``|q||x| + |x|²`` while the gaps it must resolve shrink with the
distances (rows ``1000 + 0.01·N(0,1)`` lose every digit). Instead of trusting the screen, this
module proves what it can and rescores the rest exactly, backend-neutrally (rows are gathered
with ``take_rows`` and scored on the host in float64, from the stored float32 rows):

1. **Bound.** For a row ``x`` and query ``q`` in the screen's frame (below), the float32 ranking
   score ``s = fl(fl(x̃·q̃) - fl(|x̃|²/2))`` differs from the exact ``r = x'·q' - |x'|²/2`` by at
   most ``B = κ·(|q̃|·N + N²) + δ``, ``N`` the largest row norm, ``κ = 1.25·(2d + 16)·u``
   (``u = 2⁻²⁴``): the GEMM's ``γ_d·|q̃||x̃|`` (any summation order, FMA or not), the rounding
   of the frame's rows and query (``u`` each, relative), the norm's own ``(d + 2)·u`` doubled by
   squaring, and the final subtraction's ``u·(|x̃·q̃| + |x̃|²/2)``, with a quarter to spare.
   ``δ`` covers the absolute error of products that underflow (subnormal or flushed to zero).
   ``r`` orders rows as ``-||q - x||`` does, since ``||q' - x'||² = |q'|² - 2r`` and the frame
   only translates and scales.
2. **Shortlist.** The screen lists each query's best rows by ``s + B``, an upper bound on ``r``;
   :func:`~embedtools.search.certified.certified_topk` rescores the first ``m = 2k + 2`` exactly
   and certifies the query when the next listed row's upper bound is strictly below the exact
   k-th (in the frame's units: ``r' = (|q'|² - scale²·||q - x||²)/2``). Others rescore or are
   screened again with eight times the ``m``, and a query that would need more than
   :data:`~embedtools.search.certified.SHORTLIST_MAX` (or a fraction of the table) is scored
   exactly over every row, in blocks — adversarial data costs time, never memory or correctness.
3. **Frame.** Data far from the origin (a large common offset) makes ``B`` as large as the
   norms; a query that fails to certify is screened again in a centred frame (where the centre is
   at least a quarter of the spread around it; otherwise centring gains nothing and the shortlist
   grows instead): rows and queries are ``x·s - c`` with ``c`` the (float32) mean of a strided sample of the rows (any centre is
   correct, since the bound covers its rounding; a sample mean is as good as the exact one for
   shrinking the norms and costs ``take_rows`` of ~1,000 rows, not a pass over the table), and
   ``s`` a power of two bringing the magnitudes near 1, so that data near float32's ends
   (``1e20``, whose ``|x|²`` overflows; ``1e-30``, whose products underflow) screens in range.
   The frame is applied block by block inside the backend's own kernel, so no table-sized copy
   is made; data that needs no frame (magnitudes within ``2^±40``) runs the plain kernel with
   the stored norms, and pays only for the bound and the float64 rescoring of ``m = 2k + 2`` rows.
   Nothing is kept with the table: a frame's norms are one more pass, only when a frame is needed.
4. **Rescore.** The shortlist's rows are scored in float64 (``-Σ(q - x)²``, differences taken in
   float64, so no cancellation) and the best ``k`` kept, ties to the lower row index; returned
   distances are those float64 distances rounded to float32.

The bound assumes true float32 products (not TF32 or bfloat16 passes, which a user can enable in
torch with ``set_float32_matmul_precision``); the rest holds for any summation order.
The low-precision screens run the same loop with their own bounds (:mod:`embedtools.search.screening`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import numpy as np
import numpy.typing as npt

from embedtools.backends._norms import COSINE_RANGE
from embedtools.protocols import ArrayBackend, ArrayT, HostFloat, Metric, block_primitives
from embedtools.search.certified import SHORTLIST_MAX, Certified, Listed, certified_topk, top_by_rank

__all__ = [
    "IDENTITY",
    "SHORTLIST_MAX",
    "Frame",
    "L2Screen",
    "Screened",
    "exact_ranks",
    "first_shortlist",
    "exact_topk_over",
    "l2_bound",
    "l2_topk",
    "ranks_to_scores",
    "rescore",
    "rescore_shortlists",
    "shortlist_ranks",
    "top_by_rank",
]

F32 = np.float32
#: float32's unit roundoff.
U = 2.0**-24
#: Magnitudes (row and query norms) the plain float32 kernel screens in without a frame.
PLAIN_RANGE = (2.0**-40, 2.0**40)
def first_shortlist(k: int) -> int:
    """Rows per query the first screen keeps: with twice ``k`` (plus two), a query fails to
    certify only if ``k + 2`` further rows crowd within ``2B`` of its k-th, which on data that
    needs no frame is rare enough that the rerun it costs does not show; the float64 rescoring of
    ``2k + 2`` rows is a gather of a few hundred rows per query."""
    return 2 * k + 2


#: Rows sampled (strided) for a centred frame's centre.
CENTRE_SAMPLE = 1024
#: Largest gathered block of shortlist rows (with its float64 copies): a block that stays in
#: cache is gathered and scored faster than one as large as the search's score block may be.
GATHER_BLOCK_BYTES = 16 << 20


class Frame(NamedTuple):
    """Screening coordinates ``x·scale - centre``: ``scale`` a power of two, ``centre`` float32 in scaled units."""

    centre: npt.NDArray[np.float32] | None
    scale: float


IDENTITY = Frame(None, 1.0)


class Screened(NamedTuple):
    """A screen's best ``m`` per query (ranking scores, best first) and the largest float32 norm of its frame's rows."""

    values: npt.NDArray[np.float32]
    indices: npt.NDArray[np.int64]
    norm_max: float


L2Screen = Callable[[npt.NDArray[np.float32], int, Frame], Screened]
"""``screen(frame_queries, m, frame)``: the backend's float32 top ``m`` by ``x̃·q̃ - |x̃|²/2``, with
``x̃ = x·scale - centre`` computed block by block in float32 (masked rows ranked ``-inf``)."""


def frame_queries(queries: npt.NDArray[np.float32], frame: Frame) -> npt.NDArray[np.float32]:
    """Queries in ``frame``, by the same float32 operations the backends apply to rows."""
    q = np.asarray(queries, dtype=F32)
    if frame.scale != 1.0:
        q = q * F32(frame.scale)
    if frame.centre is not None:
        q = q - frame.centre
    return np.ascontiguousarray(q, dtype=F32)


def l2_bound(dim: int, query_norms: npt.NDArray[np.float64], norm_max: float) -> npt.NDArray[np.float64]:
    """Each query's bound on ``|s - r|`` over every row (module docstring, step 1)."""
    n = norm_max * (1 + (dim + 4) * U)  # the float32 norm may be below the true one by (d + 2)u
    kappa = 1.25 * (2 * dim + 16) * U
    delta = (dim + 4) * 2.0**-120 * (1 + query_norms + 3 * n)
    out: npt.NDArray[np.float64] = kappa * (query_norms * n + n * n) + delta
    return out


def _norms64(a: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
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


def _host64(backend: ArrayBackend[Any], array: Any) -> npt.NDArray[np.float64]:
    return np.asarray(backend.to_numpy(array), dtype=np.float64)


def _float_rows(host: npt.NDArray[Any]) -> HostRows:
    """Rows for :func:`exact_ranks`: float32 or float64 ones as they are, anything else as float64."""
    return cast("HostRows", host) if host.dtype in (np.float32, np.float64) else host.astype(np.float64)


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
                row_norms = None if norms is None else _host64(backend, backend.take_rows(norms, safe))
                ranks = _gemm_ranks(backend, np.asarray(host, dtype=F32), q32[qs], q64[qs], metric, row_norms)
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
    backend: ArrayBackend[Any],
    rows: npt.NDArray[np.float32],
    unit_or_raw: npt.NDArray[np.float32],
    queries: npt.NDArray[np.float64],
    metric: Metric,
    row_norms: npt.NDArray[np.float64] | None,
) -> npt.NDArray[np.float64]:
    """Cosine or dot of ``(q, m, d)`` rows against their queries as the exact search scores them:
    a float32 product (cosine: of the unit query, divided by the row's norm), so a shortlist
    costs what the full search's GEMM would; rows whose norm is beyond :data:`COSINE_RANGE`,
    where that product loses precision, are scored in float64 instead."""
    with np.errstate(over="ignore", under="ignore"):  # as the BLAS GEMM: inf beyond float32, silently
        dots: npt.NDArray[np.float64] = host_product(backend, rows, unit_or_raw[:, :, None])[..., 0].astype(np.float64)
    if metric == "dot":
        return dots
    norms = _norms64(rows) if row_norms is None else row_norms
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


def _scale_for(magnitude: float) -> float:
    """A power of two taking ``magnitude`` into [0.5, 1), within float32's normal range."""
    if not math.isfinite(magnitude):
        return 2.0**-126
    if magnitude <= 0:
        return 1.0
    exponent = math.frexp(magnitude)[1]
    return 2.0 ** -min(max(exponent, -100), 126)


def _centred_frame(
    backend: ArrayBackend[Any], corpus: Any, rows: npt.NDArray[np.int64], queries: npt.NDArray[np.float32], norm_max: float
) -> tuple[Frame, bool]:
    """A frame centred on a strided sample's mean and scaled so that the sample and the queries
    sit near 1 and no row (at most ``norm_max + |centre|`` from it) beyond 2**40; and whether
    centring shrinks the norms much (the centre is at least a quarter of the spread around it)."""
    stride = max(rows.size // CENTRE_SAMPLE, 1)
    sample = _host64(backend, backend.take_rows(corpus, rows[::stride]))
    centre = sample.mean(axis=0)
    spread = max(
        float(np.sqrt(((sample - centre) ** 2).sum(axis=1)).max(initial=0.0)),
        float(np.sqrt(((queries - centre) ** 2).sum(axis=1)).max(initial=0.0)),
    )
    offset = float(np.sqrt((centre**2).sum()))
    scale = _scale_for(max(spread, (norm_max + offset) * 2.0**-40))
    return Frame((centre * scale).astype(F32), scale), offset >= spread / 4


def _plain_range(norm_max: float, query_norms: npt.NDArray[np.float64]) -> bool:
    low, high = PLAIN_RANGE
    q_max = float(query_norms.max(initial=0.0))
    return norm_max <= high and q_max <= high and (norm_max == 0 or norm_max >= low) and (q_max == 0 or q_max >= low)


def l2_topk(
    backend: ArrayBackend[Any],
    queries: npt.NDArray[np.float32],
    corpus: Any,
    k: int,
    *,
    n_rows: int,
    norm_max: float,
    row_mask: npt.NDArray[np.bool_] | None,
    max_block_bytes: int,
    screen: L2Screen,
) -> Certified:
    """Exact ``l2`` top-k (exact ranks, ties to the lower index) for any finite float32 rows and
    queries: the backend's float32 ``screen``, certified by
    :func:`~embedtools.search.certified.certified_topk` with the bound of step 1 and rescored in
    float64 (steps 2–4). ``norm_max`` is the largest float32 norm of ``corpus``'s rows."""
    n_queries, dim = queries.shape
    rows = np.arange(n_rows, dtype=np.int64) if row_mask is None else np.flatnonzero(row_mask).astype(np.int64)
    available = int(rows.size)
    raw_norms = _norms64(queries)
    frames = [IDENTITY if _plain_range(norm_max, raw_norms) else _centred_frame(backend, corpus, rows, queries, norm_max)[0]]

    def listed(which: npt.NDArray[np.intp], width: int) -> Listed:
        frame = frames[0]
        fq = frame_queries(queries[which], frame)
        screened = screen(fq, width, frame)
        bound = l2_bound(dim, _norms64(fq), screened.norm_max)
        upper = screened.values.astype(np.float64) + bound[:, None]
        q_exact = queries[which].astype(np.float64) * frame.scale
        if frame.centre is not None:
            q_exact = q_exact - frame.centre.astype(np.float64)
        scale = np.full(which.size, frame.scale**2 / 2)
        return Listed(upper, screened.indices, scale, np.einsum("qd,qd->q", q_exact, q_exact) / 2)

    def refine(which: npt.NDArray[np.intp]) -> bool:
        if frames[0] is not IDENTITY:
            return False  # centred data gains nothing from a frame: straight to a longer shortlist
        offset_frame, useful = _centred_frame(backend, corpus, rows, queries[which], norm_max)
        if useful:
            frames[0] = offset_frame
        return useful

    def exact(which: npt.NDArray[np.intp], idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        return shortlist_ranks(backend, queries[which], corpus, idx, "l2", max_block_bytes)

    def fallback(which: npt.NDArray[np.intp]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
        return exact_topk_over(backend, queries[which], corpus, rows, k, "l2", max_block_bytes)

    first = first_shortlist(k)
    return certified_topk(n_queries, k, available, screen=listed, exact=exact, fallback=fallback, first=first,
                          width=first + 1, refine=refine)  # fmt: skip


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
