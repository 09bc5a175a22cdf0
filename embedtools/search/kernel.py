"""The blocked exact top-k driver: argument checks, block planning, the walk over blocks.

What must be the same on every backend (how a batch is cut so the score block and the shortlists
stay bounded, which ``k`` and metric are legal, how ties are broken, how a large ``k`` starts from
a sampled floor, when a starved query is redone) lives here once. The driver sees a backend only
through the callables :mod:`embedtools.search.exact` builds from its primitives.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from embedtools.errors import DimensionError, InvalidArgumentError
from embedtools.protocols import METRICS, Metric
from embedtools.search.merge import RunningTop, best_first, host_nth_best
from embedtools.search.select import Candidates

__all__ = [
    "BLOCK_ROWS",
    "MIN_BATCH_BLOCK_ROWS",
    "SCORE_BLOCK_BYTES",
    "CANDIDATE_BYTES",
    "DECODED_BLOCK_BYTES",
    "DEVICE_BLOCK_ROWS",
    "FEW_QUERIES",
    "FEW_QUERY_BLOCK_ROWS",
    "ONE_QUERY_BLOCK_ROWS",
    "SAMPLED_FLOOR_MIN",
    "SAMPLE_STRIDE",
    "check_k",
    "check_metric",
    "check_topk_inputs",
    "plan_blocks",
    "rows_per_block",
    "run_topk",
    "sampled_floor",
    "stable_top",
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
#: For 100 queries at 384-d, ``bench_search --only exact`` ran torch's (queries, rows) product faster
#: on 8,192-row blocks than on 4,096 (and NumPy's no slower); 6,144 to 16,384 ran alike.
BLOCK_ROWS = 8192
#: Bytes of float32 scores a CPU block for a large batch holds at most: past it the block's scaling
#: and selection read scores back from memory, not cache. A 4,096-row block for 1,000 queries
#: (16 MiB of scores) made the real-set funnel's first stage and the bare kernel slower than 1,024
#: rows (4 MiB) did; batches of up to 128 queries keep :data:`BLOCK_ROWS`.
SCORE_BLOCK_BYTES = 4 << 20
#: Fewest rows a CPU batch block shrinks to, however many queries: below it the GEMM loses speed.
MIN_BATCH_BLOCK_ROWS = 1024
#: Corpus rows per block for a single query on a CPU: its product is a GEMV that streams the table at
#: memory speed, and 4,096-row blocks only added a call, a compare and a merge per block to it.
ONE_QUERY_BLOCK_ROWS = 1 << 20
#: Fewer queries than this are "a few" on a CPU: their product, like one query's, reads each row for a
#: few multiply-adds and runs at the speed of memory (torch times no way for them either:
#: ``torch_products.QUERY_CLASSES``), so their blocks take up to :data:`FEW_QUERY_BLOCK_ROWS` rows
#: within :data:`SCORE_BLOCK_BYTES`: each block costs a call, a compare and a merge, as for one query
#: (``bench_search --scaling`` times the queries axis against torch naive).
FEW_QUERIES = 16
FEW_QUERY_BLOCK_ROWS = 1 << 16


#: Corpus rows per block on a GPU, where no cache needs fitting and a 4,096-row block is microseconds
#: of work: each block costs kernel launches and one wait for its candidates' count, which would
#: outweigh the GEMM. Still within ``max_block_bytes``.
DEVICE_BLOCK_ROWS = 1 << 16


#: Bytes of decoded float32 rows a CPU block holds when the corpus is decoded (or re-framed) block by
#: block: the decoded block is written, then read by the GEMM, and one that stays in cache made an
#: int8 screen faster at 100 and at 1,000 queries, where a 4,096-row block (6 MiB at 384-d) did not.
#: It also bounds the one-query case, which would otherwise decode up to a million rows at once.
DECODED_BLOCK_BYTES = 3 << 20


def rows_per_block(n_queries: int, *, gpu: bool, decoded_width: int | None = None) -> int:
    """Rows per top-k block: :data:`DEVICE_BLOCK_ROWS` on a GPU; on a CPU, :data:`ONE_QUERY_BLOCK_ROWS`
    for one query, :data:`FEW_QUERY_BLOCK_ROWS` for a few and :data:`BLOCK_ROWS` for a batch (whose GEMM and selection want a block of
    scores that stays in cache, so a large batch gets fewer rows: at most :data:`SCORE_BLOCK_BYTES`
    of scores, at least :data:`MIN_BATCH_BLOCK_ROWS` rows), and for a corpus decoded block by block (``decoded_width``: the
    decoded rows' width) at most :data:`DECODED_BLOCK_BYTES` of decoded rows, in a multiple of 64
    rows. Every backend asks here, so they agree."""
    if gpu:
        return DEVICE_BLOCK_ROWS
    if n_queries == 1:
        rows = ONE_QUERY_BLOCK_ROWS
    else:
        fitting = SCORE_BLOCK_BYTES // (4 * max(n_queries, 1)) // 64 * 64
        rows = min(FEW_QUERY_BLOCK_ROWS if n_queries < FEW_QUERIES else BLOCK_ROWS, max(MIN_BATCH_BLOCK_ROWS, fitting))
    if decoded_width is not None:
        rows = min(rows, max(DECODED_BLOCK_BYTES // (4 * max(decoded_width, 1)) // 64 * 64, 64))
    return rows


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
#: final threshold from a sample (:func:`sampled_floor`): every one with ``k >= 1``. It was 100, on the
#: grounds that a short shortlist's running threshold settles within a block or two; that holds for
#: rows in random order, not for a table added topic by topic (the real benchmark set, documentation
#: embedded module by module), where each block brought a query hundreds of candidates to fold and
#: ``k = 10`` took 1.3x its time with the floor (``bench_search --only real``'s sweeps time each k).
SAMPLED_FLOOR_MIN = 2
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



def stable_top(scores: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.int64]:
    """Positions of the ``k`` best of one query's scores, best first, equal scores lower position
    first: ``np.argsort(-scores, kind="stable")[:k]``, sorting only the scores at least the k-th
    best (a tied query's redo sorted all of a table's scores, several times per search on the
    real set, whose duplicate texts tie exactly)."""
    n = scores.shape[0]
    if k >= n or np.isnan(scores).any():  # NaN orders last in argsort but partitions as the largest
        return np.argsort(-scores, kind="stable")[:k].astype(np.int64)
    kth = np.partition(scores, n - k)[n - k]
    cand = np.flatnonzero(scores >= kth)
    order = np.argsort(-scores[cand], kind="stable")[:k]
    return cand[order].astype(np.int64)


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
    way — float32 rows go through :mod:`embedtools.search.rescore`, which is exact. ``settle_ties=False`` skips the redo, for approximate
    shortlists whose scores tie by nature (Hamming distances) and are rescored anyway.

    Over more than one block (``m >= SAMPLED_FLOOR_MIN``, i.e. any ``k``): each query's threshold starts at a floor guessed from
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

        def walk(qs: slice, floor: npt.NDArray[np.float32] | None) -> RunningTop:
            running = RunningTop(qs.stop - qs.start, wanted, floor)
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
                best = stable_top(row_scores, k)
                idx[row, :k] = best
                vals[row, :k] = row_scores[best]
        vals, idx = vals[:, :k], np.ascontiguousarray(idx[:, :k])
        if metric == "l2":
            vals, idx = best_first(l2_distances(qs, idx), idx, ascending=True)
        scores[qs] = vals
        indices[qs] = idx
    return scores, indices

