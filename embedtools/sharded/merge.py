"""The client's exact merge of the shards' top-k: the single-machine tie rule over global rows.

Each shard sends its own best ``k`` per query (scores and global row positions). The merged top
``k`` is the best ``k`` of their union ordered by score, equal scores by the lower global row:
exactly :func:`embedtools.search.merge.best_first`, the rule a single store's search ends with, so
the merge is that one function over the concatenated candidates and nothing new.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from embedtools.protocols import Metric
from embedtools.search.merge import best_first

__all__ = ["merge_topk"]


def merge_topk(
    parts: Sequence[tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]], k: int, metric: Metric, n_queries: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The best ``k`` of every shard's ``(scores, global rows)`` for each query, best first."""
    kept = [(s, g) for s, g in parts if s.shape[1]]
    if not kept:
        return np.empty((n_queries, 0), dtype=np.float32), np.empty((n_queries, 0), dtype=np.int64)
    scores = np.hstack([s.astype(np.float32, copy=False) for s, _ in kept])
    rows = np.hstack([g.astype(np.int64, copy=False) for _, g in kept])
    best, winners = best_first(scores, rows, ascending=metric == "l2")
    width = min(k, scores.shape[1])
    return np.ascontiguousarray(best[:, :width]), np.ascontiguousarray(winners[:, :width])
