"""Certified searches: which screen runs, with which bound, and what it falls back to.

Each search here is :func:`~embedtools.search.certified.certified_topk` with one screen
(:mod:`embedtools.search.certified` derives the bounds), rescored in float64 from the stored
float32 rows, falling back in two steps: a query that a low-precision or prefix screen cannot
certify within :data:`~embedtools.search.certified.SHORTLIST_MAX` rows (or :data:`FALLBACK_SHARE`
of the table, whichever is fewer) is certified again by the
float32 screen (bound ~``d·2⁻²⁴``), and one that fails there too is scored exactly over every row
in blocks. Whatever the data, ids are the exact top k (ties to the lower row index).

* **Low precision** (``bfloat16``, ``float16``; ``int8``): the quantised index's codes through the
  backend's native product (:meth:`~embedtools.protocols.BlockPrimitives.low_precision`; int8's is
  an integer product over the queries' int8 steps, :mod:`embedtools.search.int8_screen`) where it
  measured faster than float32 (:meth:`~embedtools.protocols.BlockPrimitives.gemm_speedup`) or,
  otherwise (NumPy, MLX's int8, torch's float16 on most CPUs), decoded block by block to float32.
* **Prefix** (the certified funnel): for a prefix of width ``p`` (the table's first ``p`` columns, or
  its rotation's), ``q·x = q_p·x_p + q_t·x_t <= q_p·x_p + |q_t||x_t|``. With rows
  ``A = [x_p, |x_t|] / |x|`` and queries ``[q_p, |q_t|]`` the upper bound is one GEMM of width
  ``p + 1``: cosine reads it as is (unit queries), dot and l2 scale it by ``|x|`` (l2 then subtracts
  ``|x|²/2``). ``A`` is computed once per table version and width and kept through the store's
  budgeted cache. With a rotation ``P`` (float32, so ``PᵀP`` is only nearly ``I``: ``η = ||PᵀP - I||_F``)
  and stored rotated rows ``y = fl(xP)`` (``|y - xP| <= ζ|x|``, ``ζ = γ_d·sqrt(p(1+η))``), the projection
  ``Π`` onto ``P``'s columns gives ``q·x = q·Πx + (I-Π)q·(I-Π)x`` with ``q·Πx <= qP·y + |qP|(ζ + η'(|y|/|x| + ζ))|x|``
  (``η' = η/(1-η)``, from ``(PᵀP)⁻¹``) and tails ``|(I-Π)x|² <= |x|² - (|y| - ζ|x|)²/(1+η)``, likewise for ``q``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic

import numpy as np

from embedtools.backends._norms import COSINE_RANGE
from embedtools.protocols import ArrayT, Metric, SearchBackend
from embedtools.quantize import QuantizedIndex
from embedtools.search.certified import (
    SHORTLIST_MAX,
    U32,
    Certified,
    Listed,
    Rounding,
    Screen,
    ScreenKind,
    certified_topk,
    fits,
    float32_rounding,
    gamma,
    kappa,
    l2_bounds,
    low_rounding,
    round_up,
    unit_bounds,
    upper_bounds,
)
from embedtools.search.exact import blocked_topk, l2_certified, outside_cosine_range
from embedtools.search.int8_screen import Int8Queries, decode_slack, int8_queries
from embedtools.search.l2_certified import PLAIN_RANGE, first_shortlist, l2_bound
from embedtools.search.rescore import exact_topk_over, norms64, shortlist_ranks

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["FALLBACK_SHARE", "FLOAT_SCREEN_WIDTH", "LOW_PRECISION_WIDTH", "BoundedPrefix", "bounded_prefix", "certified_search", "row_errors"]

F32 = np.float32
#: A screen lists eight times its first shortlist: the common growth steps (doubling the shortlist)
#: are then longer rescorings of the same list, not a second pass over the table. ``bench_search
#: --only certified`` and ``certified-sets`` print the shortlists: int8's and the funnels' reach 4 to 8
#: times their first (176 rows; 400 of a first 50).
LOW_PRECISION_WIDTH = 8
#: bfloat16's and float16's screens list four times their first shortlist: theirs reached 4 times it
#: at most on the three sets (88 rows of a first 22), and a shorter running list per query is less
#: to select and merge on every block, whose cost showed beside the fast product of an AMX CPU.
FLOAT_SCREEN_WIDTH = 4
#: A screened query whose shortlist would pass this share of the rows goes to the float32 certified
#: search over every row instead: rescoring a shortlist gathers its rows at full width, per query,
#: and on the real set (36,500 rows) a funnel whose prefix bound held nothing back grew its
#: shortlists to 3,200 rows per query, whose rescoring cost more than that fallback's pass over
#: every row (``bench_search --only certified-sets`` now prints 36,500 rows for it: the fallback).
FALLBACK_SHARE = 32


@dataclass(frozen=True)
class BoundedPrefix(Generic[ArrayT]):
    """A certified funnel's screen: ``rows`` (``(n, p+1)``, ``[x_p, |x_t|]/|x|`` on the backend),
    ``matrix`` the rotation's first ``p`` columns (``None``: the plain prefix), and the bound's
    terms (module docstring): ``eta``, ``zeta`` and ``alpha``, the largest ``|A_i|``."""

    rows: ArrayT
    width: int
    matrix: npt.NDArray[np.float32] | None
    eta: float
    zeta: float
    alpha: float


def bounded_prefix(
    backend: SearchBackend[ArrayT], vectors: ArrayT, rotated: ArrayT | None, matrix: npt.NDArray[np.float32] | None, width: int, chunk_rows: int
) -> BoundedPrefix[ArrayT]:
    """The bounded prefix of ``vectors`` (the searched width) at ``width``, built in chunks of rows
    on the host: from its own columns, or — with ``rotated`` (the rotation's stored rows) and its
    ``matrix`` (``d x components``) — from the rotated prefix."""
    n, dim = (int(s) for s in backend.shape(vectors))
    p = width
    eta = zeta = 0.0
    cols = None
    if matrix is not None:
        cols = np.ascontiguousarray(matrix[:, :p], dtype=F32)
        gram = cols.astype(np.float64).T @ cols.astype(np.float64)
        eta = float(np.sqrt(np.sum((gram - np.eye(p)) ** 2))) * (1 + 2.0**-30) + p * 2.0**-50
        if eta >= 0.5:
            raise ValueError("rotation too far from orthonormal for a bound")  # pragma: no cover - eigh's axes are orthonormal to ~1e-6
        zeta = gamma(dim) * math.sqrt(p * (1 + eta)) * 1.01
    parts: list[ArrayT] = []
    alpha = 0.0
    for start in range(0, n, max(chunk_rows, 1)):
        idx = np.arange(start, min(start + chunk_rows, n), dtype=np.int64)
        x = np.asarray(backend.to_numpy(backend.take_rows(vectors, idx)), dtype=np.float64)
        xn = np.sqrt(np.einsum("nd,nd->n", x, x))
        if rotated is None:
            y = x[:, :p]
            tail = np.sqrt(np.einsum("nd,nd->n", x[:, p:], x[:, p:])) * (1 + 2.0**-40)
        else:
            y = np.asarray(backend.to_numpy(backend.take_rows(rotated, idx)), dtype=np.float64)[:, :p]
            yn = np.sqrt(np.einsum("nd,nd->n", y, y))
            low = np.maximum(yn - zeta * xn, 0.0)
            tail = np.sqrt(np.maximum(xn * xn * (1 + 2.0**-40) - low * low / (1 + eta), 0.0)) * (1 + 2.0**-40) + 2.0**-1000
        safe = np.where(xn > 0, xn, 1.0)[:, None]
        aug = np.hstack([y, tail[:, None]]) / safe
        aug32 = aug.astype(F32)
        last = aug32[:, -1]
        aug32[:, -1] = np.where(last.astype(np.float64) < aug[:, -1], np.nextafter(last, F32(np.inf)), last)
        alpha = max(alpha, float(np.sqrt(np.einsum("nd,nd->n", aug32.astype(np.float64), aug32.astype(np.float64))).max(initial=0.0)))
        parts.append(backend.from_numpy(np.ascontiguousarray(aug32)))
    rows = parts[0] if len(parts) == 1 else backend.concatenate(parts)
    return BoundedPrefix(rows, p, cols, eta, zeta, alpha)


def certified_search(
    backend: SearchBackend[ArrayT],
    queries: npt.NDArray[np.float32],
    x: ArrayT,
    norms: npt.NDArray[np.float32],
    k: int,
    metric: Metric,
    *,
    mask: npt.NDArray[np.bool_] | None,
    block_bytes: int,
    index: QuantizedIndex[ArrayT] | None = None,
    prefix: BoundedPrefix[ArrayT] | None = None,
    first: int | None = None,
    errors: Callable[[], npt.NDArray[np.float64]] | None = None,
) -> Certified:
    """The exact top ``k`` of the float32 rows ``x`` (norms ``norms``, host) for host ``queries``,
    screened by ``index``'s codes (``errors()``: each row's ``|x̃ - x|``, :func:`row_errors`, asked
    for only when the screen runs), by ``prefix``, or (neither) by the float32 rows themselves;
    ``first`` is the first shortlist (default ``2k + 2``)."""
    n = int(backend.shape(x)[0])
    rows = np.arange(n, dtype=np.int64) if mask is None else np.flatnonzero(mask).astype(np.int64)
    available = int(rows.size)
    start = first_shortlist(k) if first is None else max(first, k)

    def exact(which: npt.NDArray[np.intp], idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        return shortlist_ranks(backend, queries[which], x, idx, metric, block_bytes)

    def over_all(which: npt.NDArray[np.intp]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
        return exact_topk_over(backend, queries[which], x, rows, k, metric, block_bytes)

    def float32(which: npt.NDArray[np.intp]) -> Certified:
        if metric == "l2":
            return l2_certified(backend, queries[which], x, k, norms, mask, block_bytes)
        if outside_cosine_range(norms).size:
            ranks, idx = over_all(which)
            return Certified(ranks, idx, np.full(which.size, available, dtype=np.int64))
        unit = _unit(backend, queries[which])
        sub = _unit_screen(backend, unit, queries[which], x, norms, metric, float32_rounding(n), np.zeros(which.size),
                           mask, block_bytes, None, None)  # fmt: skip
        return certified_topk(which.size, k, available, screen=sub, exact=lambda w, i: exact(which[w], i), fallback=lambda w: over_all(which[w]),
                              first=first_shortlist(k), width=first_shortlist(k) + 1)  # fmt: skip

    def fallback(which: npt.NDArray[np.intp]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
        found = float32(which)
        return found.ranks, found.indices

    screen = _screen(backend, queries, x, norms, metric, mask, block_bytes, index, prefix, errors)
    if screen is None:
        return float32(np.arange(queries.shape[0], dtype=np.intp))
    float_screen = prefix is None and index is not None and index.codec.kernel in ("bfloat16", "float16")
    return certified_topk(queries.shape[0], k, available, screen=screen, exact=exact, fallback=fallback, first=start,
                          width=(FLOAT_SCREEN_WIDTH if float_screen else LOW_PRECISION_WIDTH) * start + 1, limit=min(SHORTLIST_MAX, available // FALLBACK_SHARE))  # fmt: skip


def _unit(backend: SearchBackend[Any], queries: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Unit queries, normalised by the backend as the exact search normalises them."""
    return np.ascontiguousarray(backend.to_numpy(backend.normalize(backend.from_numpy(queries))), dtype=F32)


def row_errors(backend: SearchBackend[ArrayT], index: QuantizedIndex[ArrayT], x: ArrayT, block_bytes: int) -> npt.NDArray[np.float32]:
    """Each row's exact ``|x̃ - x|`` for ``index``'s codes (decoded by the backend, as its product
    sees them), rounded up to float32: one pass over the table, in chunks of rows on the host whose
    copies (the rows and codes gathered, decoded, and in float64: about 40 bytes a value) stay
    within ``block_bytes``, the search's own bound on its extra memory."""
    n, dim = int(backend.shape(x)[0]), max(int(backend.shape(x)[1]), 1)
    chunk_rows = max(block_bytes // (40 * dim), 1)
    decode = index.decoder(backend)
    out = np.empty(n, dtype=np.float64)
    for start in range(0, n, chunk_rows):
        idx = np.arange(start, min(start + chunk_rows, n), dtype=np.int64)
        diff = np.asarray(backend.to_numpy(decode(backend.take_rows(index.codes, idx))), dtype=np.float64)
        diff -= np.asarray(backend.to_numpy(backend.take_rows(x, idx)), dtype=np.float64)
        out[idx] = np.sqrt(np.einsum("nd,nd->n", diff, diff))
    return round_up(out * (1 + 2.0**-40))


def _query_errors(values: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]] | None, q: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """``|q̃ - q|`` per query, from the values the backend's product sees (``None``: unrounded)."""
    if values is None:
        none: npt.NDArray[np.float64] = np.zeros(int(q.shape[0]), dtype=np.float64)
        return none
    diff: npt.NDArray[np.float64] = np.asarray(values(q), dtype=np.float64) - q.astype(np.float64)
    out: npt.NDArray[np.float64] = np.sqrt(np.einsum("qd,qd->q", diff, diff)) * (1 + 2.0**-40)
    return out


def _screen(
    backend: SearchBackend[ArrayT],
    queries: npt.NDArray[np.float32],
    x: ArrayT,
    norms: npt.NDArray[np.float32],
    metric: Metric,
    mask: npt.NDArray[np.bool_] | None,
    block_bytes: int,
    index: QuantizedIndex[ArrayT] | None,
    prefix: BoundedPrefix[ArrayT] | None,
    errors: Callable[[], npt.NDArray[np.float64]] | None,
) -> Screen | None:
    """The screen for ``index`` or ``prefix``, or ``None`` where none applies (no index or prefix,
    cosine rows beyond :data:`COSINE_RANGE`, values beyond the screen's range): the float32 path."""
    if index is None and prefix is None:
        return None
    if metric != "l2" and outside_cosine_range(norms).size:
        return None
    norm_max = float(norms.max(initial=0.0))
    q_max = float(norms64(queries).max(initial=0.0))
    if metric == "l2" and not (PLAIN_RANGE[0] <= max(norm_max, q_max) and norm_max <= PLAIN_RANGE[1] and q_max <= PLAIN_RANGE[1]):
        return None
    if prefix is not None:
        return _prefix_screen(backend, queries, norms, metric, mask, block_bytes, prefix)
    assert index is not None
    kind = index.codec.kernel
    if kind not in ("bfloat16", "float16", "int8"):
        return None  # binary codes (signs) carry no bound on the product
    if kind != "int8":
        screen_kind: ScreenKind = "bfloat16" if kind == "bfloat16" else "float16"
        if not fits(screen_kind, 1.0 + q_max if metric == "l2" else 1.0 + 2.0**-20, norm_max):
            return None
    # the native product only where it measured faster than float32 (torch's fp16 on a CPU without
    # AVX512-FP16 ran ~10x slower); otherwise blocks of codes are decoded into the float32 GEMM
    native = backend.low_precision(kind) if backend.gemm_speedup(kind) >= 1.0 else None
    if native is not None and kind != "int8" and native.values is None:
        native = None  # a rounding the bound cannot see: decode instead
    exact_rows = row_errors(backend, index, x, block_bytes).astype(np.float64) if errors is None else errors()
    rows_of: Callable[[ArrayT], ArrayT] = index.decoder(backend) if native is None else native.rows
    ranked = queries if metric == "l2" else _unit(backend, queries)
    operand_of = None if native is None else native.operand
    int8: Int8Queries | None = None
    if native is not None and kind == "int8":  # integer steps, whose errors and arithmetic are known here
        assert index.scale is not None and index.offset is not None
        scale, offset = (np.asarray(backend.to_numpy(v), dtype=F32) for v in (index.scale, index.offset))
        int8 = int8_queries(ranked, scale, offset)
        exact_rows = exact_rows + decode_slack(scale, offset)  # against the exact decode, not the float32 one
        query_errors = int8.errors
    else:
        query_errors = _query_errors(None if native is None else native.values, ranked)
    rounding = low_rounding(kind, exact_rows, native is not None)
    if metric == "l2":
        return _l2_screen(backend, queries, index.codes, norms, rounding, query_errors, mask, block_bytes, rows_of, operand_of, int8)
    return _unit_screen(backend, ranked, queries, index.codes, norms, metric, rounding, query_errors, mask, block_bytes,
                        rows_of, operand_of, int8)  # fmt: skip


def _unit_screen(
    backend: SearchBackend[ArrayT],
    unit: npt.NDArray[np.float32],
    raw: npt.NDArray[np.float32],
    corpus: ArrayT,
    norms: npt.NDArray[np.float32],
    metric: Metric,
    rounding: Rounding,
    query_errors: npt.NDArray[np.float64],
    mask: npt.NDArray[np.bool_] | None,
    block_bytes: int,
    rows_of: Callable[[ArrayT], ArrayT] | None,
    operand_of: Callable[[npt.NDArray[np.float32]], ArrayT] | None,
    int8: Int8Queries | None = None,
) -> Screen:
    """Cosine or dot by unit queries: each row's bound is a column shift, so the kernel's own
    top-w *is* the upper-bound order; dot's units are the unit query's (``r / |q|``). An integer
    screen (``int8``) multiplies the queries' packed steps instead, and each query's bound takes
    its float32 arithmetic (times the largest row scale, for cosine)."""
    dim = unit.shape[1]
    assert metric != "l2"
    bounds = unit_bounds(metric, rounding, norms, query_errors, dim)
    scale = (1.0 / np.where(norms >= COSINE_RANGE[0], norms, F32(1.0))).astype(F32) if metric == "cosine" else None
    operand_rows = unit
    if int8 is not None:
        widest = 1.0 if scale is None else float(scale.max(initial=1.0)) * (1 + 4 * U32)
        bounds, operand_rows = bounds._replace(add=bounds.add + 1.001 * widest * int8.arithmetic), int8.packed
    qn = norms64(raw)
    unit_scale = np.ones(raw.shape[0]) if metric == "cosine" else 1.0 / np.where(qn > 0, qn, 1.0)
    zeros = np.zeros(raw.shape[0])

    def screen(which: npt.NDArray[np.intp], width: int) -> Listed:
        vals, idx = blocked_topk(backend, operand_rows[which], corpus, width, "dot", block_bytes, scale=scale, shift=bounds.shift, mask=mask,
                                 rows_of=rows_of, settle_ties=False, operand_of=operand_of)  # fmt: skip
        upper = upper_bounds(vals.astype(np.float64), bounds, which)
        return Listed(upper, np.where(np.isfinite(upper), idx, -1), unit_scale[which], zeros[which])

    return screen


def _l2_screen(
    backend: SearchBackend[ArrayT],
    queries: npt.NDArray[np.float32],
    corpus: ArrayT,
    norms: npt.NDArray[np.float32],
    rounding: Rounding,
    query_errors: npt.NDArray[np.float64],
    mask: npt.NDArray[np.bool_] | None,
    block_bytes: int,
    rows_of: Callable[[ArrayT], ArrayT] | None,
    operand_of: Callable[[npt.NDArray[np.float32]], ArrayT] | None,
    int8: Int8Queries | None = None,
) -> Screen:
    """l2 by ``q·x̃ - |x|²/2``: one bound per query (the product's, with the largest norm, plus
    the float32 shift's and subtraction's :func:`~embedtools.search.l2_certified.l2_bound`, plus an
    integer screen's float32 arithmetic); units ``r = (|q|² - ||q - x||²)/2``."""
    dim = queries.shape[1]
    shift = (0.5 * norms * norms).astype(F32)
    qn = norms64(queries)
    norm_max = float(norms.max(initial=0.0))
    bound = l2_bounds(rounding, dim, qn, query_errors, norm_max) + l2_bound(dim, qn, norm_max)
    operand_rows = queries
    if int8 is not None:
        bound, operand_rows = bound + 1.001 * int8.arithmetic, int8.packed
    halves = np.full(queries.shape[0], 0.5)

    def screen(which: npt.NDArray[np.intp], width: int) -> Listed:
        vals, idx = blocked_topk(backend, operand_rows[which], corpus, width, "dot", block_bytes, scale=None, shift=shift, mask=mask,
                                 rows_of=rows_of, settle_ties=False, operand_of=operand_of)  # fmt: skip
        return _listed(vals, idx, bound[which], halves[which], qn[which] ** 2 / 2)

    return screen


def _listed(vals: npt.NDArray[np.float32], idx: npt.NDArray[np.int64], add: npt.NDArray[np.float64],
            scale: npt.NDArray[np.float64], offset: npt.NDArray[np.float64]) -> Listed:  # fmt: skip
    upper = vals.astype(np.float64) + add[:, None]
    return Listed(upper, np.where(np.isfinite(upper), idx, -1), scale, offset)


def _prefix_screen(
    backend: SearchBackend[ArrayT],
    queries: npt.NDArray[np.float32],
    norms: npt.NDArray[np.float32],
    metric: Metric,
    mask: npt.NDArray[np.bool_] | None,
    block_bytes: int,
    prefix: BoundedPrefix[ArrayT],
) -> Screen:
    """The certified funnel's screen (module docstring): ``A·[q_p, |q_t|]`` plus one correction per
    query (the rotation's ``ζ``/``η`` terms, the GEMM's float32 error over ``|A_i| <= alpha``), times
    ``|x|`` for dot and l2 (whose correction then takes the largest norm)."""
    dim, p = queries.shape[1], prefix.width
    q = queries.astype(np.float64)
    qn = np.sqrt(np.einsum("qd,qd->q", q, q))
    if metric != "l2":
        q = q / np.where(qn > 0, qn, 1.0)[:, None]
    q_len = np.sqrt(np.einsum("qd,qd->q", q, q))
    head = q[:, :p] if prefix.matrix is None else backend.host_matmul(q, prefix.matrix.astype(np.float64))
    head_len = np.sqrt(np.einsum("qd,qd->q", head, head))
    if prefix.matrix is None:
        tail = np.sqrt(np.einsum("qd,qd->q", q[:, p:], q[:, p:])) * (1 + 2.0**-40)
    else:
        tail = np.sqrt(np.maximum(q_len * q_len * (1 + 2.0**-40) - head_len * head_len / (1 + prefix.eta), 0.0)) * (1 + 2.0**-40)
    operand = np.hstack([head, tail[:, None]])
    op32 = operand.astype(F32)
    op32[:, -1] = np.where(op32[:, -1].astype(np.float64) < tail, np.nextafter(op32[:, -1], F32(np.inf)), op32[:, -1])
    op_len = np.sqrt(np.einsum("qd,qd->q", op32.astype(np.float64), op32.astype(np.float64)))
    eta_ = prefix.eta / (1 - prefix.eta)
    rho = math.sqrt(1 + prefix.eta) + prefix.zeta
    rotation_term = head_len * (prefix.zeta + eta_ * (rho + prefix.zeta)) * 1.01
    gemm_term = (gamma(p + 1) + (dim + 8) * U32) * prefix.alpha * op_len * 1.01 + (p + 2) * 2.0**-120
    correction = rotation_term + gemm_term
    norm_max = float(norms.max(initial=0.0)) * (1 + (dim + 4) * U32)
    zeros = np.zeros(queries.shape[0])
    if metric == "cosine":
        add, scale, shift, a, b = correction + 4 * kappa(dim), None, None, np.ones(queries.shape[0]), zeros
    elif metric == "dot":
        add = correction * norm_max + 4 * kappa(dim) * norm_max
        scale, shift, a, b = norms.astype(F32), None, 1.0 / np.where(qn > 0, qn, 1.0), zeros
    else:
        add = correction * norm_max + l2_bound(dim, qn, norm_max)
        scale, shift, a, b = norms.astype(F32), (0.5 * norms * norms).astype(F32), np.full(queries.shape[0], 0.5), qn**2 / 2
    if metric != "cosine":  # the float32 scaling by |x| (and, for l2, the subtraction): a few u of the score
        add = add + (dim + 8) * U32 * (norm_max * op_len * prefix.alpha + (norm_max**2 if metric == "l2" else 0.0))

    def screen(which: npt.NDArray[np.intp], width: int) -> Listed:
        vals, idx = blocked_topk(backend, np.ascontiguousarray(op32[which]), prefix.rows, width, "dot", block_bytes, scale=scale,
                                 shift=shift, mask=mask, rows_of=None, settle_ties=False)  # fmt: skip
        return _listed(vals, idx, add[which], a[which], b[which])

    return screen
