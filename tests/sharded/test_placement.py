"""The placement rule and the global row order, without a cluster."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from embedtools.sharded.placement import Runs, place


def test_place_fills_the_emptiest_shards_first_ties_to_the_lower_number() -> None:
    assert place([0, 0], 3) == (2, 1)
    assert place([5, 0], 3) == (0, 3)
    assert place([5, 0, 1], 7) == (0, 4, 3)
    assert place([2, 0, 1], 7) == (2, 3, 2)
    assert place([1, 1, 1], 0) == (0, 0, 0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=5), st.integers(0, 40))
def test_place_is_the_row_by_row_rule(rows: list[int], n: int) -> None:
    counts = list(rows)
    for _ in range(n):  # each row to the shard with the fewest rows, ties to the lower number
        counts[min(range(len(counts)), key=lambda i: (counts[i], i))] += 1
    assert list(place(rows, n)) == [c - r for c, r in zip(counts, rows, strict=True)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=6), st.integers(1, 4), st.data())
def test_runs_map_local_rows_to_global_order_through_adds_and_removals(adds: list[int], shards: int, data: st.DataObject) -> None:
    runs = Runs()
    owner: list[int] = []  # shard of each global row, in global order
    for n in adds:
        shares = place(runs.shard_rows(shards), n)
        runs = runs.appended(shares)
        for s, share in enumerate(shares):
            owner.extend([s] * share)
    gone = data.draw(st.sets(st.integers(0, len(owner) - 1)))
    local = {s: [i for i, o in enumerate(owner) if o == s] for s in range(shards)}  # global rows by shard, in local order
    removed = {s: [j for j, g in enumerate(rows) if g in gone] for s, rows in local.items()}
    after = runs.removed(shards, removed)
    kept = [g for g in range(len(owner)) if g not in gone]
    assert after.rows == len(kept)
    for s in range(shards):
        survivors = [g for g in local[s] if g not in gone]
        positions = after.to_global(s, np.arange(len(survivors)))
        assert [kept[p] for p in positions.tolist()] == survivors
        if survivors:
            shard, at = after.locate(positions)
            assert shard.tolist() == [s] * len(survivors) and at.tolist() == list(range(len(survivors)))
