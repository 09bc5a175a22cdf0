"""The dtype names every backend understands, and the one way a backend looks a name up."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from embedtools.errors import InvalidArgumentError

__all__ = ["DTYPE_NAMES", "dtype_table", "lookup_dtype"]

T = TypeVar("T")

DTYPE_NAMES: tuple[str, ...] = ("float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")


def dtype_table(convert: Callable[[str], T]) -> dict[str, T]:
    """Each name mapped to the library's dtype, e.g. ``dtype_table(lambda n: getattr(torch, n))``."""
    return {name: convert(name) for name in DTYPE_NAMES}


def lookup_dtype(table: Mapping[str, T], dtype: str) -> T:
    try:
        return table[dtype]
    except (KeyError, TypeError):
        raise InvalidArgumentError(f"unsupported dtype {dtype!r}; expected one of {', '.join(DTYPE_NAMES)}") from None
