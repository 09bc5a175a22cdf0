"""What a search will do: exact, Matryoshka funnel, quantised shortlist, certified, each optionally filtered.

:func:`plan_search` checks a search's arguments against a snapshot of the store's tables and
turns them into a frozen, named :class:`SearchPlan`, in this one place;
:class:`~embedtools.search.searcher.Searcher` then runs the plan on the backend. The split keeps
the store about tables, budgets and files, and every choice of *what* to search (which table,
which width, which strategy, which filter) here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from embedtools.errors import DimensionError, InvalidArgumentError
from embedtools.filters import Filter
from embedtools.protocols import Metric
from embedtools.quantize import QuantizedIndex, check_quantization
from embedtools.search.kernel import check_k, check_metric
from embedtools.tables import TableState
from embedtools.validation import as_queries, check_dimension, check_positive_int

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["CERTIFIABLE", "SearchPlan", "check_funnel", "check_rescore", "plan_search"]



@dataclass(frozen=True)
class SearchPlan:
    """What a validated search runs on: the table, the width, and the strategy."""

    #: Width of the table read (``dim`` itself, or the narrowest wider table for a prefix search).
    source: int
    #: That table as it was when the search began (another thread may replace it meanwhile).
    state: TableState[Any]
    #: Width searched: the queries' width, or ``dimension=``.
    dim: int
    #: Columns of the result: ``k``, at most the rows the filter (if any) leaves.
    k: int
    metric: Metric
    #: Funnel stages ``(dimension, shortlist)`` before the last, full-width one; empty: no funnel.
    stages: tuple[tuple[int, int], ...]
    #: The quantised index that shortlists (``quantized=``), or ``None``.
    quantized: QuantizedIndex[Any] | None
    #: Host row mask of a filter (``where=``), or ``None``.
    mask: npt.NDArray[np.bool_] | None
    #: Shortlist factor of a quantised search: ``k * rescore`` rows are rescored.
    rescore: int
    #: The index whose values rescore the shortlist (``rescore_with=``) instead of the float32 rows.
    rescore_with: QuantizedIndex[Any] | None
    #: The validated host queries, cut to ``dim`` columns, contiguous.
    queries: npt.NDArray[np.float32]
    #: ``rescore="certified"`` (or the automatic rule): the exact top k by a certified screen.
    certified: bool = False
    #: What screens a certified search (``SearchResult.screen``): a kind, ``"prefix:p"``, or ``None``.
    screen: str | None = None


def plan_search(
    tables: Mapping[int, TableState[Any]],
    queries: object,
    k: object,
    dimension: object,
    metric: object,
    *,
    funnel: object,
    quantized: object,
    rescore: object,
    rescore_with: object,
    where: object,
) -> SearchPlan:
    """Every argument of :meth:`EmbeddingStore.search` checked (in the order the store always
    checked them) and resolved against ``tables``, a snapshot taken once by the caller."""
    checked_metric = check_metric(metric)
    kk = check_k(k)
    q = as_queries(queries)
    width = q.shape[1]
    dim = width if dimension is None else check_dimension(dimension)
    if width < dim:
        raise DimensionError(f"queries have width {width}, fewer than dimension {dim}")
    stages = check_funnel(funnel, kk, dim)
    certified = check_rescore(rescore)
    if certified and len(stages) > 1:
        raise InvalidArgumentError(f"a certified funnel has one stage (its shortlist grows as the bound requires), got {stages}")
    source, state = _source_table(tables, dim, exact=dimension is None)
    index, rescore_factor = _quantized_index(state, source, dim, quantized, 1 if certified else rescore, stages)
    rescorer = _rescoring_index(state, source, index, rescore_with)
    screen = None
    if certified:
        if rescorer is not None:
            raise InvalidArgumentError("rescore='certified' rescores against the float32 rows; it does not combine with rescore_with")
        if index is not None and index.codec.kernel not in CERTIFIABLE:
            raise InvalidArgumentError(f"a {index.kind} index has no bound on its scores; certified screening takes {', '.join(CERTIFIABLE)}")
        screen = index.kind if index is not None else f"prefix:{stages[0][0]}" if stages else None
    mask = _filter_mask(state, where)
    kk = min(kk, state.rows if mask is None else int(np.count_nonzero(mask)))
    return SearchPlan(source, state, dim, kk, checked_metric, tuple(stages), index, mask, rescore_factor, rescorer,
                      np.ascontiguousarray(q[:, :dim]), certified, screen)  # fmt: skip


#: Index kinds a certified screen can bound (module :mod:`embedtools.search.certified`).
CERTIFIABLE: tuple[str, ...] = ("bfloat16", "float16", "int8")


def check_rescore(rescore: object) -> bool:
    """Whether ``rescore`` asks for a certified search (``"certified"``); any other string is
    refused here, an int is checked where a quantised search uses it."""
    if isinstance(rescore, str):
        if rescore == "certified":
            return True
        raise InvalidArgumentError(f"rescore must be a positive int or 'certified', got {rescore!r}")
    return False


def _source_table(tables: Mapping[int, TableState[Any]], dim: int, exact: bool) -> tuple[int, TableState[Any]]:
    """The table a search of width ``dim`` reads."""
    if dim in tables:
        return dim, tables[dim]
    wider = sorted(d for d in tables if d > dim)
    if exact or not wider:
        hint = " (pass dimension= to search a prefix of a wider table)" if exact and wider else ""
        raise DimensionError(f"no table of dimension {dim}; stored: {sorted(tables) or 'none'}{hint}")
    return wider[0], tables[wider[0]]


def _filter_mask(state: TableState[Any], where: object) -> npt.NDArray[np.bool_] | None:
    if where is None:
        return None
    if not isinstance(where, Filter):
        raise InvalidArgumentError(f"where takes a filter from embedtools.filters, not {type(where).__name__}")
    return where.mask(state.row_source)


def _quantized_index(
    state: TableState[Any], source: int, dim: int, quantized: object, rescore: object, stages: Sequence[tuple[int, int]]
) -> tuple[QuantizedIndex[Any] | None, int]:
    """The shortlisting index and its rescore factor (unused, 0, without one)."""
    if quantized is None:
        return None, 0
    kind = check_quantization(quantized)
    factor = check_positive_int(rescore, "rescore")
    if stages:
        raise InvalidArgumentError("funnel and quantized search cannot be combined")
    if dim != source:
        raise InvalidArgumentError(f"quantized search runs at the table's full width ({source}), not at {dim}")
    if kind not in state.quantized:
        raise InvalidArgumentError(f"table {source}d has no {kind} index; call store.quantize({source}, {kind!r})")
    return state.quantized[kind], factor


def _rescoring_index(
    state: TableState[Any], source: int, index: QuantizedIndex[Any] | None, rescore_with: object
) -> QuantizedIndex[Any] | None:
    if rescore_with is None:
        return None
    kind = check_quantization(rescore_with)
    if index is None:
        raise InvalidArgumentError("rescore_with rescores a quantized search's shortlist; pass quantized= too")
    if kind not in state.quantized:
        raise InvalidArgumentError(f"table {source}d has no {kind} index to rescore with; call store.quantize({source}, {kind!r})")
    return state.quantized[kind]


def check_funnel(funnel: object, k: int, dim: int) -> list[tuple[int, int]]:
    """Funnel stages as ``(dimension, shortlist)`` pairs: dimensions rising below ``dim``, shortlists
    not rising and at least ``k``."""
    if isinstance(funnel, (str, bytes)) or not isinstance(funnel, Sequence):
        raise InvalidArgumentError(f"funnel must be a sequence of (dimension, shortlist) pairs, got {funnel!r}")
    stages: list[tuple[int, int]] = []
    for stage in cast("Sequence[object]", funnel):  # isinstance leaves the item types unknown
        pair = cast("Sequence[object]", stage) if isinstance(stage, Sequence) else ()
        if len(pair) != 2:
            raise InvalidArgumentError(f"funnel stage {stage!r} is not a (dimension, shortlist) pair")
        stage_dim = check_positive_int(pair[0], "funnel dimension")
        size = check_positive_int(pair[1], "funnel shortlist")
        stages.append((stage_dim, size))
    for i, (stage_dim, size) in enumerate(stages):
        if stage_dim >= dim or (i and stage_dim <= stages[i - 1][0]):
            raise InvalidArgumentError(f"funnel dimensions must rise and stay below {dim}: {stages}")
        if size < k or (i and size > stages[i - 1][1]):
            raise InvalidArgumentError(f"funnel shortlists must be >= k={k} and must not grow: {stages}")
    return stages


