"""When a plain exact search screens by itself: the automatic rule, in one place.

A certified screen returns the same ids as the float32 search, so the only question is whether
it pays: it does where the backend's low-precision GEMM measured much faster than its float32 one
on this device, the index it screens by is already held (and charged), and the search is large
enough that the bound and the rescoring of a short list per query cost less than the GEMM saves.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from embedtools.search.certified import AUTO_SCREEN_SPEEDUP

if TYPE_CHECKING:
    from embedtools.protocols import ArrayBackend, SearchBackend
    from embedtools.search.plan import SearchPlan

__all__ = ["AUTO_SCREEN_MIN_QUERIES", "AUTO_SCREEN_MIN_ROWS", "AUTO_SCREEN_SPEEDUP", "auto_screened"]

#: The automatic rule's smallest table and batch (see :func:`auto_screened`).
AUTO_SCREEN_MIN_ROWS = 32_768
AUTO_SCREEN_MIN_QUERIES = 16


def auto_screened(plan: SearchPlan, backend: ArrayBackend[Any], enabled: bool) -> SearchPlan:
    """The automatic rule: a plain exact search (no funnel, no quantised search) becomes a
    certified screen when (a) the table holds a ``bfloat16``, ``float16`` or ``int8`` index (its
    memory is charged already), (b) the backend measured that type's GEMM (int8's integer product
    with its per-query scaling) at least
    :data:`AUTO_SCREEN_SPEEDUP` times faster than float32 on its device, and (c) the search is
    large enough to pay for the rescoring: at least :data:`AUTO_SCREEN_MIN_ROWS` rows (after a
    filter) and :data:`AUTO_SCREEN_MIN_QUERIES` queries. Ids are the same either way; scores are
    then float64 rescores rounded to float32. ``enabled=False`` (``Config(auto_screen=False)``)
    keeps every search as planned."""
    if not enabled or plan.certified or plan.quantized is not None or plan.stages or plan.dim != plan.source:
        return plan
    rows = plan.state.rows if plan.mask is None else int(np.count_nonzero(plan.mask))
    if rows < AUTO_SCREEN_MIN_ROWS or plan.queries.shape[0] < AUTO_SCREEN_MIN_QUERIES:
        return plan
    if not callable(getattr(backend, "gemm_speedup", None)):
        return plan  # a backend without block primitives (a user's ArrayBackend): nothing to measure
    primitives = cast("SearchBackend[Any]", backend)
    for kind in ("bfloat16", "float16", "int8"):
        index = plan.state.quantized.get(kind)
        if index is not None and primitives.gemm_speedup(kind) >= AUTO_SCREEN_SPEEDUP:
            return replace(plan, quantized=index, certified=True, screen=kind)
    return plan
