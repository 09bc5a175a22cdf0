"""Typed, composable row filters for search: by label, by metadata value, by id.

    from embedtools.filters import Label, Meta, Ids
    store.search(q, k=10, where=Label("news") & Meta("year").between(2020, 2024) & ~Ids("a", "b"))
    store.search(q, k=10, where=Meta("lang").isin("en", "de") | Meta("score").eq(1))

A filter is evaluated once per search into a boolean row mask over the searched table; the search
is then exact among the rows that match (see ``EmbeddingStore.search``). There is no string
language to parse or inject into: filters are plain frozen objects that type-check.

Rows without a metadata key never match a condition on it (and match its negation); a key that no
row of the table has is refused with :class:`InvalidArgumentError` — it is almost always a typo.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from embedtools.errors import InvalidArgumentError

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["And", "Filter", "Ids", "Label", "Meta", "MetaCondition", "Not", "Or", "RowSource"]

_MISSING = object()
_JSON_SCALARS = (str, int, float, bool, type(None))


class RowSource:
    """What filters read from a table, encoded once per key so a filter is a few vectorised passes.

    Each metadata key (and the labels) becomes categorical codes (one int per row; equal JSON
    values share a code, ``true`` and ``1`` do not) and, for ranges, a float column (NaN where the
    row lacks the key or holds no number). Both are built on first use and kept with the table.
    """

    def __init__(self, ids: tuple[str, ...], labels: tuple[str, ...], metadata: tuple[str, ...]) -> None:
        self.ids = ids
        self.labels = labels
        self._metadata = metadata
        self._rows: list[dict[str, Any]] | None = None
        self._codes: dict[str | None, tuple[npt.NDArray[np.int64], dict[tuple[str, Any], int]]] = {}
        self._numbers: dict[str, npt.NDArray[np.float64]] = {}
        self._id_positions: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def _column(self, key: str) -> list[Any]:
        if self._rows is None:
            self._rows = [json.loads(text) for text in self._metadata]
        values = [row.get(key, _MISSING) for row in self._rows]
        if all(v is _MISSING for v in values):
            raise InvalidArgumentError(f"no row has metadata key {key!r}")
        return values

    def codes(self, key: str | None) -> tuple[npt.NDArray[np.int64], dict[tuple[str, Any], int]]:
        """Categorical codes of a metadata key's values (``None``: the labels); -1 marks no value."""
        if key not in self._codes:
            values: list[Any] = list(self.labels) if key is None else self._column(key)
            table: dict[tuple[str, Any], int] = {}
            codes = np.fromiter((_code(v, table) for v in values), dtype=np.int64, count=len(values))
            self._codes[key] = (codes, table)
        return self._codes[key]

    def numbers(self, key: str) -> npt.NDArray[np.float64]:
        if key not in self._numbers:
            column = self._column(key)
            self._numbers[key] = np.fromiter(
                (float(v) if _is_number(v) else math.nan for v in column), dtype=np.float64, count=len(column)
            )
        return self._numbers[key]

    def positions(self, ids: frozenset[str]) -> npt.NDArray[np.int64]:
        if self._id_positions is None:
            self._id_positions = {id_: i for i, id_ in enumerate(self.ids)}
        found = [self._id_positions[i] for i in ids if i in self._id_positions]
        return np.array(found, dtype=np.int64)

    def matching(self, key: str | None, wanted: Iterable[object]) -> npt.NDArray[np.bool_]:
        codes, table = self.codes(key)
        wanted_codes = [table[k] for w in wanted if (k := _identity(w)) is not None and k in table]
        return np.isin(codes, wanted_codes)


def _identity(value: object) -> tuple[str, Any] | None:
    """A JSON value's identity for equality: numbers by value (1 == 1.0), others within their type."""
    if value is _MISSING or not isinstance(value, _JSON_SCALARS):
        return None
    if _is_number(value):
        return ("number", float(value))  # type: ignore[arg-type]
    return (type(value).__name__, value)


def _code(value: object, table: dict[tuple[str, Any], int]) -> int:
    identity = _identity(value)
    if identity is None:
        return -1
    return table.setdefault(identity, len(table))


class Filter(ABC):
    """A condition on rows; combine with ``&``, ``|`` and ``~``."""

    @abstractmethod
    def mask(self, rows: RowSource) -> npt.NDArray[np.bool_]:
        """One bool per row: whether the row matches."""

    def __and__(self, other: Filter) -> Filter:
        return And(self, _check(other))

    def __or__(self, other: Filter) -> Filter:
        return Or(self, _check(other))

    def __invert__(self) -> Filter:
        return Not(self)


def _check(other: object) -> Filter:
    if not isinstance(other, Filter):
        raise InvalidArgumentError(f"filters combine with filters, not {type(other).__name__}")
    return other


@dataclass(frozen=True)
class And(Filter):
    left: Filter
    right: Filter

    def mask(self, rows: RowSource) -> npt.NDArray[np.bool_]:
        return self.left.mask(rows) & self.right.mask(rows)


@dataclass(frozen=True)
class Or(Filter):
    left: Filter
    right: Filter

    def mask(self, rows: RowSource) -> npt.NDArray[np.bool_]:
        return self.left.mask(rows) | self.right.mask(rows)


@dataclass(frozen=True)
class Not(Filter):
    inner: Filter

    def mask(self, rows: RowSource) -> npt.NDArray[np.bool_]:
        return ~self.inner.mask(rows)


def _strings(values: Iterable[object], what: str) -> frozenset[str]:
    out = frozenset(values)
    if not out or not all(isinstance(v, str) for v in out):
        raise InvalidArgumentError(f"{what} takes one or more str values")
    return out  # type: ignore[return-value]


@dataclass(frozen=True, init=False)
class Label(Filter):
    """Rows whose label is one of ``labels``."""

    labels: frozenset[str]

    def __init__(self, *labels: str) -> None:
        object.__setattr__(self, "labels", _strings(labels, "Label"))

    def mask(self, rows: RowSource) -> npt.NDArray[np.bool_]:
        return rows.matching(None, self.labels)


@dataclass(frozen=True, init=False)
class Ids(Filter):
    """Rows whose id is one of ``ids`` (ids not in the table simply match nothing)."""

    ids: frozenset[str]

    def __init__(self, *ids: str) -> None:
        object.__setattr__(self, "ids", _strings(ids, "Ids"))

    def mask(self, rows: RowSource) -> npt.NDArray[np.bool_]:
        out = np.zeros(len(rows), dtype=bool)
        out[rows.positions(self.ids)] = True
        return out


@dataclass(frozen=True)
class MetaCondition(Filter):
    """``key`` equal to one of ``values`` (``values``), or within ``[low, high]`` (numbers)."""

    key: str
    values: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None

    def mask(self, rows: RowSource) -> npt.NDArray[np.bool_]:
        if self.values is not None:
            return rows.matching(self.key, self.values)
        numbers = rows.numbers(self.key)
        low = -math.inf if self.low is None else self.low
        high = math.inf if self.high is None else self.high
        with np.errstate(invalid="ignore"):
            return (numbers >= low) & (numbers <= high)  # NaN (no number) compares false


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Meta:
    """Conditions on one metadata key: ``Meta("year").eq(2024)``, ``.isin(a, b)``, ``.between(lo, hi)``."""

    key: str

    def __post_init__(self) -> None:
        if not isinstance(self.key, str):
            raise InvalidArgumentError(f"a metadata key is a str, not {type(self.key).__name__}")

    def eq(self, value: object) -> MetaCondition:
        return self.isin(value)

    def isin(self, *values: object) -> MetaCondition:
        if not values or not all(isinstance(v, _JSON_SCALARS) for v in values):
            raise InvalidArgumentError("Meta(...).isin takes one or more JSON scalars (str, number, bool, None)")
        return MetaCondition(self.key, values=tuple(values))

    def between(self, low: float | None = None, high: float | None = None) -> MetaCondition:
        """Numbers in ``[low, high]``; either bound may be left open (``None``)."""
        for bound in (low, high):
            if bound is not None and not (_is_number(bound) and math.isfinite(bound)):
                raise InvalidArgumentError(f"range bounds are finite numbers or None, got {bound!r}")
        if low is None and high is None:
            raise InvalidArgumentError("between needs at least one bound")
        if low is not None and high is not None and low > high:
            raise InvalidArgumentError(f"empty range [{low}, {high}]")
        return MetaCondition(self.key, low=low, high=high)
