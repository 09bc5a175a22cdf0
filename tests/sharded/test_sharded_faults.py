"""Workers lost between and during searches: never an answer from some of the shards.

These tests kill worker processes (their nannies start new ones), so they run on a cluster of
their own rather than the shared one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import embedtools as et
from embedtools.sharded import ShardedStore
from tests.sharded.conftest import CALL_SECONDS, CONFIG, running_cluster


@pytest.fixture
def cluster() -> Iterator[Any]:
    with running_cluster() as client:
        yield client


def kill(client: Any, worker: str, after: float | None = None) -> None:
    """End ``worker``'s process now, or ``after`` seconds from now (a timer on the worker)."""
    try:
        if after is None:
            client.run(os._exit, 1, workers=[worker])
        else:
            client.run(exec, f"import os, threading; threading.Timer({after}, os._exit, (1,)).start()", workers=[worker])
    except Exception:  # the worker's connection closes under the call  # noqa: BLE001
        pass


def build(client: Any, rows: int, dim: int) -> tuple[et.EmbeddingStore, ShardedStore, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(12)
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    single = et.make_container(CONFIG).store()
    single.add(x)
    sharded = ShardedStore(client, CONFIG, shards=2, timeout=CALL_SECONDS)
    sharded.add(x)
    return single, sharded, rng.standard_normal((200, dim)).astype(np.float32)


def test_lost_shards_without_a_file_are_a_typed_error_naming_them(cluster: Any) -> None:
    single, sharded, queries = build(cluster, 500, 16)
    assert sharded.search(queries, 5, metric="l2").ids == single.search(queries, 5, metric="l2").ids
    kill(cluster, sharded.workers[1])
    with pytest.raises(et.ShardLostError) as lost:
        sharded.search(queries, 5, metric="l2")
    assert lost.value.shards == (1,) and "[1]" in str(lost.value)
    with pytest.raises(et.ShardLostError):  # and every later call, changes included: nothing half-done
        sharded.add(queries)


def test_a_saved_shard_lost_between_searches_is_reloaded_and_the_answer_is_identical(cluster: Any, tmp_path: Path) -> None:
    single, sharded, queries = build(cluster, 500, 16)
    sharded.save(tmp_path / "s")
    before = sharded.search(queries, 5, metric="l2")
    old = sharded.workers
    kill(cluster, old[0])
    after = sharded.search(queries, 5, metric="l2")
    assert after.ids == before.ids == single.search(queries, 5, metric="l2").ids
    np.testing.assert_array_equal(after.scores, before.scores)
    assert sharded.last_search is not None and sharded.last_search.attempts == 2
    assert sharded.workers[0] != old[0] and sharded.workers[1] == old[1]


@pytest.mark.parametrize("saved", [True, False])
def test_a_worker_killed_during_a_search_gives_the_whole_answer_or_none(cluster: Any, tmp_path: Path, saved: bool) -> None:
    """The worker's process ends while its shard is searching (a timer armed just before the call):
    with a saved store the search completes with the same answer; without one it raises."""
    single, sharded, queries = build(cluster, 60_000, 64)
    queries = np.vstack([queries] * 3)
    want = single.search(queries, 10, metric="l2")
    if saved:
        sharded.save(tmp_path / "s")
    kill(cluster, sharded.workers[1], after=0.05)
    try:
        got = sharded.search(queries, 10, metric="l2")
    except et.ShardLostError as lost:
        assert not saved and lost.shards == (1,)
    else:  # reloaded from its file, or (without one) the search ended before the worker did
        assert got.ids == want.ids
        np.testing.assert_array_equal(got.scores, want.scores)
