"""Seed operations written once over what NumPy, PyTorch and MLX arrays share.

``.shape``, ``.tolist()`` and ``[..., :d]`` behave alike in the three libraries, so these live
here rather than three times; what differs (devices, dtypes, generators, kernels) stays in each
backend.
"""

from __future__ import annotations

from typing import Any, Generic, cast

from embedtools.protocols import ArrayT
from embedtools.validation import check_prefix

__all__ = ["SharedOps"]


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
