"""How a planned search runs on the backend, one batch of queries at a time.

A :class:`Searcher` takes a :class:`~embedtools.search.plan.SearchPlan` through its strategy
(exact, funnel stages, quantised shortlist, certified screen), choosing the corpus view, the cache
to fill (through the store's budgeted ``cache``) and whether a filter gathers rows or masks them;
:func:`run_search` splits a large batch into steps for a progress bar and makes the result.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from embedtools.errors import InvalidArgumentError
from embedtools.progress import progress_bar, shows
from embedtools.protocols import ArrayBackend, Metric, SearchBackend, block_primitives
from embedtools.results import SearchResult
from embedtools.search.int8_screen import int8_shortlist
from embedtools.search.plan import SearchPlan
from embedtools.search.rescore import host_product, ranks_to_scores, rescore
from embedtools.search.screening import BoundedPrefix, bounded_prefix, certified_search, row_errors
from embedtools.search.settle import listed_rows, settle_near_ties, settles
from embedtools.tables import F32_BYTES, TableState

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["GATHER_FRACTION", "PROGRESS_QUERIES", "Cache", "Searcher", "run_search"]

#: A filter matching at most this share of a table's rows is searched by gathering those rows
#: (cheaper than scoring the whole table); a broader one is applied as a mask inside the kernel.
GATHER_FRACTION = 0.3
#: Queries per step of a search large enough to show progress (a bar shows only on a terminal).
PROGRESS_QUERIES = 256

Cache = Callable[[dict[int, Any], int, int, int, Callable[[], Any]], Any]
"""``cache(store, key, table, nbytes, compute)``: ``store[key]``, computed once and kept where the
budget allows (charged to ``table``), otherwise computed for this search only."""

Scored = tuple["npt.NDArray[np.float32]", "npt.NDArray[np.int64]"]


class Searcher:
    """Runs plans on one backend; made per search, so it holds nothing between searches (the
    caches it fills live in the table's state, through the store's budgeted ``cache``)."""

    def __init__(self, backend: ArrayBackend[Any], block_bytes: int, cache: Cache) -> None:
        self._backend = backend
        self._block_bytes = block_bytes
        self._cache = cache

    def run(self, plan: SearchPlan, q: npt.NDArray[np.float32]) -> Scored:
        """One batch of validated host queries through the plan: best-first scores and row indices."""
        source, state, dim, kk, metric, stages = plan.source, plan.state, plan.dim, plan.k, plan.metric, plan.stages
        index, mask, rescore_factor, rescorer = plan.quantized, plan.mask, plan.rescore, plan.rescore_with
        blocks = block_primitives(self._backend)
        if index is not None:
            rank_q, rank_metric = index.ranking(q, metric)
            rank_norms = None if rank_metric == "dot" else state.norms
            native = None
            broad = mask is None or np.count_nonzero(mask) > GATHER_FRACTION * mask.size  # a selective one gathers its rows instead
            if index.codec.kernel == "int8" and blocks is not None and broad:  # no decode: integer product, or scale in the queries
                host_norms = None if rank_norms is None else np.asarray(blocks.to_numpy(rank_norms), dtype=np.float32)
                native = int8_shortlist(blocks, rank_q, index, host_norms, kk * rescore_factor, rank_metric, mask, self._block_bytes)
            if native is None:
                decode = index.decoder(self._backend)
                _, shortlist = self._masked_topk(rank_q, index.codes, rank_norms, kk * rescore_factor, rank_metric, mask, decode)
            else:
                shortlist = native
            if rescorer is not None:  # against the index's values, by the original rows' norms
                norms = None if metric == "dot" else state.norms
                rows_decode = rescorer.decoder(self._backend)
                return rescore(self._backend, q, rescorer.codes, norms, shortlist, metric, kk, self._block_bytes, rows_decode)
            corpus, norms = self._view(source, state, dim, metric)
            return rescore(self._backend, q, corpus, norms, shortlist, metric, kk, self._block_bytes)
        first_dim, first_size = stages[0] if stages else (dim, kk)
        rotated = state.rotation is not None and bool(stages) and dim == source
        first_metric = metric
        unit = bool(stages) and metric == "cosine"  # its scores are discarded: rank by q · (x / |x|) on a cached unit copy
        stage_q, corpus, norms = self._stage(source, state, q, first_dim, "dot" if unit else metric, rotated)
        if unit:
            corpus, first_metric = self._unit_prefix(source, state, first_dim, corpus, rotated), "dot"
        if not stages and metric != "l2" and blocks is not None:
            available = state.rows if mask is None else int(np.count_nonzero(mask))
            if settles(kk, available):
                return self._settled_exact(blocks, plan, stage_q, corpus, norms, available)
        scores, indices = self._masked_topk(stage_q, corpus, norms, first_size, first_metric, mask)
        for stage_dim, size in [*stages[1:], (dim, kk)] if stages else []:
            stage_q, corpus, norms = self._stage(source, state, q, stage_dim, metric, rotated and stage_dim < dim)
            scores, indices = rescore(self._backend, stage_q, corpus, norms, indices, metric, size, self._block_bytes)
        return scores, indices

    def _settled_exact(
        self, backend: SearchBackend[Any], plan: SearchPlan, q: npt.NDArray[np.float32], corpus: Any, norms: Any, available: int
    ) -> Scored:
        """Plain cosine/dot exact search with float32 near-ties settled (:mod:`embedtools.search.settle`)."""
        listed = self._masked_topk(q, corpus, norms, listed_rows(plan.k, available), plan.metric, plan.mask)

        def host_norms() -> npt.NDArray[np.float32]:
            return np.asarray(backend.to_numpy(self._norms(plan.source, plan.state, plan.dim, corpus)), dtype=np.float32)

        return settle_near_ties(backend, q, corpus, host_norms, plan.k, plan.metric, listed, available=available, mask=plan.mask,
                                block_bytes=self._block_bytes)  # fmt: skip

    def run_certified(self, plan: SearchPlan, q: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """One batch through a certified plan (:mod:`embedtools.search.screening`): scores, rows,
        and how many rows each query scored exactly."""
        backend = block_primitives(self._backend)
        if backend is None:
            raise InvalidArgumentError(f"backend {self._backend.name!r} has no block primitives for a certified search")
        source, state, dim = plan.source, plan.state, plan.dim
        x = state.vectors if dim == source else backend.slice_last_dim(state.vectors, dim)
        norms = np.asarray(backend.to_numpy(self._norms(source, state, dim, x)), dtype=np.float32)
        prefix, first = None, None
        errors: Callable[[], npt.NDArray[np.float64]] | None = None
        if plan.stages:
            width, first = plan.stages[0]
            prefix = self._bounded_prefix(backend, source, state, x, width)
        index = plan.quantized
        if index is not None:
            key = zlib.crc32(index.kind.encode())

            def compute() -> tuple[str, npt.NDArray[np.float32]]:
                return index.kind, row_errors(backend, index, x, self._block_bytes)

            def cached_errors() -> npt.NDArray[np.float64]:
                kind, found = self._cache(state.screen_errors, key, source, state.rows * F32_BYTES, compute)
                return np.asarray(found if kind == index.kind else compute()[1], dtype=np.float64)

            errors = cached_errors

        found = certified_search(backend, q, x, norms, plan.k, plan.metric, mask=plan.mask, block_bytes=self._block_bytes,
                                 index=index, prefix=prefix, first=first, errors=errors)  # fmt: skip
        return ranks_to_scores(found.ranks, plan.metric), found.indices, found.rescored

    def _bounded_prefix(self, backend: SearchBackend[Any], source: int, state: TableState[Any], x: Any, width: int) -> BoundedPrefix[Any]:
        """The certified funnel's bounded prefix at ``width``, cached (and charged) per table version:
        in the rotation's space where the table has a rotation at least that wide (full-width searches)."""
        chunk = max(self._block_bytes // (16 * max(int(backend.shape(x)[1]), 1)), 1)
        nbytes = state.rows * (width + 1) * F32_BYTES
        rotation = state.rotation
        if rotation is not None and width <= rotation.components and int(backend.shape(x)[1]) == source:
            matrix = rotation.matrix[:, :width]
            return cast("BoundedPrefix[Any]", self._cache(rotation.bound_prefixes, width, source, nbytes,
                        lambda: bounded_prefix(backend, x, rotation.prefix, matrix, width, chunk)))  # fmt: skip
        if int(backend.shape(x)[1]) != source:  # a prefix search's tails end at its own width: not the cached ones
            return bounded_prefix(backend, x, None, None, width, chunk)
        return cast("BoundedPrefix[Any]", self._cache(state.bound_prefixes, width, source, nbytes,
                    lambda: bounded_prefix(backend, x, None, None, width, chunk)))  # fmt: skip

    def _masked_topk(
        self,
        q: npt.NDArray[np.float32],
        corpus: Any,
        norms: Any,
        k: int,
        metric: Metric,
        mask: npt.NDArray[np.bool_] | None,
        decode: Callable[[Any], Any] | None = None,
    ) -> Scored:
        """The backend's top-k, restricted to ``mask``'s rows: a selective mask (at most
        :data:`GATHER_FRACTION` of the rows) gathers them and searches only those; a broad one is
        applied inside the blocked kernel, where masked rows never enter the selection. ``decode``:
        ``corpus`` is a quantised index's codes."""
        queries = self._backend.from_numpy(q)
        search = partial(self._backend.topk, queries, k=k, metric=metric, max_block_bytes=self._block_bytes, decode=decode)
        if mask is None or mask.all():
            return search(corpus, corpus_norms=norms)
        rows = np.flatnonzero(mask)
        if rows.size > GATHER_FRACTION * mask.size:
            return search(corpus, corpus_norms=norms, row_mask=mask)
        subset_norms = None if norms is None else self._backend.take_rows(norms, rows)
        scores, local = search(self._backend.take_rows(corpus, rows), corpus_norms=subset_norms)
        return scores, rows[local]

    def _norms(self, source: int, state: TableState[Any], dim: int, prefix: Any) -> Any:
        """Row norms at ``dim``: stored for the full width, computed once per prefix and cached."""
        if dim == source:
            return state.norms
        return self._cache(state.prefix_norms, dim, source, state.rows * F32_BYTES, lambda: self._backend.row_norms(prefix))

    def _stage(
        self, source: int, state: TableState[Any], q: npt.NDArray[np.float32], dim: int, metric: Metric, rotated: bool
    ) -> tuple[npt.NDArray[np.float32], Any, Any]:
        """Queries, corpus and norms for one funnel stage: the table's prefix, or — where the table
        has a rotation at least ``dim`` wide — its rotated rows, with the queries rotated alike."""
        rotation = state.rotation
        if not rotated or rotation is None or dim > rotation.components:
            corpus, norms = self._view(source, state, dim, metric)
            return np.ascontiguousarray(q[:, :dim]), corpus, norms
        stage_q = np.ascontiguousarray(host_product(self._backend, q, rotation.matrix[:, :dim]), dtype=np.float32)
        corpus = self._backend.slice_last_dim(rotation.prefix, dim)
        if metric == "dot":
            return stage_q, corpus, None
        norms = self._cache(rotation.norms, dim, source, state.rows * F32_BYTES, lambda: self._backend.row_norms(corpus))
        return stage_q, corpus, norms

    def _unit_prefix(self, source: int, state: TableState[Any], dim: int, prefix: Any, rotated: bool) -> Any:
        """``prefix`` (the stage's first ``dim`` columns, rotated or not) normalised, as one
        contiguous array cached with the table or its rotation: a cosine funnel's first stage then
        ranks by a plain product, without a strided read or a scaling pass per search."""
        rotation = state.rotation
        unit_prefixes = rotation.unit_prefixes if rotated and rotation is not None and dim <= rotation.components else state.unit_prefixes
        return self._cache(unit_prefixes, dim, source, state.rows * dim * F32_BYTES, lambda: self._backend.normalize(prefix))

    def _view(self, source: int, state: TableState[Any], dim: int, metric: Metric) -> tuple[Any, Any]:
        """The table's first ``dim`` columns (a view) and, unless the metric is ``dot``, their norms."""
        corpus = state.vectors if dim == source else self._backend.slice_last_dim(state.vectors, dim)
        return corpus, None if metric == "dot" else self._norms(source, state, dim, corpus)


def run_search(searcher: Searcher, plan: SearchPlan, progress: bool | None) -> SearchResult:
    """Every query of ``plan`` through ``searcher``, as a read-only result. Only a search that will
    draw a bar (``progress``, see :func:`embedtools.progress.shows`) is cut into steps: each step
    reads the table once more."""
    q, kk = plan.queries, plan.k
    rescored: npt.NDArray[np.int64] | None = None
    if q.shape[0] == 0 or kk == 0:
        scores = np.empty((q.shape[0], kk), dtype=np.float32)
        indices = np.empty((q.shape[0], kk), dtype=np.int64)
    else:
        step = max(PROGRESS_QUERIES, -(-q.shape[0] // 20))
        split = shows(progress) and q.shape[0] > step
        chunks = [slice(i, i + step) for i in range(0, q.shape[0], step)] if split else [slice(None)]
        parts: list[Scored] = []
        counts: list[npt.NDArray[np.int64]] = []
        with progress_bar(progress if len(chunks) > 1 else False, q.shape[0], "search", "queries") as bar:
            for chunk in chunks:
                if plan.certified:
                    s, i, c = searcher.run_certified(plan, q[chunk])
                    parts.append((s, i))
                    counts.append(c)
                else:
                    parts.append(searcher.run(plan, q[chunk]))
                bar.update(len(parts[-1][1]))
        scores = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        indices = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        if counts:
            rescored = np.concatenate(counts)
    if plan.certified and rescored is None:
        rescored = np.zeros(q.shape[0], dtype=np.int64)
    scores.setflags(write=False)
    indices.setflags(write=False)
    if rescored is not None:
        rescored.setflags(write=False)
    return SearchResult(indices=indices, scores=scores, metric=plan.metric, dimension=plan.dim, source_dimension=plan.source, row_ids=plan.state.ids,
                        rescored=rescored, screen=plan.screen)
