"""Issue 14, finding 5 (filters and scalar arguments): every bad value is a typed error, whatever
the table holds, and a refused call changes nothing."""

from __future__ import annotations

from collections.abc import Callable
import json
from typing import Any

import numpy as np
import pytest

from embedtools import EmbedtoolsError, Ids, InvalidArgumentError, Label, Meta
from embedtools.filters import Filter, RowSource
from tests.helpers import clustered
from tests.test_store import make_store, snapshot

HUGE = 10**400


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Ids(["a"]), "separate arguments"),  # type: ignore[arg-type]
        (lambda: Ids(("a", "b")), "separate arguments"),  # type: ignore[arg-type]
        (lambda: Ids({"a"}), "separate arguments"),  # type: ignore[arg-type]
        (lambda: Ids(np.array(["a"])), "separate arguments"),  # type: ignore[arg-type]
        (lambda: Ids(3), "str values"),  # type: ignore[arg-type]
        (lambda: Ids(None), "str values"),  # type: ignore[arg-type]
        (lambda: Ids("a", {"b": 1}), "str values"),  # type: ignore[arg-type]
        (lambda: Label(["x"]), "separate arguments"),  # type: ignore[arg-type]
        (lambda: Label([1, 2]), "separate arguments"),  # type: ignore[arg-type]
        (lambda: Label(True), "str or int"),
        (lambda: Label(np.bool_(True)), "str or int"),  # type: ignore[arg-type]
        (lambda: Label(1.0), "str or int"),  # type: ignore[arg-type]
        (lambda: Label(np.float64(1)), "str or int"),  # type: ignore[arg-type]
        (lambda: Label(None), "str or int"),  # type: ignore[arg-type]
        (lambda: Label(2**63), "int64"),
        (lambda: Label(HUGE), "int64"),
        (lambda: Meta("n").eq(float("nan")), "NaN or infinity"),
        (lambda: Meta("n").eq(np.float32("inf")), "NaN or infinity"),
        (lambda: Meta("n").eq([1]), "JSON scalars"),
        (lambda: Meta("n").eq({"a": 1}), "JSON scalars"),
        (lambda: Meta("n").eq(np.array([1, 2])), "JSON scalars"),
        (lambda: Meta("n").eq(b"x"), "JSON scalars"),
        (lambda: Meta("n").isin(1, [2]), "JSON scalars"),
        (lambda: Meta("n").between(True, None), "finite numbers"),
        (lambda: Meta("n").between(None, np.array([1.0])), "finite numbers"),  # type: ignore[arg-type]
        (lambda: Meta("n").between(None, "5"), "finite numbers"),  # type: ignore[arg-type]
        (lambda: Meta("n").between(float("-inf"), 0), "finite numbers"),
        (lambda: Meta("n").between(HUGE, 0), "empty range"),
        (lambda: Meta(["n"]), "str"),  # type: ignore[arg-type]
    ],
)
def test_bad_filter_values_are_typed_errors_when_built(build: Any, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        build()


METADATA: list[dict[str, Any]] = [{"n": HUGE}, {"n": -HUGE}, {"n": 2**53 + 1}, {"n": 2**53}, {"n": 1.5}, {"n": True}, {"n": None}, {}]


def huge_rows(extra: tuple[str, ...] = ()) -> RowSource:
    """Rows as filters read them, holding what an older version's files may hold (ints beyond
    float64, which ``add`` and ``load`` may refuse): a filter must still answer, exactly."""
    texts = tuple(json.dumps(row) for row in METADATA) + extra
    n = len(texts)
    return RowSource(tuple(str(i) for i in range(n)), ("",) * n, texts)


def matches(rows: RowSource, where: Filter) -> list[int]:
    return np.flatnonzero(where.mask(rows)).tolist()


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (lambda: Meta("n").eq(HUGE), [0]),
        (lambda: Meta("n").eq(float(2**53)), [3]),  # 2**53 + 1 is not the float 2**53: compared exactly
        (lambda: Meta("n").eq(np.int64(2**53)), [3]),
        (lambda: Meta("n").isin(2**53 + 1, -HUGE), [1, 2]),
        (lambda: Meta("n").eq(1), []),  # True is not 1
        (lambda: Meta("n").eq(True), [5]),
        (lambda: Meta("n").eq(None), [6]),
        (lambda: Meta("n").between(2**53 + 1, None), [0, 2]),
        (lambda: Meta("n").between(None, 2**53), [1, 3, 4]),
        (lambda: Meta("n").between(np.float32(1), np.int32(2)), [4]),
        (lambda: Meta("n").between(1e308, None), [0]),
        (lambda: Meta("n").between(-HUGE, HUGE), [0, 1, 2, 3, 4]),
        (lambda: Meta("n").between(-HUGE + 1, HUGE - 1), [2, 3, 4]),
        (lambda: ~Meta("n").between(0, None), [1, 5, 6, 7]),
    ],
)
def test_filters_compare_any_stored_number_exactly(where: Callable[[], Filter], expected: list[int]) -> None:
    assert matches(huge_rows(), where()) == expected


def test_filters_on_any_stored_metadata_never_raise_builtin_errors() -> None:
    damaged = ("[" * 100_000, "[1, 2]", "not json", '{"n": 1e999}', '{"n": -1e999}', '{"n": NaN}')
    rows = huge_rows(damaged)
    assert matches(rows, Meta("n").eq(0)) == []
    assert matches(rows, Meta("n").between(0, 10)) == [4] and matches(rows, Meta("n").between(0, None)) == [0, 2, 3, 4, 11]
    assert matches(rows, Meta("n").between(None, -HUGE)) == [1, 12]
    assert matches(rows, Meta("n").isin("a", 2.5, None)) == [6] and matches(rows, Label("")) == list(range(14))
    with pytest.raises(InvalidArgumentError, match="no row has metadata key"):
        matches(rows, Meta("missing").eq(1))


def test_exact_comparison_in_a_store_and_refusals_change_nothing() -> None:
    store = make_store()
    store.add(clustered(3, 4), metadata=[{"n": 2**53 + 1}, {"n": 2**53}, {"n": -(2**63)}])
    q = clustered(1, 4, seed=5)
    assert store.search(q, k=3, where=Meta("n").eq(2**53 + 1)).indices.tolist() == [[0]]
    assert sorted(store.search(q, k=3, where=Meta("n").between(None, 2**53)).indices[0].tolist()) == [1, 2]
    before = snapshot(store)
    bad_filters: list[Callable[[], Filter]] = [
        lambda: Meta("n").eq([1]),
        lambda: Ids(["0"]),  # type: ignore[arg-type]
        lambda: Meta("n").between(float("nan"), None),
    ]
    for bad in bad_filters:
        with pytest.raises(EmbedtoolsError):
            store.search(q, k=3, where=bad())
    assert snapshot(store) == before
