"""Typed, composable row filters for search: by label, by metadata value, by id.

    from embedtools.filters import Label, Meta, Ids
    store.search(q, k=10, where=Label("news") & Meta("year").between(2020, 2024) & ~Ids("a", "b"))
    store.search(q, k=10, where=Meta("lang").isin("en", "de") | Meta("score").eq(1))

A filter is evaluated once per search into a boolean row mask over the searched table; the search
is then exact among the rows that match (see ``EmbeddingStore.search``). There is no string
language to parse or inject into: filters are plain frozen objects that type-check.

Rows without a metadata key never match a condition on it (and match its negation); a key that no
row of the table has is refused with :class:`InvalidArgumentError` — it is almost always a typo.

Values are checked when a filter is built, so a bad one fails before any search: ``Ids`` takes str
ids, ``Label`` str or int labels (``Label(3)`` matches the int label 3, never ``"3"``), each as a
separate argument (``Ids(*ids)`` for a list: a list passed whole is refused, not guessed at);
``Meta`` compares JSON scalars (numbers exactly, whatever their size; NaN and infinities, which
metadata cannot hold, are refused). Whatever a table's metadata holds (a file written by an older
version may hold ints beyond float64), a filter answers match or no match, never a builtin error.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import numpy as np

from embedtools.errors import InvalidArgumentError
from embedtools.validation import INT64_MAX, INT64_MIN, Labels, is_integer

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["And", "Filter", "Ids", "Label", "Meta", "MetaCondition", "Not", "Or", "RowSource"]


# Guards rather than bare isinstance: narrowing by the numpy classes leaves their type argument
# unknown, which pyright --strict reports at every use.
def _is_real(value: object) -> TypeGuard[float | np.floating[Any]]:
    return isinstance(value, (float, np.floating))


def _is_numpy_bool(value: object) -> TypeGuard[np.bool_[Any]]:
    return isinstance(value, np.bool_)

_MISSING = object()
_JSON_SCALARS = (str, int, float, bool, type(None))


class RowSource:
    """What filters read from a table, encoded once per key so a filter is a few vectorised passes.

    Each metadata key (and the labels) becomes categorical codes (one int per row; equal JSON
    values share a code, ``true`` and ``1`` do not) and, for ranges, a float column (NaN where the
    row lacks the key or holds no number). Both are built on first use and kept with the table.
    """

    def __init__(self, ids: tuple[str, ...], labels: Labels, metadata: tuple[str, ...]) -> None:
        self.ids = ids
        self.labels = labels
        self._metadata = metadata
        self._rows: list[dict[str, Any]] | None = None
        self._codes: dict[str | None, tuple[npt.NDArray[np.int64], dict[tuple[str, Any], int]]] = {}
        self._numbers: dict[str, tuple[npt.NDArray[np.float64], dict[int, int | float]]] = {}
        self._id_positions: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def _column(self, key: str) -> list[Any]:
        if self._rows is None:
            self._rows = [_decode_row(text) for text in self._metadata]
        values = [row.get(key, _MISSING) for row in self._rows]
        if all(v is _MISSING for v in values):
            raise InvalidArgumentError(f"no row has metadata key {key!r}")
        return values

    def codes(self, key: str | None) -> tuple[npt.NDArray[np.int64], dict[tuple[str, Any], int]]:
        """Categorical codes of a metadata key's values (``None``: the labels); -1 marks no value."""
        if key not in self._codes:
            values: list[Any] = list(self.labels) if key is None else self._column(key)
            identity = _label_identity if key is None else _identity
            table: dict[tuple[str, Any], int] = {}
            codes = np.fromiter((_code(identity(v), table) for v in values), dtype=np.int64, count=len(values))
            self._codes[key] = (codes, table)
        return self._codes[key]

    def numbers(self, key: str) -> tuple[npt.NDArray[np.float64], dict[int, int | float]]:
        """A key's numbers as float64 (NaN: no number), and by row the ones float64 cannot hold
        exactly (ints beyond 2**53, infinities from old files), which ranges compare one by one."""
        if key not in self._numbers:
            column = self._column(key)
            exact = {i: v for i, v in enumerate(column) if _is_number(v) and not _fits_float(v)}
            floats = np.fromiter(
                (float(v) if _is_number(v) and i not in exact else math.nan for i, v in enumerate(column)),
                dtype=np.float64,
                count=len(column),
            )
            self._numbers[key] = (floats, exact)
        return self._numbers[key]

    def positions(self, ids: frozenset[str]) -> npt.NDArray[np.int64]:
        if self._id_positions is None:
            self._id_positions = {id_: i for i, id_ in enumerate(self.ids)}
        found = [self._id_positions[i] for i in ids if i in self._id_positions]
        return np.array(found, dtype=np.int64)

    def matching(self, key: str | None, wanted: Iterable[object]) -> npt.NDArray[np.bool_]:
        codes, table = self.codes(key)
        identity = _label_identity if key is None else _identity
        wanted_codes = [table[k] for w in wanted if (k := identity(w)) is not None and k in table]
        return np.isin(codes, wanted_codes)


def _decode_row(text: str) -> dict[str, Any]:
    """A row's metadata; text that is not a JSON object (only a damaged file could hold it) counts
    as a row without keys, so it matches no condition rather than failing every search."""
    try:
        row: object = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    return cast("dict[str, Any]", row) if isinstance(row, dict) else {}


def _identity(value: object) -> tuple[str, Any] | None:
    """A JSON value's identity for equality: numbers by exact value (1 == 1.0; Python compares and
    hashes ints and floats exactly, at any size), others within their type; NaN equals nothing."""
    if value is _MISSING or not isinstance(value, _JSON_SCALARS):
        return None
    if _is_number(value):
        return None if value != value else ("number", value)
    return (type(value).__name__, value)


def _label_identity(value: object) -> tuple[str, Any]:
    """Labels are str or int and compare within their kind: the label 3 is not the label "3"."""
    return ("int" if isinstance(value, int) else "str", value)


def _code(identity: tuple[str, Any] | None, table: dict[tuple[str, Any], int]) -> int:
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


def _values(values: tuple[object, ...], what: str, ints: bool) -> frozenset[str | int]:
    """The filter's values, each checked alone; a list given whole is refused, with the fix."""
    if not values:
        raise InvalidArgumentError(f"{what} takes one or more values")
    kinds = "str or int" if ints else "str"
    out: set[str | int] = set()
    for value in values:
        if isinstance(value, str):
            out.add(str.__str__(value))
        elif ints and is_integer(value) and not isinstance(value, (bool, np.bool_)):
            number = int(value)
            if not INT64_MIN <= number <= INT64_MAX:
                raise InvalidArgumentError(f"{what}({number}): int labels are int64")
            out.add(number)
        elif isinstance(value, (list, tuple, set, frozenset, np.ndarray)):
            raise InvalidArgumentError(
                f"{what} takes its values as separate arguments: {what}('a', 'b'), or {what}(*values) for a list"
            )
        else:
            raise InvalidArgumentError(f"{what} takes {kinds} values, not {type(value).__name__} ({value!r})")
    return frozenset(out)


@dataclass(frozen=True, init=False)
class Label(Filter):
    """Rows whose label is one of ``labels`` (str or int; ``Label(*labels)`` for a list)."""

    labels: frozenset[str | int]

    def __init__(self, *labels: str | int | np.integer[Any]) -> None:
        object.__setattr__(self, "labels", _values(labels, "Label", ints=True))

    def mask(self, rows: RowSource) -> npt.NDArray[np.bool_]:
        return rows.matching(None, self.labels)


@dataclass(frozen=True, init=False)
class Ids(Filter):
    """Rows whose id is one of ``ids`` (ids not in the table simply match nothing; ``Ids(*ids)``
    for a list)."""

    ids: frozenset[str]

    def __init__(self, *ids: str) -> None:
        object.__setattr__(self, "ids", frozenset(str(i) for i in _values(ids, "Ids", ints=False)))

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
        numbers, exact = rows.numbers(self.key)
        low = -math.inf if self.low is None else _float_at_least(self.low)
        high = math.inf if self.high is None else _float_at_most(self.high)
        with np.errstate(invalid="ignore"):
            out = (numbers >= low) & (numbers <= high)  # NaN (no number) compares false
        for i, value in exact.items():  # Python compares ints and floats exactly
            out[i] = (self.low is None or value >= self.low) and (self.high is None or value <= self.high)
        return out


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fits_float(value: int | float) -> bool:
    """Whether float64 holds the number exactly (and finitely), so vectorised ranges are exact."""
    if isinstance(value, float):
        return math.isfinite(value)
    return -(2**53) <= value <= 2**53


def _float_at_least(bound: float) -> float:
    """The least float64 ``>= bound``: a float row is ``>= bound`` exactly when it is ``>=`` this."""
    try:
        f = float(bound)
    except OverflowError:
        return math.inf if bound > 0 else -math.inf
    return math.nextafter(f, math.inf) if f < bound else f


def _float_at_most(bound: float) -> float:
    """The greatest float64 ``<= bound`` (the mirror of :func:`_float_at_least`)."""
    try:
        f = float(bound)
    except OverflowError:
        return math.inf if bound > 0 else -math.inf
    return math.nextafter(f, -math.inf) if f > bound else f


def _meta_value(value: object, what: str) -> object:
    """A value to compare metadata with, as the JSON scalar it stands for (numpy scalars too)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)  # a str subclass (numpy's str_) as the str it equals
    if _is_numpy_bool(value):
        return bool(value)
    if is_integer(value):
        return int(value)
    if _is_real(value):
        number = float(value)
        if not math.isfinite(number):
            raise InvalidArgumentError(f"{what}: {number} is not a value metadata can hold (JSON has no NaN or infinity)")
        return number
    raise InvalidArgumentError(f"{what} takes JSON scalars (str, number, bool, None), not {type(value).__name__}")


def _bound(value: object) -> float | None:
    """A range bound: None (open) or a finite number (ints of any size compare exactly)."""
    if value is None:
        return None
    if is_integer(value) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    if _is_real(value) and math.isfinite(value):
        return float(value)
    raise InvalidArgumentError(f"range bounds are finite numbers or None, got {value!r}")


@dataclass(frozen=True)
class Meta:
    """Conditions on one metadata key: ``Meta("year").eq(2024)``, ``.isin(a, b)``, ``.between(lo, hi)``."""

    key: str

    def __post_init__(self) -> None:
        if not isinstance(cast(object, self.key), str):  # untyped callers pass anything
            raise InvalidArgumentError(f"a metadata key is a str, not {type(self.key).__name__}")

    def eq(self, value: object) -> MetaCondition:
        """Rows whose value equals ``value`` (``True`` is not ``1``; ``None`` matches JSON null)."""
        return MetaCondition(self.key, values=(_meta_value(value, "Meta(...).eq"),))

    def isin(self, *values: object) -> MetaCondition:
        """Rows whose value equals one of ``values`` (``isin(*values)`` for a list)."""
        if not values:
            raise InvalidArgumentError("Meta(...).isin takes one or more JSON scalars (str, number, bool, None)")
        return MetaCondition(self.key, values=tuple(_meta_value(v, "Meta(...).isin") for v in values))

    def between(
        self, low: float | np.integer[Any] | np.floating[Any] | None = None, high: float | np.integer[Any] | np.floating[Any] | None = None
    ) -> MetaCondition:
        """Numbers in ``[low, high]``; either bound may be left open (``None``)."""
        lo, hi = _bound(low), _bound(high)
        if lo is None and hi is None:
            raise InvalidArgumentError("between needs at least one bound")
        if lo is not None and hi is not None and lo > hi:
            raise InvalidArgumentError(f"empty range [{lo}, {hi}]")
        return MetaCondition(self.key, low=lo, high=hi)
