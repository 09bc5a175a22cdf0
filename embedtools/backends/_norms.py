"""The magnitudes float32 norms and cosine scores are computed plainly in, shared by every backend.

A float32 sum of squares is exact to a few ulps while it neither overflows (``|x|² > 3.4e38``: a row
of ``1e20``\\ s) nor underflows (squares below ``1.2e-38`` round to subnormals, or to zero where a
device flushes them): within :data:`SQUARES_RANGE` the absolute error of underflowed squares is
below ``d·2⁻¹²⁶``, i.e. ``d·2⁻⁴⁶`` of the sum. Rows outside it are recomputed scaled by their
largest magnitude, so every finite float32 vector gets its norm (an overflowing norm is inf only
when the norm itself exceeds float32). Scaling, not float64, because float64 does not exist on
MPS or MLX's GPU; dividing by the row's max costs one rounding per element, ``u`` relative.

A cosine score ``q̂·x / |x|`` from a float32 GEMM is as exact as for any other row while ``|x|`` is
within :data:`COSINE_RANGE`: products of a unit query's components with the row's stay far from
float32's ends, so flushed or subnormal products cost at most ``d·2⁻¹²⁶ / 2⁻⁶⁰`` relative. Rows
outside it (``1e-30·(1, 2, 3)``) are scored on the side, exactly.
"""

from __future__ import annotations

__all__ = ["COSINE_RANGE", "SQUARES_RANGE"]

#: Sums of squares a float32 row norm is computed plainly from (inclusive).
SQUARES_RANGE = (2.0**-80, 2.0**100)
#: Row norms a cosine search scores in its float32 GEMM (inclusive); others, except zero, on the side.
COSINE_RANGE = (2.0**-60, 2.0**60)
