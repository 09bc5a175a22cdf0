"""Seed operations written once over what NumPy, PyTorch and MLX arrays share.

``.shape``, ``.tolist()`` and ``[..., :d]`` behave alike in the three libraries, so these live
here rather than three times; what differs (devices, dtypes, generators, kernels) stays in each
backend.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, cast

import numpy as np

from embedtools.protocols import ArrayT, HostFloat
from embedtools.validation import check_prefix

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["SPEEDUP_SHAPE", "SharedOps", "fastest", "measured_speedup"]

#: ``(rows, width, queries)`` of the one GEMM a backend times per low-precision kind: large enough
#: that the library's blocked kernel (not call overhead) runs, small enough to take milliseconds.
SPEEDUP_SHAPE = (4096, 384, 96)
#: A low-precision product this much slower than float32 on its first timed run is not timed further.
SLOWER = 2.0


#: Untimed runs of each product first: torch's int8 product on a CPU took 8 ms, then 1.3 ms twice,
#: before settling at 0.5 ms from its fifth call (allocations and oneDNN's first-use set-up), and a
#: single warm-up once measured it at 0.2x float32 instead of about 2x.
WARMUPS = 4


def _timed(run: Callable[[], object], wait: Callable[[object], None]) -> float:
    start = time.perf_counter()
    wait(run())
    return time.perf_counter() - start


def fastest(runs: Mapping[str, Callable[[], object]], wait: Callable[[object], None], repeats: int = 3) -> str:
    """The name of the fastest of ``runs``, ways to compute one result (each warmed up
    :data:`WARMUPS` times, then best of ``repeats``, interleaved). The first way is the plain one
    and must run; another that raises ``RuntimeError`` or ``NotImplementedError`` (an op this
    build or CPU lacks) is left out."""
    usable: dict[str, Callable[[], object]] = {}
    for position, (name, run) in enumerate(runs.items()):
        try:
            for _ in range(WARMUPS):
                _timed(run, wait)
        except (RuntimeError, NotImplementedError):
            if not position:
                raise
            continue
        usable[name] = run
    best = dict.fromkeys(usable, float("inf"))
    for _ in range(repeats):
        for name, run in usable.items():
            best[name] = min(best[name], _timed(run, wait))
    return min(best, key=lambda name: best[name])


def measured_speedup(
    run_f32: Callable[[int], object], run_low: Callable[[int], object], wait: Callable[[object], None], repeats: int = 5
) -> float:
    """``run_f32``'s best time over ``run_low``'s on :data:`SPEEDUP_SHAPE` (each warmed up
    :data:`WARMUPS` times, then best of ``repeats``, interleaved so that a neighbour's load hits both alike); ``run(rows)``
    multiplies that many rows, ``wait`` blocks until a result is computed (a device synchronise,
    MLX's ``eval``). A product already :data:`SLOWER` times slower on its first timed run (MLX's
    bf16 on a CPU, torch's fp16 without AVX512-FP16) is reported from that run."""

    def timed(run: Callable[[int], object]) -> float:
        return _timed(lambda: run(SPEEDUP_SHAPE[0]), wait)

    for _ in range(WARMUPS):
        timed(run_f32)
        timed(run_low)
    best = [timed(run_f32), timed(run_low)]
    if best[1] > SLOWER * best[0]:
        return best[0] / best[1]
    for _ in range(repeats - 1):
        best = [min(best[0], timed(run_f32)), min(best[1], timed(run_low))]
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

    def host_matmul(self, a: npt.NDArray[HostFloat], b: npt.NDArray[HostFloat]) -> npt.NDArray[HostFloat]:
        """NumPy's own product: the NumPy backend shares its BLAS threads with the host, and MLX's
        CPU kernels were not measured to suffer from them (torch's were: it overrides this)."""
        out: npt.NDArray[HostFloat] = np.matmul(a, b)
        return out
