"""Candidate merging on the host: each query's running top ``m``, and best-first ordering.

Whatever a backend's block selection returns (a block's own top ``m``, or every score above a
threshold: :mod:`embedtools.search.select`) arrives here as flat
:data:`~embedtools.search.select.Candidates` and is folded into dense per-query shortlists,
so the kernel's result and its tie rule do not depend on which library scored the block.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from embedtools.search.select import GROUPS_PER_SLOT, Candidates

__all__ = ["RunningTop", "best_first", "host_nth_best"]

def host_nth_best(scores: npt.NDArray[np.float32], n: int) -> npt.NDArray[np.float32]:
    """Each row's n-th largest value of a host ``(queries, rows)`` array; the transpose of a
    ``(rows, queries)`` block is read in its own memory order, not copied.

    A partition of every row was the sampled floor's largest cost in a profile of the real-set
    funnel (``bench_search --only real`` times the funnel). The n-th largest of
    :data:`GROUPS_PER_SLOT` ``· n`` group maxima is a floor that at least ``n`` scores reach (each
    maximum is another score), so a row's ``n`` best are among the scores at that floor or above:
    one max-reduction, one compare, and a sort of those few. A row holding NaN (which a partition
    orders above every number) is partitioned whole, as before."""
    queries, width = scores.shape
    groups = GROUPS_PER_SLOT * n
    if width < 4 * groups:  # narrow rows: the partition costs no more
        return _partitioned_nth_best(scores, n)
    size = width // groups
    by_column = bool(scores.flags.f_contiguous and not scores.flags.c_contiguous)
    lanes = scores.T if by_column else scores  # in memory order: (width, queries) or (queries, width)
    if by_column:
        maxima = np.max(lanes[: groups * size].reshape(groups, size, queries), axis=1).T
        tail = lanes[groups * size :].T
    else:
        maxima = np.max(lanes[:, : groups * size].reshape(queries, groups, size), axis=2)
        tail = lanes[:, groups * size :]
    floor = np.partition(maxima, groups - n, axis=1)[:, groups - n]
    flat = np.flatnonzero(lanes >= (floor if by_column else floor[:, None]))
    values = lanes.reshape(-1)[flat].astype(np.float32)
    rows = flat % queries if by_column else flat // width
    counts = np.bincount(rows, minlength=queries)
    # one sort of (row, score best first) keys: the row above, the score's ordered bits below
    order_bits = _ordered_bits(values + np.float32(0.0), descending=True).astype(np.int64) + (1 << 31)  # signed order, from 0
    keys = np.sort((rows.astype(np.int64) << 32) | order_bits)
    starts = np.cumsum(counts) - counts
    out = np.empty(queries, dtype=np.float32)
    whole = np.isnan(maxima).any(axis=1) | np.isnan(tail).any(axis=1) | (counts < n)
    good = np.flatnonzero(~whole)
    picked = ((keys[starts[good] + n - 1] & _LOW) - (1 << 31)).astype(np.int32)
    out[good] = _float_of_bits(picked, descending=True)
    if good.size != queries:
        out[whole] = _partitioned_nth_best(scores[whole], n)
    return out


def _partitioned_nth_best(scores: npt.NDArray[np.float32], n: int) -> npt.NDArray[np.float32]:
    out: npt.NDArray[np.float32] = np.partition(scores, scores.shape[1] - n, axis=1)[:, -n].astype(np.float32)
    return out



def best_first(
    values: npt.NDArray[np.float32], indices: npt.NDArray[np.int64], *, ascending: bool = False
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Sort each row's candidates best first; equal values keep the lower index first.

    Each (value, index) pair is packed into one int64 whose order is the wanted order (the value's
    bits made monotonic above, the index below), so one ``np.sort`` does what ``np.lexsort`` over
    two keys plus two gathers did: it mattered for the shortlists of a large ``k``. ``-0.0``
    comes back as ``0.0``. Indices outside ``[0, 2**32)`` take the ``lexsort`` path.
    """
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= 1 << 32):
        order = np.lexsort((indices, values if ascending else -values), axis=1)
        return np.take_along_axis(values, order, axis=1), np.take_along_axis(indices, order, axis=1)
    keys = _ordered_bits(np.asarray(values, dtype=np.float32) + np.float32(0.0), descending=not ascending)
    packed = (keys.astype(np.int64) << 32) | indices
    packed.sort(axis=1)
    return _float_of_bits((packed >> 32).astype(np.int32), descending=not ascending), packed & 0xFFFFFFFF


_MAGNITUDE = np.int32(0x7FFFFFFF)


def _ordered_bits(values: npt.NDArray[np.float32], *, descending: bool) -> npt.NDArray[np.int32]:
    """int32s that order as ``values`` do (ascending, or descending): IEEE bits with the magnitude
    bits of negatives flipped. ``-0.0`` orders below ``0.0``: callers add ``0.0`` first."""
    bits = values.view(np.int32)
    keys: npt.NDArray[np.int32] = bits ^ ((bits >> 31) & _MAGNITUDE)
    return ~keys if descending else keys


def _float_of_bits(keys: npt.NDArray[np.int32], *, descending: bool) -> npt.NDArray[np.float32]:
    bits = ~keys if descending else keys
    out: npt.NDArray[np.float32] = (bits ^ ((bits >> 31) & _MAGNITUDE)).view(np.float32)
    return out


#: The packed key of an empty slot (``-inf``, index ``-1``): after every real candidate, ``-inf`` ones too.
_LOW = 0xFFFFFFFF


def _pack(values: npt.NDArray[np.float32], indices: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """int64 keys whose ascending order is best first, equal values by lower index (``-1``, an
    empty slot, as the highest): :func:`best_first`'s keys, for indices below ``2**32 - 1``."""
    keys = _ordered_bits(np.asarray(values, dtype=np.float32) + np.float32(0.0), descending=True).astype(np.int64) << 32
    keys |= indices & _LOW
    return keys


def _unpack(keys: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    cols = keys & _LOW
    cols[cols == _LOW] = -1
    return _float_of_bits((keys >> 32).astype(np.int32), descending=True), cols


#: From this many new candidates per query, a fold partitions query by query (one Python step
#: each) instead of padding all queries to the longest; below it, the padding is the cheaper.
_FOLD_EACH_FROM = 256


class RunningTop:
    """Each query's best ``m`` candidates so far, as dense ``(queries, m)`` arrays (``-inf`` empty).

    New candidates are buffered and folded in only when the buffer outgrows a few times
    ``queries x m``: grouping them by query is a radix sort on 16-bit query numbers, and keeping the
    best ``m`` of each query one ``partition`` (over all queries at once, padded, or query by
    query when there are many candidates per query) — per block this cost more than the GEMM for
    shortlists of a few hundred. What is partitioned are :func:`best_first`'s packed keys, value
    above and index below, so of equal values the lower indices are kept whatever the blocks and
    folds were (a candidate rejected for equalling a threshold has a higher index than the row
    that set it: blocks arrive in row order). Thresholds (each row's m-th best)
    are refreshed at each fold; between two they are merely lower than they could be, which lets a
    few more candidates through and changes nothing. A ``floor`` (see :func:`sampled_floor`) keeps
    thresholds at least that high; a query it starved of candidates ends with empty (``-inf``, ``-1``)
    slots, for the driver to redo.
    """

    def __init__(self, n_queries: int, m: int, floor: npt.NDArray[np.float32] | None = None) -> None:
        self.floor: npt.NDArray[np.float32] = np.full(n_queries, -np.inf, dtype=np.float32) if floor is None else floor
        self.starving_allowed: bool = floor is not None
        self.m = m
        self.vals: npt.NDArray[np.float32] = np.full((n_queries, m), -np.inf, dtype=np.float32)
        self.cols: npt.NDArray[np.int64] = np.full((n_queries, m), -1, dtype=np.int64)
        self.pending: list[Candidates] = []
        self.pending_size: int = 0
        self.limit: int = max(4 * n_queries * m, 1 << 16)
        self.threshold: npt.NDArray[np.float32] = self.floor
        self.empty: bool = True

    def merge(self, rows: npt.NDArray[np.int64], vals: npt.NDArray[np.float32], cols: npt.NDArray[np.int64]) -> None:
        if rows.size == 0:
            return
        n_queries: int = self.vals.shape[0]
        if self.empty and rows.size == self.vals.size and np.array_equal(rows, np.repeat(np.arange(n_queries), self.m)):
            # a first block's own top m of every query, query by query (what every backend's
            # candidates give while thresholds are -inf): it is the running top m as it stands
            self.vals = vals.astype(np.float32).reshape(n_queries, self.m)
            self.cols = cols.astype(np.int64).reshape(n_queries, self.m)
            self.threshold = np.maximum(self.vals.min(axis=1), self.floor)
            self.empty = False
            return
        self.empty = False
        self.pending.append((rows, vals.astype(np.float32, copy=False), cols))
        self.pending_size += rows.size
        if self.pending_size > self.limit or np.isneginf(self.threshold).any():
            self.fold()

    def fold(self) -> None:
        """Fold the buffered candidates in now (the kernel leaves it to :meth:`merge` and :meth:`result`)."""
        if not self.pending:
            return
        rows = np.concatenate([p[0] for p in self.pending])
        vals = np.concatenate([p[1] for p in self.pending])
        cols = np.concatenate([p[2] for p in self.pending])
        self.pending, self.pending_size = [], 0
        n_queries = self.vals.shape[0]
        key = rows.astype(np.uint16) if n_queries <= 1 << 16 else rows
        order = np.argsort(key, kind="stable")  # radix sort for 16-bit keys
        rows, vals, cols = rows[order], vals[order], cols[order]
        counts = np.bincount(rows, minlength=n_queries)
        if max(int(cols.max(initial=0)), int(self.cols.max(initial=0))) >= _LOW:  # 4 billion rows: by value
            self._fold_by_value(rows, vals, cols, counts)
        else:
            own, keys = _pack(self.vals, self.cols), _pack(vals, cols)
            kept = self._fold_each(own, keys, counts) if rows.size >= _FOLD_EACH_FROM * n_queries else self._fold_dense(own, rows, keys, counts)
            self.vals, self.cols = _unpack(kept)
        self.threshold = np.maximum(self.vals.min(axis=1), self.floor)

    def _fold_each(self, own: npt.NDArray[np.int64], keys: npt.NDArray[np.int64], counts: npt.NDArray[np.intp]) -> npt.NDArray[np.int64]:
        """Query by query: one partition over exactly the query's own candidates, no padding."""
        ends = np.cumsum(counts)
        for i, (end, count) in enumerate(zip(ends.tolist(), counts.tolist(), strict=True)):
            if count:
                own[i] = np.partition(np.concatenate((own[i], keys[end - count : end])), self.m - 1)[: self.m]
        return own

    def _fold_dense(
        self, own: npt.NDArray[np.int64], rows: npt.NDArray[np.int64], keys: npt.NDArray[np.int64], counts: npt.NDArray[np.intp]
    ) -> npt.NDArray[np.int64]:
        """All queries at once, through a ``(queries, m + most per query)`` array padded with empty slots."""
        n_queries = own.shape[0]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        slot = np.arange(rows.size) - starts[rows]
        dense = np.full((n_queries, int(counts.max())), _pack(np.full(1, -np.inf, np.float32), np.full(1, -1, np.int64))[0])
        dense[rows, slot] = keys
        kept: npt.NDArray[np.int64] = np.partition(np.hstack([own, dense]), self.m - 1, axis=1)[:, : self.m]
        return kept

    def _fold_by_value(
        self, rows: npt.NDArray[np.int64], vals: npt.NDArray[np.float32], cols: npt.NDArray[np.int64], counts: npt.NDArray[np.intp]
    ) -> None:
        """Indices beyond 32 bits: padded as :meth:`_fold_dense`, partitioned by value alone."""
        n_queries = self.vals.shape[0]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        slot = np.arange(rows.size) - starts[rows]
        width = int(counts.max())
        dense_vals = np.full((n_queries, width), -np.inf, dtype=np.float32)
        dense_cols = np.full((n_queries, width), -1, dtype=np.int64)
        dense_vals[rows, slot] = vals
        dense_cols[rows, slot] = cols
        all_vals = np.hstack([self.vals, dense_vals])
        all_cols = np.hstack([self.cols, dense_cols])
        keep = np.argpartition(all_vals, width, axis=1)[:, width:]
        self.vals = np.take_along_axis(all_vals, keep, axis=1)
        self.cols = np.take_along_axis(all_cols, keep, axis=1)

    def result(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """``(n_queries, m)`` values and indices, best first, equal values by ascending index."""
        self.fold()
        if not self.starving_allowed and (self.cols < 0).any():
            raise AssertionError("every query must have m candidates by the end of the corpus")  # pragma: no cover
        return best_first(self.vals, self.cols)

