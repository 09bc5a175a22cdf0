"""Backend-neutral exact top-k: argument checks, query chunking, and the driver loop.

Each backend runs the arithmetic on its own kernels; what must be the same everywhere (how a batch
is cut so the score block stays bounded, which ``k`` and metric are legal, how ties are broken)
lives here once.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from embedtools.errors import InvalidArgumentError
from embedtools.protocols import METRICS, Metric

__all__ = ["best_first", "check_k", "check_metric", "query_chunks", "run_topk"]

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
    for known in METRICS:
        if metric == known:
            return known
    raise InvalidArgumentError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")


def query_chunks(n_queries: int, n_rows: int, max_block_bytes: int, itemsize: int = 4) -> Iterator[slice]:
    """Slices of the query batch whose score block ``(chunk, n_rows)`` fits ``max_block_bytes``.

    At least one query per chunk, so a single query over a huge corpus still runs (its row of
    scores is the floor the next issue's corpus blocking removes).
    """
    if max_block_bytes < 1:
        raise InvalidArgumentError(f"max_block_bytes must be >= 1, got {max_block_bytes}")
    per_query = max(n_rows * itemsize, 1)
    step = max(max_block_bytes // per_query, 1)
    for start in range(0, n_queries, step):
        yield slice(start, min(start + step, n_queries))


def best_first(
    values: npt.NDArray[np.float32], indices: npt.NDArray[np.int64], *, ascending: bool = False
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Sort each row's candidates best first; equal values keep the lower index first."""
    order = np.lexsort((indices, values if ascending else -values), axis=1)
    return np.take_along_axis(values, order, axis=1), np.take_along_axis(indices, order, axis=1)


def run_topk(
    n_queries: int,
    n_rows: int,
    dim: int,
    k: int,
    metric: Metric,
    max_block_bytes: int,
    *,
    score_block: Callable[[slice], BlockT],
    candidates: Callable[[BlockT, int], tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.int64]]],
    full_row: Callable[[BlockT, int], npt.NDArray[np.float32]],
    l2_distances: Callable[[slice, npt.NDArray[np.int64]], npt.NDArray[np.float32]],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The exact top-k driver every backend runs with its own kernels.

    ``score_block(chunk)`` gives the backend's ``(chunk, n_rows)`` ranking scores (larger is better);
    ``candidates(block, k)`` its k best per row on the host, unordered, plus the rows where more
    than k scores reach the k-th value (a tie straddles the cut: those rows are redone from
    ``full_row`` with a stable sort so lower indices win). For ``l2`` the winners are then rescored
    as true distances by ``l2_distances`` (the ranking expansion loses digits near 0).
    Only ``(chunk, k)`` arrays cross to the host; the score block stays on the device.
    """
    scores = np.empty((n_queries, k), dtype=np.float32)
    indices = np.empty((n_queries, k), dtype=np.int64)
    # l2 also gathers (chunk, k, dim) winners to rescore: bound that block as well.
    per_query = max(n_rows, k * dim) if metric == "l2" else n_rows
    for chunk in query_chunks(n_queries, per_query, max_block_bytes):
        block = score_block(chunk)
        vals, idx, straddling = candidates(block, k)
        vals, idx = best_first(vals, idx)
        for row in straddling:
            row_scores = full_row(block, int(row))
            best = np.argsort(-row_scores, kind="stable")[:k]
            idx[row] = best
            vals[row] = row_scores[best]
        if metric == "l2":
            vals, idx = best_first(l2_distances(chunk, idx), idx, ascending=True)
        scores[chunk] = vals
        indices[chunk] = idx
    return scores, indices
