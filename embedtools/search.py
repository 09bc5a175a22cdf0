"""Backend-neutral exact top-k: argument checks, block planning, and the driver loop.

Each backend runs the arithmetic on its own kernels; what must be the same everywhere (how a batch
is cut so the score block and the shortlists stay bounded, which ``k`` and metric are legal, how ties
are broken, how a large ``k`` starts from a sampled floor, how candidates are merged) lives here once.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from embedtools.errors import DimensionError, InvalidArgumentError
from embedtools.protocols import METRICS, ArrayBackend, ArrayT, Metric

__all__ = [
    "BLOCK_ROWS",
    "CANDIDATE_BYTES",
    "DEVICE_BLOCK_ROWS",
    "ONE_QUERY_BLOCK_ROWS",
    "SAMPLED_FLOOR_MIN",
    "SAMPLE_STRIDE",
    "Candidates",
    "best_first",
    "check_k",
    "check_metric",
    "check_topk_inputs",
    "rows_per_block",
    "head_rows",
    "host_candidates",
    "host_nth_best",
    "plan_blocks",
    "rescore",
    "run_topk",
    "sampled_floor",
]

BlockT = TypeVar("BlockT")


def check_k(k: object) -> int:
    """``k`` as a positive int; bools and floats are refused (the seed sliced with them)."""
    if isinstance(k, bool):
        raise InvalidArgumentError(f"k must be a positive integer, got {k!r}")
    try:
        value = operator.index(k)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArgumentError(f"k must be a positive integer, got {k!r}") from None
    if value < 1:
        raise InvalidArgumentError(f"k must be >= 1, got {value}")
    return value


def check_metric(metric: object) -> Metric:
    """One of ``METRICS``; anything but a str (a numpy array, whose ``==`` is elementwise) is refused."""
    for known in METRICS:
        if isinstance(metric, str) and metric == known:
            return known
    raise InvalidArgumentError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")


def check_topk_inputs(query_width: int, row_width: int, metric: Metric, corpus_norms: object, decode: object) -> None:
    """What every backend's ``topk`` refuses alike: widths that differ, and a coded corpus without
    the norms that ``cosine``/``l2`` would otherwise compute by decoding it whole."""
    if query_width != row_width:
        raise DimensionError(f"queries have width {query_width}, corpus rows {row_width}")
    if decode is not None and metric != "dot" and corpus_norms is None:
        raise InvalidArgumentError(f"a decoded corpus needs corpus_norms for {metric!r} (the original rows' norms)")


#: Corpus rows scored per block on a CPU: small enough that a block of scores for a batch of queries
#: stays in cache while it is scaled and its candidates are selected, large enough for an efficient GEMM.
BLOCK_ROWS = 4096
#: Corpus rows per block for a single query on a CPU: its product is a GEMV that streams the table at
#: memory speed, and 4,096-row blocks only added a call, a compare and a merge per block to it.
ONE_QUERY_BLOCK_ROWS = 1 << 20


#: Corpus rows per block on a GPU, where no cache needs fitting and a 4,096-row block is microseconds
#: of work: each block costs kernel launches and one wait for its candidates' count, which would
#: outweigh the GEMM. Still within ``max_block_bytes``.
DEVICE_BLOCK_ROWS = 1 << 16


def rows_per_block(n_queries: int, *, gpu: bool) -> int:
    """Rows per top-k block: :data:`DEVICE_BLOCK_ROWS` on a GPU; on a CPU, :data:`ONE_QUERY_BLOCK_ROWS`
    for one query and :data:`BLOCK_ROWS` for a batch (whose GEMM and selection want a block of
    scores that stays in cache). Every backend asks here, so they agree."""
    if gpu:
        return DEVICE_BLOCK_ROWS
    return ONE_QUERY_BLOCK_ROWS if n_queries == 1 else BLOCK_ROWS


#: Host bytes a query's running shortlist may hold per candidate it keeps: its value and index
#: (12), up to four times as many buffered candidates awaiting a fold (20 each: query, value,
#: column), and the fold's copies of them.
CANDIDATE_BYTES = 12 + 4 * 20 * 3


def plan_blocks(
    n_queries: int,
    n_rows: int,
    max_block_bytes: int,
    itemsize: int = 4,
    block_rows: int = BLOCK_ROWS,
    per_query_bytes: int = 0,
) -> tuple[int, int]:
    """``(queries, rows)`` per score block: ``rows`` up to ``block_rows``, then as many queries
    as ``max_block_bytes`` allows (at least one), so the corpus is read once per query chunk.
    ``per_query_bytes`` is what each query of a chunk holds besides its scores (a large k's
    shortlist), so a chunk's shortlists count against the same bound as its score block."""
    if max_block_bytes < 1:
        raise InvalidArgumentError(f"max_block_bytes must be >= 1, got {max_block_bytes}")
    rows = max(min(n_rows, block_rows, max_block_bytes // itemsize), 1)
    queries = max(min(n_queries, max_block_bytes // (rows * itemsize + per_query_bytes)), 1)
    return queries, rows


def _chunks(total: int, step: int) -> Iterator[slice]:
    for start in range(0, total, step):
        yield slice(start, min(start + step, total))


#: A top-k whose running shortlist ``m = k + 1`` is at least this long first guesses each query's
#: final threshold from a sample (:func:`sampled_floor`); for smaller ``m`` the running threshold
#: settles within a block or two anyway.
SAMPLED_FLOOR_MIN = 100
#: Every this-many-th row is sampled: 1/32 more GEMM work, against folding several times fewer candidates.
SAMPLE_STRIDE = 32


def sampled_floor(
    nth_best: Callable[[slice, int], npt.NDArray[np.float32]],
    n_rows: int,
    m: int,
    row_mask: npt.NDArray[np.bool_] | None,
    max_sample_rows: int,
) -> npt.NDArray[np.float32] | None:
    """A guess at each query's final m-th best score, from every :data:`SAMPLE_STRIDE`-th row.

    The running threshold (the m-th best so far) starts at ``-inf`` and is a weak bound while only
    a few times ``m`` rows are seen: for ``k`` in the thousands the driver used to fold many times
    more candidates than it kept (``bench_search --only large-k`` times both). A strided sample of ``S`` rows holds each query's true top ``m`` about
    ``m·S/n`` times; its score at rank ``m·S/n + 4·sqrt(m·S/n) + 1`` is below the true m-th best
    except with negligible probability for any row order not built against the stride, and the
    driver *checks* that it was: a query whose final m-th best is below its floor is redone without
    one, so the floor changes the time a search takes, never its result. ``nth_best(rows, n)``
    gives each query's n-th best ranking score over a strided slice of rows, on the host (found on
    the backend's device: only ``(queries,)`` crosses); ``None`` when the sample would be too small
    to say anything.
    """
    stride = max(SAMPLE_STRIDE, -(-n_rows // max(max_sample_rows, 1)))
    sample = slice(0, n_rows, stride)
    population = n_rows if row_mask is None else int(np.count_nonzero(row_mask))
    size = len(range(n_rows)[sample]) if row_mask is None else int(np.count_nonzero(row_mask[sample]))
    expected = m * size / max(population, 1)
    rank = math.ceil(expected + 4 * math.sqrt(expected)) + 1
    if 4 * rank > size:
        return None
    return nth_best(sample, rank)


def host_nth_best(scores: npt.NDArray[np.float32], n: int) -> npt.NDArray[np.float32]:
    """Each row's n-th largest value of a host ``(queries, rows)`` array."""
    out: npt.NDArray[np.float32] = np.partition(scores, scores.shape[1] - n, axis=1)[:, -n].copy()
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


Candidates = tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64]]
"""Flat ``(query_rows, values, columns)``: any number of candidate scores from one block."""


def run_topk(
    n_queries: int,
    n_rows: int,
    dim: int,
    k: int,
    metric: Metric,
    max_block_bytes: int,
    *,
    score_block: Callable[[slice, slice], BlockT],
    candidates: Callable[[BlockT, int, npt.NDArray[np.float32]], Candidates],
    to_host: Callable[[BlockT], npt.NDArray[np.float32]],
    l2_distances: Callable[[slice, npt.NDArray[np.int64]], npt.NDArray[np.float32]],
    settle_ties: bool = True,
    row_mask: npt.NDArray[np.bool_] | None = None,
    nth_best: Callable[[BlockT, int], npt.NDArray[np.float32]] | None = None,
    block_rows: int = BLOCK_ROWS,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The exact top-k driver every backend runs with its own kernels.

    The corpus is walked in blocks of ``block_rows`` rows (:func:`rows_per_block`); ``score_block(queries, rows)`` gives the backend's
    ranking scores for that block (larger is better) and ``candidates(block, m, threshold)`` the
    scores that may enter each query's running top ``m``: at least every score above that query's
    ``threshold`` (the m-th best so far; ``-inf`` while fewer than ``m`` are known), as flat
    ``(query_row, value, column)`` arrays. A backend may return exactly its block's top ``m``
    (``torch.topk``) or every score above the threshold (one vectorised compare, so most of a block
    is rejected without a partition). The running top ``m`` is merged on the host; extra memory is
    one score block, never the whole query × corpus matrix.

    Ties: the driver keeps ``m = k + 1``. Where the (k+1)-th best equals the k-th, a tie may
    straddle the cut (a block may have dropped an equal score), and that query alone is redone over
    the whole corpus with a stable sort so lower indices win; elsewhere the top ``k`` are exactly
    determined. For ``l2`` the winners are rescored as true distances by ``l2_distances`` (the
    ranking expansion loses digits near 0); the backends run only decoded (quantised) l2 this
    way — float32 rows go through :mod:`embedtools.certified`, which is exact. ``settle_ties=False`` skips the redo, for approximate
    shortlists whose scores tie by nature (Hamming distances) and are rescored anyway.

    Large ``k`` (``m >= SAMPLED_FLOOR_MIN``): each query's threshold starts at a floor guessed from
    a strided sample of rows (:func:`sampled_floor`) instead of ``-inf``, and a query that the floor
    left with fewer than ``m`` candidates is redone without one. ``nth_best(block, n)`` gives each
    query's n-th best score of a block, on the host (default: ``to_host`` and a partition there).

    With a ``row_mask`` the backend's ranking scores are ``-inf`` on masked rows; the driver skips
    blocks with no unmasked row and keeps ``k`` at most the number of unmasked rows.
    """
    if row_mask is not None:
        k = min(k, int(np.count_nonzero(row_mask)))
    scores = np.empty((n_queries, k), dtype=np.float32)
    indices = np.empty((n_queries, k), dtype=np.int64)
    if k == 0:
        return scores, indices
    wanted = min(k + 1, n_rows if row_mask is None else int(np.count_nonzero(row_mask)))
    # l2 also gathers (chunk, k, dim) winners to rescore: bound that block as well.
    query_step, row_step = plan_blocks(
        n_queries,
        max(n_rows, k * dim) if metric == "l2" else n_rows,
        max_block_bytes,
        block_rows=block_rows,
        per_query_bytes=CANDIDATE_BYTES * wanted,
    )
    row_step = min(row_step, n_rows)
    for qs in _chunks(n_queries, query_step):

        def walk(qs: slice, floor: npt.NDArray[np.float32] | None) -> _Running:
            running = _Running(qs.stop - qs.start, wanted, floor)
            for rs in _chunks(n_rows, row_step):
                if row_mask is not None and not row_mask[rs].any():
                    continue
                rows, vals, cols = candidates(score_block(qs, rs), wanted, running.threshold)
                running.merge(rows, vals, cols + rs.start)
            return running

        def sample_nth_best(sample: slice, n: int, qs: slice = qs) -> npt.NDArray[np.float32]:
            block = score_block(qs, sample)
            return host_nth_best(to_host(block), n) if nth_best is None else nth_best(block, n)

        floor = None
        if wanted >= SAMPLED_FLOOR_MIN and n_rows > row_step:
            floor = sampled_floor(
                sample_nth_best,
                n_rows,
                wanted,
                row_mask,
                max_block_bytes // (4 * (qs.stop - qs.start)),
            )
        vals, idx = walk(qs, floor).result()
        if floor is not None:  # a floor above a query's m-th best may have hidden rows: redo it
            for row in np.flatnonzero(~(vals[:, -1] >= floor)):
                query = qs.start + int(row)
                redone_vals, redone_idx = walk(slice(query, query + 1), None).result()
                vals[row], idx[row] = redone_vals[0], redone_idx[0]
        if wanted > k and settle_ties:
            for row in np.flatnonzero(vals[:, k] == vals[:, k - 1]):
                query = qs.start + int(row)
                row_scores = to_host(score_block(slice(query, query + 1), slice(0, n_rows)))[0]
                best = np.argsort(-row_scores, kind="stable")[:k]
                idx[row, :k] = best
                vals[row, :k] = row_scores[best]
        vals, idx = vals[:, :k], np.ascontiguousarray(idx[:, :k])
        if metric == "l2":
            vals, idx = best_first(l2_distances(qs, idx), idx, ascending=True)
        scores[qs] = vals
        indices[qs] = idx
    return scores, indices


def host_candidates(block: npt.NDArray[np.float32], m: int, threshold: npt.NDArray[np.float32]) -> Candidates:
    """Scores of a ``(rows, queries)`` block that may enter each query's running top ``m``.

    One compare against each query's threshold rejects nearly the whole block. Until every query
    has ``m`` candidates, a large block's threshold is the m-th best of its first
    :func:`head_rows` rows (all its rows scoring at least that include that head's top ``m``): a
    partition of the head instead of an ``argpartition`` of the whole block, which cost more time
    and three blocks' worth of index arrays. A small block gives its own top ``m`` per query.
    """
    n, queries = block.shape
    if np.isneginf(threshold).any():
        head = head_rows(m)
        if 2 * head <= n:
            first = np.partition(block[:head], head - m, axis=0)[head - m]
            flat = np.flatnonzero(block >= np.maximum(threshold, first))
            cols, rows = np.divmod(flat, queries)
            return rows, block.reshape(-1)[flat], cols
        if m >= n:
            picked = np.broadcast_to(np.arange(n, dtype=np.int64)[:, None], block.shape)
        else:
            picked = np.argpartition(block, n - m, axis=0)[n - m :].astype(np.int64, copy=False)
        vals = np.take_along_axis(block, picked, axis=0)
        return (
            np.repeat(np.arange(queries, dtype=np.int64), picked.shape[0]),
            np.ascontiguousarray(vals.T).reshape(-1),
            np.ascontiguousarray(picked.T).reshape(-1),
        )
    flat = np.flatnonzero(block > threshold)
    cols, rows = np.divmod(flat, queries)
    return rows, block.reshape(-1)[flat], cols


def head_rows(m: int) -> int:
    """Rows whose m-th best score is a first block's threshold: enough that only ~``m·n/head``
    of the block's ``n`` rows pass it."""
    return max(64 * m, 1024)


#: From this many new candidates per query, a fold partitions query by query (one Python step
#: each) instead of padding all queries to the longest; below it, the padding is the cheaper.
_FOLD_EACH_FROM = 256


class _Running:
    """Each query's best ``m`` candidates so far, as dense ``(queries, m)`` arrays (``-inf`` empty).

    New candidates are buffered and folded in only when the buffer outgrows a few times
    ``queries x m``: grouping them by query is a radix sort on 16-bit query numbers, and keeping the
    best ``m`` of each query one ``argpartition`` (over all queries at once, padded, or query by
    query when there are many candidates per query) — per block this cost more than the GEMM for
    shortlists of a few hundred. Thresholds (each row's m-th best)
    are refreshed at each fold; between two they are merely lower than they could be, which lets a
    few more candidates through and changes nothing. A ``floor`` (see :func:`sampled_floor`) keeps
    thresholds at least that high; a query it starved of candidates ends with empty (``-inf``, ``-1``)
    slots, for the driver to redo.
    """

    def __init__(self, n_queries: int, m: int, floor: npt.NDArray[np.float32] | None = None) -> None:
        self.floor = np.full(n_queries, -np.inf, dtype=np.float32) if floor is None else floor
        self.starving_allowed = floor is not None
        self.m = m
        self.vals = np.full((n_queries, m), -np.inf, dtype=np.float32)
        self.cols = np.full((n_queries, m), -1, dtype=np.int64)
        self.pending: list[Candidates] = []
        self.pending_size = 0
        self.limit = max(4 * n_queries * m, 1 << 16)
        self.threshold = self.floor
        self.empty = True

    def merge(self, rows: npt.NDArray[np.int64], vals: npt.NDArray[np.float32], cols: npt.NDArray[np.int64]) -> None:
        if rows.size == 0:
            return
        n_queries = self.vals.shape[0]
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
            self._fold()

    def _fold(self) -> None:
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
        if rows.size >= _FOLD_EACH_FROM * n_queries:
            self._fold_each(vals, cols, counts)
        else:
            self._fold_dense(rows, vals, cols, counts)
        self.threshold = np.maximum(self.vals.min(axis=1), self.floor)

    def _fold_each(self, vals: npt.NDArray[np.float32], cols: npt.NDArray[np.int64], counts: npt.NDArray[np.intp]) -> None:
        """Query by query: one partition over exactly the query's own candidates, no padding."""
        ends = np.cumsum(counts)
        for i, (end, count) in enumerate(zip(ends.tolist(), counts.tolist(), strict=True)):
            if count:
                v = np.concatenate((self.vals[i], vals[end - count : end]))
                c = np.concatenate((self.cols[i], cols[end - count : end]))
                keep = np.argpartition(v, v.size - self.m)[v.size - self.m :]
                self.vals[i], self.cols[i] = v[keep], c[keep]

    def _fold_dense(
        self, rows: npt.NDArray[np.int64], vals: npt.NDArray[np.float32], cols: npt.NDArray[np.int64], counts: npt.NDArray[np.intp]
    ) -> None:
        """All queries at once, through a ``(queries, m + most per query)`` array padded with ``-inf``."""
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
        self._fold()
        if not self.starving_allowed and (self.cols < 0).any():
            raise AssertionError("every query must have m candidates by the end of the corpus")  # pragma: no cover
        return best_first(self.vals, self.cols)


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
    (:func:`embedtools.certified.rescore_shortlists`: cosine and dot by a float32 product as
    the full search scores them, rows whose norm is beyond float32's comfortable range exactly;
    ``l2`` as ``||q - x||`` from float64 differences, so offset data loses nothing), in blocks that stay
    within ``max_block_bytes``; ties go to the lower row index. With ``decode``, ``corpus`` is a
    quantised index's codes and the gathered rows are decoded first.
    """
    from embedtools.certified import ranks_to_scores, rescore_shortlists  # it builds on this module's helpers

    ranks, indices = rescore_shortlists(
        backend, queries, corpus, candidates, keep, metric, max_block_bytes, decode=decode, norms=norms
    )
    return ranks_to_scores(ranks, metric), indices
