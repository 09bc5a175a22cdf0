"""Store edges: a mapped store refuses drop/clear, generated ids never collide, unknown ids are typed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import embedtools as et
from embedtools import ByteBudget, EmbeddingStore, ReadOnlyStoreError, Sha256Hasher, UnknownIdError
from tests.helpers import clustered


def make_store() -> EmbeddingStore:
    return EmbeddingStore(et.make_backend("numpy"), ByteBudget(1 << 30), Sha256Hasher())


@pytest.mark.parametrize("call", ["drop", "clear"])
def test_a_mapped_store_refuses_drop_and_clear_and_changes_nothing(tmp_path: Path, call: str) -> None:
    source = make_store()
    source.add(clustered(50, 8), ids=[f"r{i}" for i in range(50)])
    source.add(clustered(20, 4, seed=1))
    source.save(tmp_path / "s")
    store = make_store().load(tmp_path / "s", mmap=True)
    before = store.memory_info()
    with pytest.raises(ReadOnlyStoreError, match="materialize"):
        store.drop(8) if call == "drop" else store.clear()
    assert store.dimensions == (4, 8) and store.mapped_from == tmp_path / "s"
    assert store.memory_info() == before and store.accountant.report().used_bytes == before.used_bytes
    np.testing.assert_array_equal(store.table(8).to_numpy(), source.table(8).to_numpy())
    store.materialize()
    store.drop(8) if call == "drop" else store.clear()
    assert list(store.dimensions) == ([4] if call == "drop" else [])


def test_generated_ids_skip_ids_left_by_a_remove() -> None:
    store = make_store()
    assert store.add(clustered(3, 4)) == ("0", "1", "2")  # a fresh table: the row positions
    store.remove(["0"])
    new = store.add(clustered(2, 4, seed=1))  # positions 2 and 3; "2" survived the remove
    assert new == ("3", "4")
    assert store.table(4).ids == ("1", "2", "3", "4")


def test_generated_ids_skip_ids_given_by_the_caller() -> None:
    store = make_store()
    store.add(clustered(3, 4), ids=["0", "1", "5"])
    assert store.add(clustered(3, 4, seed=1)) == ("3", "4", "6")
    assert store.add(clustered(1, 4, seed=2)) == ("7",)  # no collision: the position, as before


def test_generated_ids_never_collide_over_any_removes_and_adds() -> None:
    store = make_store()
    rng = np.random.default_rng(0)
    for step in range(60):
        rows = store.table(4).ids if 4 in store.dimensions else ()
        if rows and rng.random() < 0.4:
            store.remove([rows[i] for i in rng.choice(len(rows), size=rng.integers(1, len(rows) + 1), replace=False)])
        elif rng.random() < 0.3:  # a caller's numeric id just ahead of the positions to come
            ahead = str(len(rows) + int(rng.integers(0, 4)))
            if ahead not in rows:
                store.add(clustered(1, 4, seed=step), ids=[ahead])
        else:
            added = store.add(clustered(int(rng.integers(1, 5)), 4, seed=step))
            assert not set(added) & set(rows)
        ids = store.table(4).ids if 4 in store.dimensions else ()
        assert len(set(ids)) == len(ids)


def test_index_of_an_unknown_id_is_an_unknown_id_error() -> None:
    store = make_store()
    store.add(clustered(3, 4), ids=["a", "b", "c"])
    with pytest.raises(UnknownIdError, match="'zzz'"):
        store.table(4).index_of("zzz")
    assert store.table(4).index_of("b") == 1
