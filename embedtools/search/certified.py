"""The one certified top-k loop, and the error bounds it is certified by.

A *screen* ranks every row by a cheap score whose error against the exact ranking score is
bounded, and lists each query's best ``w`` rows by an **upper bound** on their exact score
(screened score plus bound; where the bound is per row it is a column shift, so the listing *is*
the upper-bound order). :func:`certified_topk` then rescores a query's first ``m`` listed rows
exactly (float64, from the stored float32 rows) and **certifies** the query when the best row it
left out — the ``(m+1)``-th listed, whose upper bound is at least every unlisted row's — has an upper
bound strictly below the exact k-th score of the rescored rows: no row outside the shortlist can
then reach, or tie, the exact top k. A query that does not certify rescores twice as many listed
rows, again while the list holds them (a query that certifies at ``2m`` then skips the rescoring
of ``8m``), is screened again with a list eight times as long, and once its shortlist would
exceed ``limit`` (:data:`SHORTLIST_MAX`, or a quarter of the rows) is handed to a fallback that
scores every row. Adversarial data (many rows within the bound
of the k-th) costs time, never memory or a wrong id.

This is tighter than keeping every row within twice the bound of the k-th *screened* score: the
exact k-th is at least the screened k-th minus one bound, so the ``t - 2B`` rule certifies a subset
of what this rule does. Exact l2 over float32 (:func:`embedtools.search.l2_certified.l2_topk`), the
low-precision screens and the certified funnel (:mod:`embedtools.search.screening`) all run this
loop; they differ only in the screen and its bound.

Bounds (:func:`unit_bounds`, :func:`l2_bounds`). A screen multiplies the rounded query ``q̃`` by
the rounded rows ``x̃`` (a bfloat16/float16 index's codes, int8 codes decoded to float32, or the
float32 rows themselves) and may round the result. With ``ε_q = |q̃ - q|`` and ``ε_x = |x̃ - x|``
computed **exactly** (the query's from the values the backend's own conversion produced; each
row's once per table version and index, kept in the budgeted cache), the product's error is

* **rounding of rows and queries**: ``|q̃·x̃ - q·x| = |(q̃ - q)·x̃ + q·(x̃ - x)| <= ε_q|x̃| + |q|ε_x``
  (Cauchy–Schwarz; ``|x̃| <= |x| + ε_x``). Exact norms, not the worst case ``u·|q||x|`` per side: on
  real data they are about half of it. float16 subnormals (below ``2⁻¹⁴``) are inside ``ε``; its
  range (65504) is checked before a float16 screen runs (:func:`fits`); bfloat16 has float32's;
* **products** of two bfloat16 (8-bit significands) or float16 (11-bit) values are exact in float32
  (16 and 22 bits), float16 subnormals included (``2⁻⁴⁸`` is a float32 normal);
* **accumulation in float32**, any order (blocked, FMA, parts summed in float32):
  ``γ_d·Σ|q̃_j x̃_j| <= γ_d|q̃||x̃|``, ``γ_d = d·2⁻²⁴/(1 - d·2⁻²⁴)``. Assumed of each library: oneDNN's
  CPU bf16/fp16 GEMM (``vdpbf16ps``/AMX tiles, or conversion to float32) accumulates in float32;
  MLX's Metal GEMM accumulates half types in float32 and its CPU GEMM converts to float32; on CUDA
  the torch backend asks cuBLAS for a **float32 output** (``torch.mm(..., out_dtype=float32)``), so
  no partial sum is rounded to bf16/fp16 whatever ``allow_{bf16,fp16}_reduced_precision_reduction``
  say (they allow split-K reductions in the *output* type, float32 here);
* **output rounding** to the low-precision type (torch on a CPU, MLX): ``|s_out - s| <= u|s| <=
  u/(1-u)·|s_out|`` (plus float16's absolute ``2⁻²⁵`` below its normal range) — relative to the
  *score*, not to ``|q||x|``: it is applied to each listed value ``v`` as ``v + u''|v|``, which is
  increasing in ``v`` and so keeps the list in upper-bound order (:func:`upper_bounds`);
* **flushed subnormals** (AVX512-BF16 and GPUs flush float32 subnormal inputs and results): at
  most ``2⁻¹²⁶`` per input component and per partial result.

The metric's own float32 arithmetic (unit queries, ``1/|x|``, the ``|x|²/2`` shift, adding the
bound) adds a few ``d·2⁻²⁴`` of the score, covered by ``4κ``, ``κ = 1.25·(2d+16)·2⁻²⁴``, which also
covers the store's **float32 exact search's** own error (twice): every row left out is below the
k-th by more than both searches' errors, so the shortlist also holds what the float32 search
returns. Cosine and dot screens use unit queries (their row order per query is the same), so
each row's bound is a column shift and the query's ``ε_q`` one number per query; l2 uses one bound
per query with the largest row norm and row error (as :func:`~embedtools.search.l2_certified.l2_bound`).
int8 rows decode to float32 (their ``ε_x`` is the decoding's) and meet float32 queries (``ε_q = 0``),
or, through a backend's integer product (:mod:`embedtools.search.int8_screen`), stay codes and meet
the queries' int8 steps: the products are exact integers, ``ε_q`` is the steps' rounding, ``ε_x`` the
exact decode's, and that module bounds the float32 scaling it adds per query.
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
    "Bounds",
    "Rounding",
    "ScreenKind",
    "certified_topk",
    "fits",
    "float32_rounding",
    "kappa",
    "l2_bounds",
    "low_rounding",
    "round_up",
    "top_by_rank",
    "unit_bounds",
    "upper_bounds",
]

#: The most rows per query a screen may shortlist before that query is scored over every row.
SHORTLIST_MAX = 4096
#: How much faster than float32 a low-precision GEMM must have measured for the automatic rule
#: (:func:`embedtools.search.auto_screen.auto_screened`) to screen by it: issue 16's line for a
#: "fast bf16 GEMM". Below it a certified screen barely paid (``bench_search --only certified`` on
#: an AVX512-BF16 CPU without AMX: bf16 2.2x the float32 rate, certified 1.05x the torch store),
#: and the benchmark calls its targets "not applicable" at the same line.
AUTO_SCREEN_SPEEDUP = 2.5
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
class Rounding:
    """What a screen's product can differ by, beyond float32 accumulation: each row's exact
    rounding error ``|x̃_i - x_i|`` (``rows``; zeros for float32 rows), and the product's output
    rounding (``output``: the type's unit roundoff, ``0`` for a float32 output; ``output_abs``:
    float16's absolute rounding below its normal range). Query rounding errors are passed per
    search (``query_errors``: ``|q̃ - q|`` of the values the backend's product sees)."""

    kind: str
    rows: npt.NDArray[np.float64]
    output: float = 0.0
    output_abs: float = 0.0

    def value_slack(self) -> float:
        """``u''``: an upper bound on ``|s_out - s32| / |s_out|`` after output rounding, with the
        float32 scaling of the score by ``1/|x|`` (a few ``u32``) on top."""
        return self.output / (1 - self.output) * (1 + 4 * U32) if self.output else 0.0


def float32_rounding(rows: int) -> Rounding:
    """A float32 screen: its rows are the stored rows, its output float32."""
    return Rounding("float32", np.zeros(rows))


def low_rounding(kind: str, row_errors: npt.NDArray[np.float64], native: bool) -> Rounding:
    """A ``kind`` screen with exact row errors, through a native product (output rounded to the
    type) or decoded to float32 (no output rounding)."""
    u, eta = _ROUNDOFF.get(kind, (0.0, 0.0))
    return Rounding(kind, row_errors, u if native else 0.0, eta / 2 if native else 0.0)


class Bounds(NamedTuple):
    """A screen's bounds: ``shift`` the per-row column shift (``-B_i``, float32, rounded so the
    bound only grows), ``add`` per query, ``tail`` per query. A listed value ``v`` (the kernel's
    ``s - shift`` plus ``add``) bounds the exact score by ``v + u''|v| + tail`` (the output rounding,
    relative to the score itself: see :func:`upper_bounds`)."""

    shift: npt.NDArray[np.float32] | None
    add: npt.NDArray[np.float64]
    tail: npt.NDArray[np.float64]
    slack: float


def _tiny(dim: int, q_norm: npt.NDArray[np.float64] | float, x_norm: npt.NDArray[np.float64] | float) -> npt.NDArray[np.float64]:
    """Flushed subnormals: at most ``2⁻¹²⁶`` per input component (times the other side's largest
    component, at most its norm) and per partial result."""
    out: npt.NDArray[np.float64] = np.asarray(TINY * math.sqrt(max(dim, 1)) * (np.asarray(q_norm) + np.asarray(x_norm)) + TINY * (dim + 2), dtype=np.float64)
    return out


def unit_bounds(metric: Literal["cosine", "dot"], rounding: Rounding, norms: npt.NDArray[np.float32], query_errors: npt.NDArray[np.float64], dim: int) -> Bounds:
    """Bounds of a cosine or dot screen by unit queries (module docstring): each row's part is a
    column shift; the query's rounding ``ε_q`` adds ``ε_q·(1 + max ε_x/|x|)`` per query for cosine and,
    with the batch's largest ``ε_q``, ``ε_q·(|x| + ε_x)`` per row for dot."""
    grow = 1 + (dim + 4) * U32  # the true norm is at most the float32 one times this
    ex = rounding.rows
    qn = grow  # a float32-normalised query's norm, at most
    g = gamma(dim)
    k = kappa(dim)
    root = TINY * math.sqrt(max(dim, 1))
    grown = qn * (1 + max(rounding.output, _ROUNDOFF.get(rounding.kind, (U32, 0.0))[0]))  # |q̃| <= |q̂|(1 + u)
    # per row, before the metric's scaling: qn·ε_x + γ|q̃|(|x| + ε_x) + the flushed-subnormal terms
    # (:func:`_tiny`), written as  on_ex·ε_x + on_x·|x| + alone  so that it costs three passes
    on_ex, on_x, alone = qn + g * grown + root, (g * grown + root + (dim + 4) * U32) * grow, root * grown + TINY * (dim + 2) + rounding.output_abs
    eq = np.asarray(query_errors, dtype=np.float64)
    x32 = np.asarray(norms, dtype=np.float64)
    if metric == "cosine":  # divided by |x|: on_x·|x|/|x| is a constant (a zero row, scored 0 exactly, gets it too)
        inv = 1.0 / np.where(x32 > 0, x32, 1.0)
        bound = 1.001 * (inv * (on_ex * ex + alone) + on_x) + 4 * k
        add = 1.001 * eq * (1 + float((ex * inv).max(initial=0.0)))
    else:
        e_max = float(eq.max(initial=0.0))
        bound = 1.001 * ((on_ex + e_max) * ex + (on_x + e_max * grow + 4 * k * grow / 1.001) * x32 + alone)
        add = np.zeros(eq.shape)
    slack = rounding.value_slack()
    tail = slack * (float(bound.max(initial=0.0)) + add)
    return Bounds(-round_up(bound), add, tail, slack)


def l2_bounds(rounding: Rounding, dim: int, query_norms: npt.NDArray[np.float64], query_errors: npt.NDArray[np.float64], norm_max: float) -> npt.NDArray[np.float64]:
    """Each query's bound on ``|q·x̃ - q·x|`` over every row of an l2 screen (its output rounding
    taken at the largest ``|q̃||x̃|``), to which the float32 shift and subtraction add
    :func:`~embedtools.search.l2_certified.l2_bound`."""
    n = norm_max * (1 + (dim + 4) * U32)
    ex = float(rounding.rows.max(initial=0.0))
    eq = np.asarray(query_errors, dtype=np.float64)
    g = gamma(dim)
    qg = query_norms + eq
    product = eq * (n + ex) + query_norms * ex + g * qg * (n + ex) + _tiny(dim, qg, n + ex) + rounding.output_abs
    output = rounding.value_slack() * qg * (n + ex) * (1 + g)
    out: npt.NDArray[np.float64] = 1.001 * (product + output)
    return out


def upper_bounds(values: npt.NDArray[np.float64], bounds: Bounds, which: npt.NDArray[np.intp]) -> npt.NDArray[np.float64]:
    """Listed upper bounds from a screen's kernel values (``s + B_i``, best first): ``v + add``, then
    the output rounding ``u''|s|`` with ``|s| <= |v| + max B + add``, which keeps them in order."""
    v = values + bounds.add[which, None]
    out: npt.NDArray[np.float64] = v + bounds.slack * np.abs(v) + bounds.tail[which, None]
    return out


def fits(kind: ScreenKind, q_max: float, norm_max: float) -> bool:
    """Whether ``kind``'s product stays in its range: float16's screened products (at most
    ``|q||x|``) below 2¹⁵, every type's below float32's overflow."""
    bound = q_max * norm_max * 2
    return bool(np.isfinite(bound)) and bound < (FLOAT16_SAFE if kind == "float16" else 2.0**100)


def round_up(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """Nonnegative bounds as float32, never below their float64 value: ``2⁻²⁰`` above it before
    rounding to nearest (relative error ``2⁻²⁴``), or the next float32 up where that underflows."""
    f = (values * (1 + 2.0**-20)).astype(np.float32)
    tiny = f < np.float32(2.0**-100)
    if tiny.any():
        f[tiny] = np.nextafter(np.maximum(f[tiny], np.float32(0)), np.float32(np.inf))
    return f


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
            within = 2 * max(hi, 1)
            if within < cols and within <= cap:  # the list holds a longer shortlist and the row after it
                lo, hi = hi, within
                continue
            grown = 8 * max(hi, 1)
            if grown > cap:
                to_fall.append(pending[active])
                break
            next_pending, m, w = pending[active], grown, grown + 1
            break
        pending = next_pending
    if to_fall:
        fall = np.concatenate(to_fall)
        ranks[fall], indices[fall] = fallback(fall)
        rescored[fall] = available
    return Certified(ranks, indices, rescored)
