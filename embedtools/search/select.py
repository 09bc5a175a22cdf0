"""A score block's candidates on the host: which of its scores may enter each query's running top ``m``.

The blocked kernel (:mod:`embedtools.search.kernel`) asks this of every host-selected block: one
compare against each query's threshold rejects nearly the whole block, and what passes goes on to
:class:`~embedtools.search.merge.RunningTop` as flat :data:`Candidates`. A block may arrive before
its row scale and shift (applied here to the candidates only) and, from a bfloat16 product, as its
16-bit words (:data:`HostBlock`).
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import numpy.typing as npt

__all__ = ["GROUPS_PER_SLOT", "Candidates", "HostBlock", "finished", "group_floor", "host_candidates", "host_float32", "shifted_bound", "unscaled_bound"]


Candidates = tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64]]
"""Flat ``(query_rows, values, columns)``: any number of candidate scores from one block."""

HostBlock = npt.NDArray[np.float32] | npt.NDArray[np.int16]
"""A ``(rows, queries)`` score block on the host: float32 scores, or a bfloat16 product's scores as
their 16-bit words (``int16``; NumPy has no bfloat16), which :func:`host_candidates` compares as
they are: widening a block to float32 was a pass over it, and its compare one over twice the bytes."""


def host_float32(block: HostBlock) -> npt.NDArray[np.float32]:
    """A host block's scores as float32: bfloat16 words widened exactly (a bfloat16 is the high
    half of a float32), in the block's own memory order; float32 as it is."""
    if block.dtype != np.int16:
        return cast("npt.NDArray[np.float32]", block)
    wide = block.view(np.uint16).astype(np.uint32)
    wide <<= 16
    return wide.view(np.float32)


def _word_limit(bound: npt.NDArray[np.float32]) -> npt.NDArray[np.int16] | None:
    """Per query, the word of the least bfloat16 above a positive float32 ``bound``: a bfloat16
    exceeds the bound exactly when its word, as a signed 16-bit integer, is at least this (the
    bound's high half is a bfloat16 at most the bound, and the next word the next bfloat16; negative
    values' words are negative). ``None`` where a bound is not positive (negative words order in
    reverse) or NaN. A NaN score's word may pass: callers compare the widened values again."""
    if not bool(np.all(bound > 0)):
        return None
    limit: npt.NDArray[np.int16] = ((bound.view(np.uint32) >> 16) + 1).astype(np.int16)
    return limit


def host_candidates(
    block: HostBlock,
    m: int,
    threshold: npt.NDArray[np.float32],
    row_scale: npt.NDArray[np.float32] | None = None,
    row_shift: npt.NDArray[np.float32] | None = None,
) -> Candidates:
    """Scores of a ``(rows, queries)`` block that may enter each query's running top ``m``.

    One compare against each query's threshold rejects nearly the whole block. Until every query
    has ``m`` candidates, the block is compared against :func:`group_floor` instead (one
    max-reduction of the block and a partition of a few times ``m`` maxima): a partition of
    thousands of strided rows per query cost as much as a third of the block's GEMM for
    shortlists of 40 to 100. Every row scoring at least that floor is a candidate, rows equal to
    the block's m-th best included, so that :class:`~embedtools.search.merge.RunningTop` can keep the lower indices of
    equal scores. A block of at most ``m`` rows gives all of them.

    ``row_scale`` (positive, one per row: cosine's ``1/|x|``) and ``row_shift`` (one per row, a
    screen's bound or a mask's ``+inf``): ``block`` holds the products before them, and a score is
    ``block * row_scale - row_shift`` (the float32 operations the backend would have run, in that
    order). Each was a pass over the whole block as long as the compare's, for a few candidates per
    query; instead the raw products are compared against one bound per query for the block
    (:func:`unscaled_bound` of the threshold plus the block's least shift, :func:`shifted_bound`),
    and only what passes is scaled, shifted and compared again. The bound is as loose as the
    block's scales and shifts are spread: the caller finishes a block of widely spread ones itself
    (:data:`~embedtools.search.exact.ROW_SCALE_SPREAD`, :data:`~embedtools.search.exact.ROW_SHIFT_SPREAD`).
    A bfloat16 block's words (:data:`HostBlock`) are compared against that bound's word
    (:func:`_word_limit`) where every query's is positive, and widened to float32 otherwise.
    """
    n, queries = block.shape
    filling = bool(np.isneginf(threshold).any())  # some query has fewer than m candidates yet
    words = block.dtype == np.int16
    if filling:
        whole = finished(host_float32(block), row_scale, row_shift)
        if m < n:
            return _float_candidates(_passing(whole, np.maximum(threshold, group_floor(whole, m)), inclusive=True))
        picked = np.broadcast_to(np.arange(n, dtype=np.int64)[:, None], whole.shape)
        return (
            np.repeat(np.arange(queries, dtype=np.int64), n),
            np.ascontiguousarray(whole.T).reshape(-1),
            np.ascontiguousarray(picked.T).reshape(-1),
        )
    if row_scale is None and row_shift is None and not words:
        return _float_candidates(_passing(block, threshold, inclusive=False))
    bound = threshold if row_shift is None else shifted_bound(threshold, row_shift)
    if row_scale is not None:
        bound = unscaled_bound(bound, row_scale)
    limit = _word_limit(bound) if words else None
    if limit is not None:
        rows, raw, cols = _passing(block, limit, inclusive=True)
    else:
        rows, raw, cols = _passing(host_float32(block), bound, inclusive=False)
    vals = finished(host_float32(raw), None if row_scale is None else row_scale[cols], None if row_shift is None else row_shift[cols])
    keep = vals > threshold[rows]
    return rows[keep], vals[keep], cols[keep]


def finished(
    scores: npt.NDArray[np.float32], row_scale: npt.NDArray[np.float32] | None, row_shift: npt.NDArray[np.float32] | None
) -> npt.NDArray[np.float32]:
    """``scores * row_scale - row_shift`` in float32, one rounding per operation as a backend's
    block makes them; per row of a ``(rows, queries)`` block, or per value of a flat array."""
    column = scores.ndim == 2
    out = scores
    if row_scale is not None:
        out = out * (row_scale[:, None] if column else row_scale)
    if row_shift is not None:
        out = out - (row_shift[:, None] if column else row_shift)
    return out


def shifted_bound(threshold: npt.NDArray[np.float32], row_shift: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Per query, a float32 value at most ``threshold + min(row_shift)``: a score
    ``fl(v - h) > t`` needs ``v > t + h`` (rounding is monotonic and ``t`` a float32), so every
    such ``v`` exceeds it. The sum is rounded to float32 (its float64 evaluation is off by far less
    than a float32 step) and taken one step further down. An all-``+inf`` shift (every row masked)
    gives ``+inf`` (nothing passes), and infinite and NaN thresholds stay as they are."""
    least = np.float64(row_shift.min()) if row_shift.size else np.float64(np.inf)
    with np.errstate(over="ignore", invalid="ignore"):
        near = (threshold.astype(np.float64) + least).astype(np.float32)
    return _step_down(near)


def _query_major(block: npt.NDArray[Any]) -> bool:
    """Whether a ``(rows, queries)`` block lies in memory query by query (a ``(queries, rows)``
    product's transpose, as torch on a CPU makes it): walked in its own memory order, not copied."""
    return bool(block.flags.f_contiguous and not block.flags.c_contiguous)


def _passing(block: HostBlock, bound: npt.NDArray[Any], *, inclusive: bool) -> tuple[npt.NDArray[np.int64], npt.NDArray[Any], npt.NDArray[np.int64]]:
    """Every value of a ``(rows, queries)`` block above its query's ``bound`` (or equal, ``inclusive``),
    found in one pass over the block in its memory order: rows, the values as the block holds
    them, columns."""
    n, queries = block.shape
    if _query_major(block):
        lanes, limit = block.T, bound[:, None]
    else:
        lanes, limit = block, bound
    flat = np.flatnonzero(lanes >= limit if inclusive else lanes > limit)
    values = lanes.reshape(-1)[flat]
    if lanes is block:
        cols, rows = np.divmod(flat, queries)
    else:
        rows, cols = np.divmod(flat, n)
    return rows, values, cols


def _float_candidates(found: tuple[npt.NDArray[np.int64], npt.NDArray[Any], npt.NDArray[np.int64]]) -> Candidates:
    rows, values, cols = found
    return rows, cast("npt.NDArray[np.float32]", values), cols


#: Relative slack of :func:`unscaled_bound`: beyond the two float32 roundings (the bound's division
#: and its product with this factor) that it must absorb.
_BOUND_SLACK = 2.0**-20
#: Positive thresholds below this are bounded by 0 (a positive score needs a positive product):
#: their quotient could be subnormal, where a rounding is not relative.
_TINY = 2.0**-100


def unscaled_bound(threshold: npt.NDArray[np.float32], row_scale: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Per query, a value every product ``p`` must exceed for ``fl(p * s) > threshold`` with any of
    the rows' scales ``s`` (all positive, finite).

    Rounding is monotonic, so ``fl(p·s) > t`` needs ``p·s > t``, i.e. ``p > t / s``; over the
    rows' scales that is ``p > t / s_max`` for ``t >= 0`` and ``p > t / s_min`` for ``t < 0``
    (``p >= 0`` passing any negative bound). The bound must not exceed that real quotient. It is
    ``fl(fl(t / s_max)·(1 - 2^-20))`` (or ``fl(fl(t / s_min)·(1 + 2^-20))``) and one float32 step
    further down: the slack covers the two relative roundings of normal numbers
    (``(1+u)^2 (1-2^-20) < 1`` and ``(1-u)^2 (1+2^-20) > 1``, ``u = 2^-24``), the step a subnormal quotient's, which round by
    an absolute half step (``-1e-45 / 2`` rounds to ``-0.0``). Positive thresholds below
    ``2^-100`` are bounded by 0 (a positive score needs a positive product).
    ``+inf`` stays ``+inf`` (nothing passes, as before), NaN stays NaN (through the division).
    """
    hi, lo = np.float32(row_scale.max()), np.float32(row_scale.min())
    with np.errstate(over="ignore", under="ignore"):
        above = _step_down((threshold / hi) * np.float32(1 - _BOUND_SLACK))
        below = _step_down((threshold / lo) * np.float32(1 + _BOUND_SLACK))
    bound: npt.NDArray[np.float32] = np.where(threshold >= _TINY, above, np.where(threshold >= 0, np.float32(0), below)).astype(np.float32)
    return bound


def _step_down(values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The next float32 below each finite value; infinities and NaN as they are."""
    lower: npt.NDArray[np.float32] = np.where(np.isinf(values), values, np.nextafter(values, np.float32(-np.inf)))
    return lower


#: Groups per slot of the running top ``m`` that :func:`group_floor` cuts a block into.
GROUPS_PER_SLOT = 4


def group_floor(block: npt.NDArray[np.float32], m: int) -> npt.NDArray[np.float32]:
    """Each query's m-th best of the maxima of ``GROUPS_PER_SLOT * m`` groups of a ``(rows,
    queries)`` block's consecutive rows (one row each in a block of fewer rows: its m-th best).

    Each group maximum is a distinct row's score, so at least ``m`` of the block's rows score at
    least this: its own top ``m`` all do, and comparing the block against it with ``>=`` loses
    none of them. With four groups per slot little more than ``m`` rows per query pass on
    unordered rows (about ``1.2·m``), so the first fold stays small; rows sorted by score only
    let more through. NaN scores (an overflowed product) are ignored by the maxima, and a group
    of NaNs alone counts as ``-inf``.
    """
    n, queries = block.shape
    groups = min(GROUPS_PER_SLOT * m, n)
    size = n // groups
    if _query_major(block):  # reduced in the block's own memory order
        maxima = np.fmax.reduce(block.T[:, : groups * size].reshape(queries, groups, size), axis=2).T
    else:
        maxima = np.fmax.reduce(block[: groups * size].reshape(groups, size, queries), axis=1)
    maxima[np.isnan(maxima)] = -np.inf  # a group of NaNs only: no row of it counts
    floor: npt.NDArray[np.float32] = np.partition(maxima, groups - m, axis=0)[groups - m]
    return floor
