from __future__ import annotations

import threading

import pytest

from embedtools import ByteBudget, InvalidArgumentError, MemoryLimitError
from embedtools.budget import format_bytes


def test_reserve_release_report() -> None:
    budget = ByteBudget(1000)
    budget.reserve("a", 600)
    budget.reserve("b", 400)  # landing exactly on the limit is allowed
    report = budget.report()
    assert (report.used_bytes, report.limit_bytes, report.available_bytes) == (1000, 1000, 0)
    assert dict(report.by_owner) == {"a": 600, "b": 400}
    budget.release("a", 100)
    budget.release("b")
    assert dict(budget.report().by_owner) == {"a": 500}
    assert budget.report().available_bytes == 500


def test_refusal_names_asked_used_and_limit_and_changes_nothing() -> None:
    budget = ByteBudget.from_gib(1.0)
    budget.reserve("table", 900 * 2**20)
    with pytest.raises(MemoryLimitError) as info:
        budget.reserve("other", 200 * 2**20)
    message = str(info.value)
    assert "200.0 MiB" in message and "900.0 MiB" in message and "1.0 GiB" in message and "124.0 MiB" in message
    assert (info.value.asked, info.value.used, info.value.limit) == (200 * 2**20, 900 * 2**20, 2**30)
    assert isinstance(info.value, MemoryError)
    assert dict(budget.report().by_owner) == {"table": 900 * 2**20}


@pytest.mark.parametrize("bad", [0, -1, 1.5, "8", True, None])
def test_limit_must_be_positive_int(bad: object) -> None:
    with pytest.raises(InvalidArgumentError):
        ByteBudget(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "8", True, None])
def test_gib_must_be_positive_finite(bad: object) -> None:
    with pytest.raises(InvalidArgumentError):
        ByteBudget.from_gib(bad)


def test_release_more_than_held_or_negative_is_refused() -> None:
    budget = ByteBudget(100)
    budget.reserve("a", 10)
    with pytest.raises(InvalidArgumentError):
        budget.release("a", 11)
    with pytest.raises(InvalidArgumentError):
        budget.release("a", -1)
    with pytest.raises(InvalidArgumentError):
        budget.reserve("a", -5)
    assert budget.report().used_bytes == 10


def test_concurrent_reservations_never_exceed_the_limit() -> None:
    budget = ByteBudget(10_000)
    refused = []

    def worker(name: str) -> None:
        for _ in range(200):
            try:
                budget.reserve(name, 7)
            except MemoryLimitError:
                refused.append(name)

    threads = [threading.Thread(target=worker, args=(f"t{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = budget.report()
    assert report.used_bytes == sum(report.by_owner.values()) <= 10_000
    assert report.used_bytes + 7 > 10_000 and refused


def test_format_bytes() -> None:
    assert format_bytes(12) == "12 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 2**30) == "3.0 GiB"
    assert format_bytes(5 * 2**40) == "5120.0 GiB"
