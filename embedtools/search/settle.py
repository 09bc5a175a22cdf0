"""Plain exact search made exact: float32 near-ties settled in float64.

The blocked float32 kernel's cosine and dot scores are each within ``ε`` of the exact score
(``ε = 2κ``, :func:`~embedtools.search.certified.kappa`; times ``|q|·max|x|`` for dot — the bound
:mod:`embedtools.search.certified` already carries for "the float32 search's own error"). So:

* two listed rows whose float32 scores differ by more than ``2ε`` are in the exact order; rows
  joined by gaps of at most ``2ε`` (a *near chain*) may be swapped, and only those are rescored
  exactly (float64, from the stored rows: only the rows of chains that reach into the top k, since
  on the real set, with its duplicate texts, nearly every query has a chain, and rescoring each
  one's whole list made k = 30-40 the slow corner of ``bench_search --only real``'s k-sweep) and
  re-ordered inside their chain, ties to the lower row;
* the top-k *set* is certain when the last listed score is below the k-th minus ``2ε``: every row
  not listed then scores exactly below every listed top-k row. The kernel lists
  :func:`listed_rows` (``k`` plus a margin) for that; a query whose margin is crowded goes to the
  certified float32 loop (:func:`~embedtools.search.screening.certified_search`).

It runs where that rescoring is cheap against the scan (:func:`settles`). Without it the float32 search could swap two rows a few ulps apart (it did, once in 100 queries,
on the Matryoshka-like benchmark set), and a certified search — which returns the float64 order —
differed from it there. l2 needs none of this: it is exact through
:func:`~embedtools.search.exact.l2_certified`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from embedtools.protocols import Metric, SearchBackend
from embedtools.search.certified import kappa
from embedtools.search.rescore import ranks_to_scores, shortlist_ranks
from embedtools.search.screening import certified_search

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["LIST_MARGIN_MIN", "SETTLE_ROWS_MIN", "SETTLE_SHARE", "listed_rows", "settle_near_ties", "settles"]

#: Rows the kernel lists beyond ``k``, at least; ``k/32`` more for large ``k``, whose scores crowd
#: (200,000 clustered rows, k = 1,000: at most 21 rows were within ``2ε`` below the k-th).
LIST_MARGIN_MIN = 16

#: A search settles while its list is at most ``rows / SETTLE_SHARE`` (or :data:`SETTLE_ROWS_MIN`)
#: long: the float64 rescoring is a gather of the listed rows, and at k = 1,000 over 200,000 rows it
#: took as long as the search itself (a one-off A/B: 163 vs 81 ms on NumPy, 1.7x on torch; at k = 10
#: 1.06-1.11x). Beyond it the order is the float32 GEMM's; ``rescore="certified"`` is exact at any k.
SETTLE_SHARE = 1024
SETTLE_ROWS_MIN = 64

Scored = tuple["npt.NDArray[np.float32]", "npt.NDArray[np.int64]"]


def listed_rows(k: int, available: int) -> int:
    """How many rows the float32 kernel lists for an exact top ``k`` among ``available`` rows."""
    return min(k + max(LIST_MARGIN_MIN, k // 32), available)


def settles(k: int, available: int) -> bool:
    """Whether a plain exact top ``k`` among ``available`` rows settles its near-ties."""
    return listed_rows(k, available) <= max(available // SETTLE_SHARE, SETTLE_ROWS_MIN)


def settle_near_ties(
    backend: SearchBackend[Any],
    queries: npt.NDArray[np.float32],
    x: Any,
    norms: Callable[[], npt.NDArray[np.float32]],
    k: int,
    metric: Metric,
    listed: Scored,
    *,
    available: int,
    mask: npt.NDArray[np.bool_] | None,
    block_bytes: int,
) -> Scored:
    """The exact top ``k`` (module docstring) from the float32 kernel's ``listed`` rows (best
    first, :func:`listed_rows` long) of the float32 rows ``x``; ``norms()`` gives their host norms,
    asked for only where dot's bound or a crowded query needs them."""
    vals, idx = listed
    width = vals.shape[1]
    k = min(k, width)
    s = vals.astype(np.float64)
    eps = np.full(s.shape[0], 2 * kappa(queries.shape[1]) * 1.001)
    if metric == "dot":
        eps *= np.sqrt(np.einsum("qd,qd->q", queries.astype(np.float64), queries.astype(np.float64))) * float(norms().max(initial=0.0)) * (1 + 2.0**-20)
    with np.errstate(invalid="ignore"):
        near = ~(s[:, :-1] - s[:, 1:] > 2 * eps[:, None])  # NaN (inf - inf) counts as near
        certain = np.full(s.shape[0], width >= available) | (s[:, -1] < s[:, k - 1] - 2 * eps)
    out_vals, out_idx = vals[:, :k].copy(), np.ascontiguousarray(idx[:, :k])
    touched = np.flatnonzero(certain & near[:, : min(k, width - 1)].any(axis=1))
    if touched.size:
        t_near, t_idx = near[touched], idx[touched]
        chain = np.hstack([np.zeros((touched.size, 1), dtype=np.int64), np.cumsum(~t_near, axis=1)])
        linked = np.zeros(chain.shape, dtype=bool)  # in a chain of two or more rows
        linked[:, 1:] |= t_near
        linked[:, :-1] |= t_near
        rescored = linked & (chain <= chain[:, k - 1 : k])  # ...that reaches into the top k
        which, where = np.nonzero(rescored)
        ranks = s[touched]  # a row alone in its chain keeps its float32 place and value
        ranks[which, where] = shortlist_ranks(backend, queries[touched[which]], x, t_idx[which, where][:, None], metric, block_bytes)[:, 0]
        order = np.lexsort((t_idx, -ranks, chain), axis=1)[:, :k]
        out_idx[touched] = np.take_along_axis(t_idx, order, axis=1)
        exact_vals = ranks_to_scores(np.take_along_axis(ranks, order, axis=1), metric)
        out_vals[touched] = np.where(np.take_along_axis(rescored, order, axis=1), exact_vals, np.take_along_axis(vals[touched], order, axis=1))
    redo = np.flatnonzero(~certain)
    if redo.size:
        found = certified_search(backend, queries[redo], x, norms(), k, metric, mask=mask, block_bytes=block_bytes)
        out_vals[redo], out_idx[redo] = ranks_to_scores(found.ranks, metric), found.indices
    return out_vals, out_idx
