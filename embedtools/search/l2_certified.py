"""The certified exact l2 top-k: screen in float32, bound the screen's error, rescore what the bound keeps in float64.

A float32 GEMM ranks millions of rows fast but not exactly: ``l2`` ranks by ``q·x - |x|²/2``,
whose rounding error grows with ``|q||x| + |x|²`` while the gaps it must resolve shrink with the
distances (rows ``1000 + 0.01·N(0,1)`` lose every digit). Instead of trusting the screen, this
module proves what it can and rescores the rest exactly, backend-neutrally (rows are gathered
with ``take_rows`` and scored on the host in float64, from the stored float32 rows, by
:mod:`embedtools.search.rescore`):

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
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from embedtools.protocols import ArrayBackend
from embedtools.search.certified import Certified, Listed, certified_topk
from embedtools.search.rescore import exact_topk_over, host64, norms64, shortlist_ranks

__all__ = [
    "IDENTITY",
    "PLAIN_RANGE",
    "Frame",
    "L2Screen",
    "Screened",
    "first_shortlist",
    "frame_queries",
    "l2_bound",
    "l2_topk",
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
    sample = host64(backend, backend.take_rows(corpus, rows[::stride]))
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
    raw_norms = norms64(queries)
    frames = [IDENTITY if _plain_range(norm_max, raw_norms) else _centred_frame(backend, corpus, rows, queries, norm_max)[0]]

    def listed(which: npt.NDArray[np.intp], width: int) -> Listed:
        frame = frames[0]
        fq = frame_queries(queries[which], frame)
        screened = screen(fq, width, frame)
        bound = l2_bound(dim, norms64(fq), screened.norm_max)
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
