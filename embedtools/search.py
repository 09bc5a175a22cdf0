"""Backend-neutral pieces of exact top-k search: argument checks and query chunk planning.

Each backend runs the arithmetic on its own kernels; what must be the same everywhere (how a batch
is cut so the score block stays bounded, which ``k`` and metric are legal) lives here once.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator

from embedtools.errors import InvalidArgumentError
from embedtools.protocols import METRICS, Metric

__all__ = ["check_k", "check_metric", "query_chunks"]


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
