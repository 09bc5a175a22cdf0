"""Exact search, read top to bottom: :mod:`~embedtools.search.plan` turns a search's arguments into a
named plan and runs its strategy; :mod:`~embedtools.search.exact` is the one exact top-k over a
backend's primitives (the metric arithmetic); :mod:`~embedtools.search.kernel` walks the corpus in
blocks; :mod:`~embedtools.search.merge` folds each block's candidates into running shortlists;
:mod:`~embedtools.search.rescore` scores shortlists exactly; :mod:`~embedtools.search.l2_certified` certifies float32 l2.

The names other modules, tests and benchmarks import are re-exported here.
"""

from __future__ import annotations

from embedtools.search.kernel import (
    BLOCK_ROWS,
    CANDIDATE_BYTES,
    DECODED_BLOCK_BYTES,
    DEVICE_BLOCK_ROWS,
    MIN_BATCH_BLOCK_ROWS,
    ONE_QUERY_BLOCK_ROWS,
    SAMPLE_STRIDE,
    SCORE_BLOCK_BYTES,
    SAMPLED_FLOOR_MIN,
    check_k,
    check_metric,
    check_topk_inputs,
    plan_blocks,
    rows_per_block,
    run_topk,
    sampled_floor,
    stable_top,
)
from embedtools.search.merge import RunningTop, best_first, host_nth_best
from embedtools.search.select import GROUPS_PER_SLOT, Candidates, group_floor, host_candidates, unscaled_bound
from embedtools.search.rescore import rescore

__all__ = [
    "BLOCK_ROWS",
    "CANDIDATE_BYTES",
    "DECODED_BLOCK_BYTES",
    "DEVICE_BLOCK_ROWS",
    "GROUPS_PER_SLOT",
    "MIN_BATCH_BLOCK_ROWS",
    "ONE_QUERY_BLOCK_ROWS",
    "SAMPLED_FLOOR_MIN",
    "SAMPLE_STRIDE",
    "SCORE_BLOCK_BYTES",
    "Candidates",
    "RunningTop",
    "best_first",
    "check_k",
    "check_metric",
    "check_topk_inputs",
    "group_floor",
    "host_candidates",
    "host_nth_best",
    "plan_blocks",
    "rescore",
    "rows_per_block",
    "run_topk",
    "sampled_floor",
    "stable_top",
    "unscaled_bound",
]
