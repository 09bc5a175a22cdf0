"""The integer screen over an int8 index: queries on an int8 grid, what its arithmetic adds, and
the approximate shortlist it ranks (``quantized="int8"`` without ``rescore="certified"``).

An int8 index decodes a row as ``x̂ = o + s∘c`` (per-dimension scale ``s`` and offset ``o``, codes
``c`` in ``[-128, 127]``). Where a backend has an integer GEMM (int8 × int8 → int32, exact: VNNI on
x86, ``torch._int_mm``), a screen need not decode the codes at all: with each query's
``w = q∘s`` rounded to integer steps ``t = rint(w/α)``, ``α = max|w|/127``, the product is

    ``q̃·x̂ = α·(t·c) + β``,   ``q̃ = α·t/s`` (per dimension),   ``β = q̃·o``,

so the screen multiplies the codes by the steps in integers and applies one scale and one offset
per query. It is a low-precision screen in the sense of :mod:`embedtools.search.certified`: the
*rounded query* is ``q̃`` (its exact error ``ε_q = |q̃ - q|`` is computed here in float64), the
*rounded rows* are the exact decodes ``x̂`` (whose distance to the float32 decode that
:func:`~embedtools.search.screening.row_errors` measured is at most :func:`decode_slack`), and
there is no accumulation error. What the float32 arithmetic adds on top, per query
(:attr:`Int8Queries.arithmetic`), with ``u = 2⁻²⁴`` and ``A = α|t|·max|c_i| >= |α·(t·c_i)|``
(Cauchy–Schwarz, ``|c_i| <= 128·sqrt(d)``):

* the int32 product converted to float32 (exact below ``2²⁴``, else within ``u``), times ``α``
  (``u``), plus ``β₃₂`` (``u`` of a sum at most ``A(1+u)² + |β₃₂|``): at most ``3.01·u·A + 1.01·u·|β₃₂|``;
* ``β₃₂``, the float32 of the float64 ``q̃·o``: ``u·|β|`` plus the float64 sum's own
  ``2·γ₆₄(d)·Σ|q̃_j o_j|`` (``q̃``'s float64 rounding included);
* a product of ``α`` near float32's underflow: ``2⁻¹²⁶`` per rounding.

A cosine or dot screen then adds ``arithmetic`` (times the largest row scale ``1/|x|`` for cosine)
to each query's bound; an l2 screen adds it to its one bound per query.

An approximate shortlist (:func:`int8_shortlist`) ranks by the same ``q̃·x̂`` where the backend's
integer product measured faster than decoding the codes into its float32 GEMM: the query's rounding
(about as large as the rows') is one more approximation before the exact rescoring. Elsewhere
(NumPy, which has no integer GEMM) it ranks by ``x̂·q`` through the float32 GEMM over the codes
only widened, the scale folded into the queries.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import numpy.typing as npt

from embedtools.backends._norms import COSINE_RANGE
from embedtools.protocols import ArrayT, Metric, SearchBackend
from embedtools.search.exact import blocked_topk

if TYPE_CHECKING:
    from embedtools.quantize import QuantizedIndex

__all__ = ["FOLD_NORM_SPREAD", "STEPS", "Int8Queries", "decode_slack", "int8_queries", "int8_shortlist"]

#: The largest step magnitude: symmetric, so ``-t`` is a step whenever ``t`` is.
STEPS = 127
_U = 2.0**-24
_CODE_MAX = 128


class Int8Queries(NamedTuple):
    """Queries for an integer screen: ``packed`` ``(q, d + 2)`` float32 (steps, then ``α``, then
    ``β``: :class:`~embedtools.protocols.LowPrecisionGemm`'s int8 operand), ``errors`` each
    query's ``|q̃ - q|`` and ``arithmetic`` each query's bound on the float32 arithmetic (module
    docstring), both float64 and rounded up."""

    packed: npt.NDArray[np.float32]
    errors: npt.NDArray[np.float64]
    arithmetic: npt.NDArray[np.float64]


def int8_queries(queries: npt.NDArray[np.float32], scale: npt.NDArray[np.float32], offset: npt.NDArray[np.float32]) -> Int8Queries:
    """``queries`` (as the screen ranks them: unit for cosine and dot) on the int8 grid of an index
    with per-dimension ``scale`` (positive) and ``offset``."""
    q = np.asarray(queries, dtype=np.float64)
    s = np.asarray(scale, dtype=np.float64)
    o = np.asarray(offset, dtype=np.float64)
    n, dim = q.shape
    w = q * s
    peak = np.abs(w).max(axis=1, initial=0.0)
    alpha = np.where(peak > 0, peak / STEPS, 1.0).astype(np.float32)
    alpha = np.where(alpha > 0, alpha, np.float32(1.0))  # a peak whose α underflows: steps of 0, q̃ = 0
    a64 = alpha.astype(np.float64)[:, None]
    steps = np.clip(np.rint(w / a64), -STEPS, STEPS)
    effective = a64 * steps / s  # q̃: α·t is exact in float64, the division rounds once
    beta64 = np.einsum("qd,d->q", effective, o)
    beta = beta64.astype(np.float32)
    diff = effective - q
    q_len = np.sqrt(np.einsum("qd,qd->q", effective, effective))
    errors = np.sqrt(np.einsum("qd,qd->q", diff, diff)) * (1 + 2.0**-40) + 2.0**-50 * q_len
    g64 = dim * 2.0**-53 / (1 - dim * 2.0**-53)
    reach = alpha.astype(np.float64) * np.sqrt(np.einsum("qd,qd->q", steps, steps)) * _CODE_MAX * math.sqrt(max(dim, 1))
    b32 = np.abs(beta.astype(np.float64))
    arithmetic = (3.01 * _U * reach + 1.01 * _U * b32 + _U * np.abs(beta64) + 2 * g64 * np.abs(effective) @ np.abs(o)
                  + 4 * 2.0**-126)  # fmt: skip
    packed = np.empty((n, dim + 2), dtype=np.float32)
    packed[:, :dim] = steps
    packed[:, dim] = alpha
    packed[:, dim + 1] = beta
    return Int8Queries(packed, errors, arithmetic * (1 + 2.0**-20))


def decode_slack(scale: npt.NDArray[np.float32], offset: npt.NDArray[np.float32]) -> float:
    """How far a float32 decode ``fl(fl(c·s) + o)`` (the backends' ``dequantize``) can be from the
    exact ``o + s∘c``, over a whole row: ``u·|c_j s_j|`` for the product and ``u`` of the sum per
    component, so at most ``u·(2.01·128·|s| + |o|)``."""
    s = float(np.linalg.norm(np.asarray(scale, dtype=np.float64)))
    o = float(np.linalg.norm(np.asarray(offset, dtype=np.float64)))
    return _U * (2.01 * _CODE_MAX * s + o) * (1 + 2.0**-20) + 2.0**-126


#: Largest ratio of the rows' cosine scales ``1/|x|`` for which :func:`int8_shortlist`'s folded
#: ranking leaves the offset's term out: unit-normalised rows (norms 1 to a few float32 steps) are
#: inside it, and the term then moves a score by at most ``|o·q|·2⁻²⁰``, far below the codes' own
#: rounding (``s/2`` per value).
FOLD_NORM_SPREAD = 1 + 2.0**-20


def int8_shortlist(
    backend: SearchBackend[ArrayT],
    queries: npt.NDArray[np.float32],
    index: QuantizedIndex[ArrayT],
    norms: npt.NDArray[np.float32] | None,
    k: int,
    metric: Metric,
    mask: npt.NDArray[np.bool_] | None,
    block_bytes: int,
) -> npt.NDArray[np.int64] | None:
    """Each query's best ``k`` rows of an int8 ``index`` without decoding it (the original rows'
    ``norms`` for cosine and l2, as the decoded ranking uses), or ``None``: the caller then decodes.

    By the backend's integer product where it measured faster than float32. Otherwise by the float32
    GEMM over the codes only widened, the scale folded into the queries: ``x̂·q = c·(s∘q) + o·q``,
    where the offset's term ``o·q`` is one number per query, which ranks no row above another for dot
    and l2 (the ranking's ``- |x|²/2`` is the original rows'); for cosine it is scaled by each row's
    ``1/|x|``, so it is left out only where those agree within :data:`FOLD_NORM_SPREAD`, and ``None``
    is returned for other cosine tables. A decode was three passes over each block of codes (widen,
    scale, offset) for the one."""
    if index.scale is None or index.offset is None:
        return None
    ranked = queries
    if metric == "cosine":  # unit queries, normalised as the exact search normalises them
        ranked = np.asarray(backend.to_numpy(backend.normalize(backend.from_numpy(queries))), dtype=np.float32)
    scale, offset = (np.asarray(backend.to_numpy(v), dtype=np.float32) for v in (index.scale, index.offset))
    row_scale = shift = None
    if norms is not None and metric == "cosine":
        row_scale = (1.0 / np.where(norms >= COSINE_RANGE[0], norms, np.float32(1.0))).astype(np.float32)
    elif norms is not None and metric == "l2":
        shift = (0.5 * norms * norms).astype(np.float32)
    kk = min(k, index.rows)
    native = backend.low_precision("int8") if backend.gemm_speedup("int8") >= 1.0 else None
    if native is not None:
        _, rows = blocked_topk(backend, int8_queries(ranked, scale, offset).packed, index.codes, kk, "dot", block_bytes,
                               scale=row_scale, shift=shift, mask=mask, rows_of=native.rows, settle_ties=False, operand_of=native.operand)  # fmt: skip
        return rows
    if row_scale is not None and row_scale.size and float(row_scale.max()) > FOLD_NORM_SPREAD * float(row_scale.min()):
        return None
    folded = np.ascontiguousarray(ranked * scale, dtype=np.float32)
    _, rows = blocked_topk(backend, folded, index.codes, kk, "dot", block_bytes, scale=row_scale, shift=shift, mask=mask,
                           rows_of=backend.float32, settle_ties=False)  # fmt: skip
    return rows
