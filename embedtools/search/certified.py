"""The one certified top-k loop, and the error bounds it is certified by.

A *screen* ranks every row by a cheap score whose error against the exact ranking score is
bounded, and lists each query's best ``w`` rows by an **upper bound** on their exact score
(screened score plus bound; where the bound is per row it is a column shift, so the listing *is*
the upper-bound order). :func:`certified_topk` then rescores a query's first ``m`` listed rows
exactly (float64, from the stored float32 rows) and **certifies** the query when the best row it
left out — the ``(m+1)``-th listed, whose upper bound is at least every unlisted row's — has an upper
bound strictly below the exact k-th score of the rescored rows: no row outside the shortlist can
then reach, or tie, the exact top k. A query that does not certify rescores eight times as many
listed rows (the screen lists enough for one such step without running again), is screened again
with a longer list, and once its shortlist would exceed :data:`SHORTLIST_MAX` (or a quarter of the
rows) is handed to a fallback that scores every row. Adversarial data (many rows within the bound
of the k-th) costs time, never memory or a wrong id.

This is tighter than keeping every row within twice the bound of the k-th *screened* score: the
exact k-th is at least the screened k-th minus one bound, so the ``t - 2B`` rule certifies a subset
of what this rule does. Exact l2 over float32 (:func:`embedtools.search.rescore.l2_topk`), the
low-precision screens and the certified funnel (:mod:`embedtools.search.screening`) all run this
loop; they differ only in the screen and its bound.

Bounds (:class:`ProductError`). A screen's product ``s ≈ q·x`` has
``|s - q·x| <= rel·|q||x| + absolute·(|q| + |x|) + const`` for any rows and queries, where:

* **Rounding of rows and queries** to the screen's type (unit roundoff ``u``: bfloat16 ``2⁻⁸``,
  float16 ``2⁻¹¹``, float32 ``2⁻²⁴``): each component moves by at most ``u`` relative, so
  ``|q̃·x̃ - q·x| <= ((1+u)² - 1)·Σ|q_j||x_j| <= (2u + u²)|q||x|`` (Cauchy–Schwarz). float16 has
  subnormals below ``2⁻¹⁴``, spaced ``2⁻²⁴``: their rounding is absolute, ``η = 2⁻²⁴`` per
  component at most, which adds ``η·(|x|₁ + |q|₁) + dη² <= η√d·(|q| + |x|) + dη²``. float16's range
  (65504) is checked before a float16 screen runs (:func:`fits`); bfloat16 has float32's range.
* **Products** of two bfloat16 (8-bit significands) or float16 (11-bit) values are exact in
  float32 (16 and 22 bits), including float16 subnormals (``2⁻⁴⁸`` is a float32 normal).
* **Accumulation in float32**, any order (blocked, FMA, split in parts summed in float32):
  ``γ_d·Σ|p_j|`` with ``γ_d = d·2⁻²⁴/(1 - d·2⁻²⁴)``. Assumed of each library: oneDNN's CPU bf16/fp16
  GEMM (``vdpbf16ps``/AMX tiles, or conversion to float32) accumulates in float32; MLX's Metal
  GEMM accumulates half types in float32 and its CPU GEMM converts to float32; on CUDA the torch
  backend asks cuBLAS for a **float32 output** (``torch.mm(..., out_dtype=float32)``), so no partial
  sum is rounded to bf16/fp16 whatever ``allow_{bf16,fp16}_reduced_precision_reduction`` say
  (those flags allow split-K reductions in the *output* type, which is float32 here).
* **Output rounding** to the low-precision type (torch on a CPU, MLX): ``u`` relative, once
  (and ``η`` absolute below float16's normal range). A float32 output only makes this smaller.
* **Flushed subnormals** (AVX512-BF16 and GPUs flush float32 subnormal inputs and results): at
  most ``2⁻¹²⁶`` per input component and per partial result, the ``δ`` terms.

Each factor multiplies what came before, so ``rel = (1+u)³(1+γ_d) - 1`` and the absolute terms
grow by ``(1+u)(1+γ_d)``. The metric's own float32 arithmetic (unit queries, ``1/|x|``, the
shift of ``|x|²/2``, the subtraction of the bound) adds a few ``d·2⁻²⁴`` of the score, covered by
``4κ`` with ``κ = 1.25·(2d+16)·2⁻²⁴``, which also covers the store's **float32 exact search's** own
error (twice): every row left out is below the k-th by more than both searches' errors, so the
shortlist also holds what the float32 search returns. Cosine and dot screens use unit queries
(their row order per query is the same), so each row's bound is independent of the query and
is a column shift; l2 uses one bound per query with the largest row norm (as
:func:`~embedtools.search.rescore.l2_bound`). int8 codes decode to float32, so their error is the
decoding's, ``|x̃ - x| <= |e|`` with ``e_j`` half a step of dimension ``j`` (plus float32 slack),
counted per query as ``|q|·|e|`` (:func:`int8_error`; it assumes the calibration covers every row,
which the store keeps true by recalibrating on every change of the rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = [
    "AUTO_SCREEN_SPEEDUP",
    "SHORTLIST_MAX",
    "Certified",
    "Listed",
    "ProductError",
    "ScreenKind",
    "certified_topk",
    "fits",
    "int8_error",
    "kappa",
    "l2_query_bounds",
    "product_error",
    "row_bounds",
    "top_by_rank",
]

#: The most rows per query a screen may shortlist before that query is scored over every row.
SHORTLIST_MAX = 4096
#: How much faster than float32 a low-precision GEMM must have measured for the automatic rule
#: (:func:`embedtools.search.plan.auto_screened`) to screen by it.
AUTO_SCREEN_SPEEDUP = 2.0
#: float32's unit roundoff.
U32 = 2.0**-24
#: The largest float32 subnormal magnitude a flush can lose, per input component or partial result.
TINY = 2.0**-126
#: Relative slack on every bound, for the float64 evaluation of the formulas themselves.
SLACK = 1 + 2.0**-30

ScreenKind = Literal["float32", "bfloat16", "float16"]
_ROUNDOFF: dict[str, tuple[float, float]] = {"float32": (U32, 0.0), "bfloat16": (2.0**-8, 0.0), "float16": (2.0**-11, 2.0**-24)}
#: float16's largest finite value is 65504; screened products are kept below this.
FLOAT16_SAFE = 2.0**15


def gamma(dim: int) -> float:
    """``γ_d``: the relative error of a float32 sum of ``d`` terms, any order."""
    n = max(dim, 1) * U32
    return n / (1 - n)


def kappa(dim: int) -> float:
    """``κ``: float32 slack of a metric's own arithmetic around a product of width ``dim``."""
    return 1.25 * (2 * dim + 16) * U32


@dataclass(frozen=True)
class ProductError:
    """``|s - q·x| <= rel·|q||x| + absolute·(|q| + |x|) + const`` for a screen's product ``s``
    (module docstring); ``query`` adds ``query·|q|`` (int8's decoding error)."""

    rel: float
    absolute: float
    const: float
    query: float = 0.0

    def of(self, q_norm: npt.NDArray[np.float64] | float, x_norm: npt.NDArray[np.float64] | float) -> npt.NDArray[np.float64]:
        out: npt.NDArray[np.float64] = np.asarray(
            (self.rel * q_norm * x_norm + self.absolute * (q_norm + x_norm) + self.const + self.query * q_norm) * SLACK,
            dtype=np.float64,
        )
        return out


def product_error(kind: ScreenKind, dim: int) -> ProductError:
    """The bound on a ``kind`` screen's product of width ``dim`` (module docstring)."""
    u, eta = _ROUNDOFF[kind]
    grow = (1 + u) * (1 + gamma(dim))
    per_component = eta + TINY
    return ProductError(
        rel=(1 + u) ** 2 * grow - 1,
        absolute=per_component * math.sqrt(max(dim, 1)) * grow,
        const=dim * per_component**2 * grow + eta + TINY * (dim + 1),
    )


def int8_error(dim: int, scale: npt.NDArray[np.float32], offset: npt.NDArray[np.float32]) -> ProductError:
    """int8 screens decode to float32 and multiply there: half a step per dimension (encoding
    rounds ``(x - offset)/scale`` to the nearest step; the f32 arithmetic of that and of the decode
    ``c·scale + offset`` adds the ``2⁻¹²`` step and the ``4u`` terms), then a float32 product."""
    s = np.abs(np.asarray(scale, dtype=np.float64))
    o = np.abs(np.asarray(offset, dtype=np.float64))
    e = float(np.sqrt(np.sum((s * (0.5 + 2.0**-12) + 4 * U32 * (o + 128 * s)) ** 2)))
    base = product_error("float32", dim)
    g = 1 + gamma(dim)
    return ProductError(rel=base.rel, absolute=base.absolute, const=base.const, query=e * g * (1 + U32) ** 2)


def fits(kind: ScreenKind, q_max: float, norm_max: float) -> bool:
    """Whether ``kind``'s product stays in its range: float16's screened products (at most
    ``|q||x|``) below 2¹⁵, every type's below float32's overflow."""
    bound = q_max * norm_max * 2
    return bool(np.isfinite(bound)) and bound < (FLOAT16_SAFE if kind == "float16" else 2.0**100)


def _upper_norms(norms: npt.NDArray[np.float32], dim: int) -> npt.NDArray[np.float64]:
    """True row norms are at most the float32 ones by ``(d + 4)·2⁻²⁴`` relative."""
    out: npt.NDArray[np.float64] = np.asarray(norms, dtype=np.float64) * (1 + (dim + 4) * U32)
    return out


def row_bounds(error: ProductError, metric: Literal["cosine", "dot"], norms: npt.NDArray[np.float32], dim: int) -> npt.NDArray[np.float32]:
    """Each row's bound on ``|screened - exact|`` for unit queries, rounded up to float32: the
    column shift that turns a cosine or dot screen's scores into upper bounds (module docstring).
    Cosine's is relative to ``1/|x|`` (the screen scales by it), dot's is in the unit query's units."""
    xn = _upper_norms(norms, dim)
    qn = 1 + (dim + 4) * U32  # a float32-normalised query's norm, at most
    product = error.of(qn, xn) + (dim + 4) * U32 * xn  # and the unit query's own rounding
    k = kappa(dim)
    if metric == "cosine":
        inv = np.where(xn > 0, 1.0 / np.where(xn > 0, np.asarray(norms, dtype=np.float64), 1.0), 1.0)
        bound = 1.001 * inv * product + 4 * k
    else:
        bound = 1.001 * product + 4 * k * xn
    return _round_up(bound)


def l2_query_bounds(error: ProductError, dim: int, query_norms: npt.NDArray[np.float64], norm_max: float) -> npt.NDArray[np.float64]:
    """Each query's bound on ``|q·x̃ - q·x|`` over every row, for an l2 screen (to which the float32
    shift and subtraction add :func:`~embedtools.search.rescore.l2_bound`)."""
    n = norm_max * (1 + (dim + 4) * U32)
    out: npt.NDArray[np.float64] = 1.001 * error.of(query_norms, n)
    return out


def _round_up(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    f = values.astype(np.float32)
    out: npt.NDArray[np.float32] = np.where(f.astype(np.float64) < values, np.nextafter(f, np.float32(np.inf)), f).astype(np.float32)
    return out


def top_by_rank(
    ranks: npt.NDArray[np.float64], indices: npt.NDArray[np.int64], k: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Each row's best ``k`` (larger rank first, equal ranks by lower index); ``-inf`` ranks are empty slots."""
    order = np.lexsort((indices, -ranks), axis=1)[:, :k]
    return np.take_along_axis(ranks, order, axis=1), np.take_along_axis(indices, order, axis=1)


class Listed(NamedTuple):
    """A screen's list for some queries: upper bounds on each listed row's exact ranking score
    (best first; ``-inf`` for an empty slot or a masked row) in the screen's units, the rows
    (``-1``: empty), and per query the increasing affine map ``unit_scale·r + unit_offset`` from the
    exact ranks (:func:`embedtools.search.rescore.exact_ranks`'s) to the screen's units."""

    upper: npt.NDArray[np.float64]
    indices: npt.NDArray[np.int64]
    unit_scale: npt.NDArray[np.float64]
    unit_offset: npt.NDArray[np.float64]


class Certified(NamedTuple):
    """Exact ranks and rows of each query's top k (best first, ties to the lower row), and how
    many rows each query scored exactly (the table's row count where it fell back)."""

    ranks: npt.NDArray[np.float64]
    indices: npt.NDArray[np.int64]
    rescored: npt.NDArray[np.int64]


Screen = Callable[["npt.NDArray[np.intp]", int], Listed]
"""``screen(queries, w)``: the listing of at most ``w`` rows for those queries (positions in the batch)."""
Exact = Callable[["npt.NDArray[np.intp]", "npt.NDArray[np.int64]"], "npt.NDArray[np.float64]"]
"""``exact(queries, rows)``: exact ranks of each query's ``(p, c)`` rows (``-1`` rows: any value)."""
Fallback = Callable[["npt.NDArray[np.intp]"], tuple["npt.NDArray[np.float64]", "npt.NDArray[np.int64]"]]
"""``fallback(queries)``: the exact top k over every row, for queries a shortlist did not certify."""


def certified_topk(
    n_queries: int,
    k: int,
    available: int,
    *,
    screen: Screen,
    exact: Exact,
    fallback: Fallback,
    first: int,
    width: int,
    refine: Callable[[npt.NDArray[np.intp]], bool] | None = None,
    limit: int = SHORTLIST_MAX,
) -> Certified:
    """Each query's exact top ``k`` among ``available`` rows (module docstring): the first
    shortlist is ``first`` rows from a list ``width`` long; ``refine(queries)`` may change the
    screen once for queries that failed their first shortlist (a centred l2 frame), which are
    then screened again with the same shortlist."""
    k = min(k, available)
    ranks = np.full((n_queries, k), -np.inf)
    indices = np.full((n_queries, k), -1, dtype=np.int64)
    rescored = np.zeros(n_queries, dtype=np.int64)
    if k == 0 or n_queries == 0:
        return Certified(ranks, indices, rescored)
    cap = max(min(limit, available // 4), first)
    pending = np.arange(n_queries, dtype=np.intp)
    m = max(min(first, available), k)
    w = max(width, m + 1)
    refined = refine is None
    to_fall: list[npt.NDArray[np.intp]] = []
    while pending.size:
        listed = screen(pending, min(w, available))
        cols = listed.indices.shape[1]
        complete = cols >= available
        best_r = np.full((pending.size, k), -np.inf)
        best_i = np.full((pending.size, k), -1, dtype=np.int64)
        active = np.arange(pending.size, dtype=np.intp)
        lo, hi = 0, min(m, cols)
        next_pending = np.empty(0, dtype=np.intp)
        while active.size:
            rows = listed.indices[active, lo:hi]
            new = np.where(rows >= 0, exact(pending[active], rows), -np.inf)
            r, i = top_by_rank(np.hstack([best_r[active], new]), np.hstack([best_i[active], rows]), k)
            best_r[active], best_i[active] = r, i
            rescored[pending[active]] += hi - lo
            if complete and hi >= cols:
                done = np.ones(active.size, dtype=bool)
            else:
                excluded = listed.upper[active, hi] if hi < cols else np.full(active.size, np.inf)
                a, b = listed.unit_scale[active], listed.unit_offset[active]
                kth = a * r[:, k - 1]
                units = kth + b
                slack = 2.0**-40 * (np.abs(kth) + np.abs(b)) + 2.0**-1000
                with np.errstate(invalid="ignore"):
                    done = excluded < units - slack
            finished = pending[active[done]]
            ranks[finished], indices[finished] = best_r[active[done]], best_i[active[done]]
            active = active[~done]
            if not active.size:
                break
            if not refined:
                refined = True
                assert refine is not None
                if refine(pending[active]):
                    next_pending = pending[active]
                    break
            grown = 8 * max(hi, 1)
            if grown > cap:
                to_fall.append(pending[active])
                break
            if grown < cols:  # the list already holds the longer shortlist and the row after it
                lo, hi = hi, grown
                continue
            next_pending, m, w = pending[active], grown, grown + 1
            break
        pending = next_pending
    if to_fall:
        fall = np.concatenate(to_fall)
        ranks[fall], indices[fall] = fallback(fall)
        rescored[fall] = available
    return Certified(ranks, indices, rescored)
