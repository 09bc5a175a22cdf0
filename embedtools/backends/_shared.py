"""Seed operations written once over what NumPy, PyTorch and MLX arrays share.

``.shape``, ``.tolist()`` and ``[..., :d]`` behave alike in the three libraries, so these live
here rather than three times; what differs (devices, dtypes, generators, kernels) stays in each
backend.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Generic, cast

from embedtools.protocols import ArrayT
from embedtools.validation import check_prefix

__all__ = ["SPEEDUP_SHAPE", "SharedOps", "measured_speedup"]

#: ``(rows, width, queries)`` of the one GEMM a backend times per low-precision kind: large enough
#: that the library's blocked kernel (not call overhead) runs, small enough to take milliseconds.
SPEEDUP_SHAPE = (16384, 384, 96)


def measured_speedup(run_f32: Callable[[], object], run_low: Callable[[], object], wait: Callable[[object], None], repeats: int = 5) -> float:
    """``run_f32``'s best time over ``run_low``'s (each warmed up once, then best of ``repeats``,
    interleaved so that a neighbour's load hits both alike); ``wait`` blocks until a result is
    computed (a device synchronise, or MLX's ``eval``)."""
    best = [float("inf"), float("inf")]
    for run in (run_f32, run_low):
        wait(run())
    for _ in range(repeats):
        for i, run in enumerate((run_f32, run_low)):
            start = time.perf_counter()
            wait(run())
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0] / max(best[1], 1e-9)


class SharedOps(Generic[ArrayT]):
    """Mixed into every bundled backend."""

    def shape(self, array: ArrayT) -> tuple[int, ...]:
        return tuple(int(s) for s in cast(Any, array).shape)

    def to_list(self, array: ArrayT) -> list[Any]:
        out: object = cast(Any, array).tolist()  # a scalar for 0-d arrays, whatever the stubs say
        return cast("list[object]", out) if isinstance(out, list) else [out]  # isinstance leaves the item type unknown

    def slice_last_dim(self, array: ArrayT, dim: int) -> ArrayT:
        view: ArrayT = cast(Any, array)[..., : check_prefix(dim, self.shape(array)[-1])]
        return view
