"""The exact top-k over any backend's primitives: the metric arithmetic, masks, and which rows go where.

Written once for every backend: the per-column terms that turn ``q·x`` into a metric's ranking
score, the mask penalty, the rows a float32 GEMM cannot normalise (scored exactly on the side),
and the certified l2 screen (:mod:`embedtools.search.l2_certified`). The arithmetic on norms runs on
the host in NumPy, on ``(n,)`` vectors, so it is the same bits on every backend; the products and
the selection run on the backend's device through :class:`~embedtools.protocols.BlockPrimitives`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, cast

import numpy as np

from embedtools.backends._norms import COSINE_RANGE
from embedtools.errors import DimensionError
from embedtools.protocols import DEFAULT_BLOCK_BYTES, ArrayT, Metric, SearchBackend
from embedtools.search.certified import Certified, top_by_rank
from embedtools.search.kernel import check_k, check_metric, check_topk_inputs, rows_per_block, run_topk
from embedtools.search.select import Candidates, finished, host_candidates, host_float32
from embedtools.search.l2_certified import IDENTITY, Frame, Screened, l2_topk
from embedtools.search.rescore import exact_topk_over, ranks_to_scores

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["ROW_SCALE_SPREAD", "ROW_SHIFT_SPREAD", "Block", "BlockedTopk", "blocked_topk", "exact_topk", "l2_certified", "merge_side", "outside_cosine_range"]

F32 = np.float32
Scored = tuple["npt.NDArray[np.float32]", "npt.NDArray[np.int64]"]
Block = tuple[ArrayT, "npt.NDArray[np.float32] | None", "npt.NDArray[np.float32] | None"]
"""A score block as the kernel walks it: the backend's block, and the host row scale and row shift
its scores still need (``None``: applied already; :func:`~embedtools.search.select.finished`)."""

#: Largest ratio of a block's cosine row scales (``1/|x|``) for which the host selection compares
#: unscaled products (:func:`~embedtools.search.select.host_candidates`' ``row_scale``):
#: unit-normalised embeddings, whose norms are 1 to float32 rounding, are far inside it; a prefix's
#: norms, spread wide, would loosen its one bound per query until many rows passed it.
ROW_SCALE_SPREAD = 1.01
#: Largest spread (largest finite less least) of a block's row shifts for which the host selection
#: compares unshifted products (``row_shift``): a certified screen's per-row bounds spread by a
#: fraction of a bound (thousandths of a cosine), a mask's penalties (0 or ``+inf``) by nothing;
#: wider ones (an l2 screen's ``|x|²/2`` of spread norms) are shifted by the backend.
ROW_SHIFT_SPREAD = 2.0**-6


def _spread(shift: npt.NDArray[np.float32]) -> float:
    """The spread of a block's finite shifts (a mask's ``+inf`` is none); NaN counts as unbounded, so
    such a block is shifted by the backend, where a NaN costs its own row only."""
    if np.isnan(shift).any():
        return float("inf")
    finite = shift[np.isfinite(shift)]
    return float(finite.max() - finite.min()) if finite.size else 0.0


class BlockedTopk(Generic[ArrayT]):
    """Gives a backend class of primitives its ``topk``: :func:`exact_topk` over itself."""

    def topk(
        self,
        queries: ArrayT,
        corpus: ArrayT,
        k: int,
        metric: Metric,
        *,
        corpus_norms: ArrayT | None = None,
        row_mask: npt.NDArray[np.bool_] | None = None,
        max_block_bytes: int = DEFAULT_BLOCK_BYTES,
        decode: Callable[[ArrayT], ArrayT] | None = None,
    ) -> Scored:
        """See :meth:`embedtools.protocols.ArrayBackend.topk`."""
        backend = cast("SearchBackend[ArrayT]", self)
        return exact_topk(backend, queries, corpus, k, metric, corpus_norms=corpus_norms, row_mask=row_mask,
                          max_block_bytes=max_block_bytes, decode=decode)  # fmt: skip


def exact_topk(
    backend: SearchBackend[ArrayT],
    queries: ArrayT,
    corpus: ArrayT,
    k: int,
    metric: Metric,
    *,
    corpus_norms: ArrayT | None = None,
    row_mask: npt.NDArray[np.bool_] | None = None,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
    decode: Callable[[ArrayT], ArrayT] | None = None,
) -> Scored:
    """Exact top-``k`` of ``corpus`` for each query on ``backend`` (the contract of
    :meth:`embedtools.protocols.ArrayBackend.topk`)."""
    metric = check_metric(metric)
    k = check_k(k)
    raw_q = np.atleast_2d(np.asarray(backend.to_numpy(queries), dtype=F32))
    x = backend.float32(corpus) if decode is None else corpus
    first = backend.take_rows(x, np.arange(1, dtype=np.int64)) if _rows(backend, x) else x
    n, width = _rows(backend, x), _width(backend, first if decode is None else decode(first))
    check_topk_inputs(raw_q.shape[1], width, metric, corpus_norms, decode)
    mask = None if row_mask is None else _checked_mask(row_mask, n)
    norms_of = None if metric == "dot" else backend.row_norms(x) if corpus_norms is None else corpus_norms
    norms = None if norms_of is None else np.asarray(backend.to_numpy(norms_of), dtype=F32)
    if metric == "l2" and decode is None:
        assert norms is not None
        certified = l2_certified(backend, raw_q, x, k, norms, mask, max_block_bytes)
        return ranks_to_scores(certified.ranks, "l2"), certified.indices
    side = None
    if metric == "cosine" and decode is None:
        assert norms is not None
        side = outside_cosine_range(norms)
        if side.size:  # rows the GEMM cannot normalise: scored exactly, then merged
            keep = np.ones(n, dtype=bool) if mask is None else mask.copy()
            side = side[keep[side]]
            keep[side] = False
            mask = keep
    # Per-column terms that turn q·x into the metric's ranking score (larger is better): cosine
    # scales by 1/|x| (queries normalised); l2 ranks by q·x - |x|²/2, since
    # ||q - x||² = |q|² - 2 (q·x - |x|²/2). ``dot`` needs no norms at all.
    scale = shift = None
    if norms is not None:
        # rows below COSINE_RANGE are scored on the side (or, decoded, left unscaled): 1/|x| would overflow
        scale = (1.0 / np.where(norms >= COSINE_RANGE[0], norms, F32(1.0))).astype(F32, copy=False) if metric == "cosine" else None
        shift = 0.5 * norms * norms if metric == "l2" else None
    q = raw_q
    if metric == "cosine":
        q = np.asarray(backend.to_numpy(backend.normalize(backend.from_numpy(raw_q))), dtype=F32)

    def l2_distances(chunk: slice, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        gathered = backend.take_rows(x, idx)
        rows = np.asarray(backend.to_numpy(gathered if decode is None else decode(gathered)), dtype=F32)
        diff = rows - q[chunk, None, :]
        out: npt.NDArray[np.float32] = np.sqrt(np.einsum("qkd,qkd->qk", diff, diff), dtype=F32)
        return out

    found = blocked_topk(backend, q, x, min(k, n), metric, max_block_bytes, scale=scale, shift=shift, mask=mask,
                         rows_of=decode, l2_distances=l2_distances, settle_ties=decode is None)  # fmt: skip
    if side is None or not side.size:
        return found
    return merge_side(backend, raw_q, x, side, k, max_block_bytes, found)


def blocked_topk(
    backend: SearchBackend[ArrayT],
    q: npt.NDArray[np.float32],
    x: ArrayT,
    k: int,
    metric: Metric,
    max_block_bytes: int,
    *,
    scale: npt.NDArray[np.float32] | None,
    shift: npt.NDArray[np.float32] | None,
    mask: npt.NDArray[np.bool_] | None,
    rows_of: Callable[[ArrayT], ArrayT] | None,
    l2_distances: Callable[[slice, npt.NDArray[np.int64]], npt.NDArray[np.float32]] | None = None,
    settle_ties: bool = True,
    operand_of: Callable[[npt.NDArray[np.float32]], ArrayT] | None = None,
) -> Scored:
    """:func:`~embedtools.search.kernel.run_topk` over the backend's blocks of ``x`` against host
    queries ``q`` (already in the metric's form), ranked by ``(x·q) * scale - shift`` with masked
    rows shifted to ``-inf``. The callables are made here once per search, not per block.
    ``operand_of`` makes the product's right operand (a native low-precision product's rounded
    queries, whose ``rows_of`` only views the codes: blocks are not sized for a decode; default
    :meth:`~embedtools.protocols.BlockPrimitives.query_operand`)."""
    caps = backend.capabilities
    if mask is not None:  # masked rows rank at -inf: shifted down by +inf
        penalty = np.where(mask, F32(0), F32(np.inf))
        shift = penalty if shift is None else shift + penalty
    # Selected on the host, a block leaves its row scale (cosine's) and row shift (a screen's bound,
    # a mask's penalty) to the selection (host_candidates): only the few candidates are scaled and
    # shifted, not the whole block. Not for a block whose scales or shifts spread wide (the bound
    # would let many rows through): the backend finishes that one.
    host = not caps.select_on_device
    scale_d = None if scale is None else backend.from_numpy(scale)
    shift_d = None if shift is None else backend.from_numpy(shift)
    operands: dict[tuple[int, int], ArrayT] = {}
    make_operand = backend.query_operand if operand_of is None else operand_of

    def score_block(qs: slice, rs: slice) -> Block[ArrayT]:
        key = (qs.start, qs.stop)
        operand = operands.get(key)
        if operand is None:  # once per chunk of queries (and per redone query)
            operands.clear()
            operand = operands[key] = make_operand(np.ascontiguousarray(q[qs]))
        row_scale = row_shift = None
        block_shift = None if shift is None else shift[rs]
        if host and (block_shift is None or _spread(block_shift) <= ROW_SHIFT_SPREAD):  # a shift left on the backend keeps its scale there
            row_shift = block_shift
            block_scale = None if scale is None else scale[rs]
            if block_scale is not None and block_scale.size and block_scale.max() <= ROW_SCALE_SPREAD * block_scale.min():
                row_scale = block_scale
        block = backend.block_scores(x, rs, operand, scale_d if row_scale is None else None, shift_d if row_shift is None else None, rows_of)
        return block, row_scale, row_shift

    def to_host(block: Block[ArrayT]) -> npt.NDArray[np.float32]:
        # (queries, rows) as a transposed view: host_nth_best reads a (rows, queries) block in its own order
        return finished(host_float32(backend.host_block(block[0])), block[1], block[2]).T

    candidates: Callable[[Block[ArrayT], int, npt.NDArray[np.float32]], Candidates]
    nth_best: Callable[[Block[ArrayT], int], npt.NDArray[np.float32]] | None = None
    if caps.select_on_device:

        def device_select(block: Block[ArrayT], m: int, threshold: npt.NDArray[np.float32]) -> Candidates:
            return backend.device_candidates(block[0], m, threshold)

        def device_nth_best(block: Block[ArrayT], n: int) -> npt.NDArray[np.float32]:
            return backend.nth_best(block[0], n)

        candidates, nth_best = device_select, device_nth_best
    else:

        def host_select(block: Block[ArrayT], m: int, threshold: npt.NDArray[np.float32]) -> Candidates:
            return host_candidates(backend.host_block(block[0]), m, threshold, block[1], block[2])

        candidates = host_select

    return run_topk(
        q.shape[0],
        _rows(backend, x),
        q.shape[1],
        k,
        metric,
        max_block_bytes,
        score_block=score_block,
        candidates=candidates,
        to_host=to_host,
        l2_distances=_unused_l2 if l2_distances is None else l2_distances,
        settle_ties=settle_ties,
        row_mask=mask,
        nth_best=nth_best,
        block_rows=rows_per_block(q.shape[0], gpu=caps.gpu, decoded_width=None if rows_of is None or operand_of is not None else q.shape[1]),
    )


def l2_certified(
    backend: SearchBackend[ArrayT],
    q: npt.NDArray[np.float32],
    x: ArrayT,
    k: int,
    norms: npt.NDArray[np.float32],
    mask: npt.NDArray[np.bool_] | None,
    max_block_bytes: int,
) -> Certified:
    """Exact l2 (:func:`embedtools.search.l2_certified.l2_topk`), screened by the blocked float32 kernel."""
    n, width = _rows(backend, x), q.shape[1]
    last: list[tuple[Frame, npt.NDArray[np.float32]]] = []

    def frame_of(frame: Frame) -> Callable[[ArrayT], ArrayT] | None:
        if frame is IDENTITY:
            return None
        centre = None if frame.centre is None else backend.from_numpy(frame.centre)
        return lambda rows: backend.frame_rows(rows, frame.scale, centre)

    def frame_norms(frame: Frame, rows_of: Callable[[ArrayT], ArrayT] | None) -> npt.NDArray[np.float32]:
        if rows_of is None:
            return norms
        if not last or last[0][0] is not frame:
            step = max(max_block_bytes // (4 * max(width, 1)), 1)
            parts = [backend.row_norms(rows_of(backend.take_rows(x, np.arange(i, min(i + step, n), dtype=np.int64)))) for i in range(0, n, step)]
            last[:] = [(frame, np.concatenate([np.asarray(backend.to_numpy(p), dtype=F32) for p in parts]))]
        return last[0][1]

    def screen(fq: npt.NDArray[np.float32], m: int, frame: Frame) -> Screened:
        rows_of = frame_of(frame)
        fnorms = frame_norms(frame, rows_of)
        vals, idx = blocked_topk(backend, fq, x, m, "dot", max_block_bytes, scale=None, shift=0.5 * fnorms * fnorms,
                                 mask=mask, rows_of=rows_of, settle_ties=False)  # fmt: skip
        return Screened(vals, idx, float(fnorms.max(initial=0.0)))

    return l2_topk(backend, q, x, k, n_rows=n, norm_max=float(norms.max(initial=0.0)), row_mask=mask,
                   max_block_bytes=max_block_bytes, screen=screen)  # fmt: skip


def merge_side(
    backend: SearchBackend[Any],
    queries: npt.NDArray[np.float32],
    corpus: Any,
    side: npt.NDArray[np.int64],
    k: int,
    max_block_bytes: int,
    found: Scored,
) -> Scored:
    """A cosine top-k over the rows the float32 kernel scored (``found``) joined with the exact
    scores of the ``side`` rows it could not (norms beyond its range): best first, ties to the
    lower index."""
    ranks, idx = exact_topk_over(backend, queries, corpus, side, k, "cosine", max_block_bytes)
    vals = np.hstack([found[0].astype(np.float64), ranks_to_scores(ranks, "cosine").astype(np.float64)])
    best, both = top_by_rank(vals, np.hstack([found[1], idx]), k)
    return best.astype(F32), np.ascontiguousarray(both)


def outside_cosine_range(norms: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    """Rows whose (nonzero) norm is outside :data:`COSINE_RANGE`, found in one pass over the norms."""
    low, high = COSINE_RANGE
    if bool(((norms >= low) & (norms <= high) | (norms == 0)).all()):
        return np.empty(0, dtype=np.int64)
    return np.flatnonzero((norms > 0) & ((norms < low) | (norms > high))).astype(np.int64)


def _checked_mask(row_mask: npt.NDArray[np.bool_], n: int) -> npt.NDArray[np.bool_]:
    mask = np.asarray(row_mask, dtype=bool)
    if mask.shape != (n,):
        raise DimensionError(f"row_mask has shape {mask.shape}, the corpus {n} rows")
    return mask


def _rows(backend: SearchBackend[ArrayT], x: ArrayT) -> int:
    return int(backend.shape(x)[0])


def _width(backend: SearchBackend[ArrayT], x: ArrayT) -> int:
    return int(backend.shape(x)[1])


def _unused_l2(chunk: slice, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    raise AssertionError("a screen ranks by dot-like scores; l2 is rescored by embedtools.search.rescore")  # pragma: no cover
