"""A search racing a change: deterministic interleavings through public seams.

A search takes one table version and may fill that version's caches (prefix norms, normalised
prefixes, rotation norms) as it goes. Here another thread removes, updates or drops-and-re-adds the
table at a chosen moment of a search — while its filter runs (before any cache is filled) or when
its kernel starts (after the first fill, before a funnel's later ones) — and the test checks that
the search answered from the version it started with, raised nothing, and left the budget charged
exactly as a freshly built store holding the same rows would be.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from embedtools import ByteBudget, EmbeddingStore, Filter, NumpyBackend, SearchResult, Sha256Hasher
from embedtools.filters import RowSource
from embedtools.protocols import DTypeName
from tests.helpers import clustered

ROWS, DIM = 60, 16


class HookedBackend(NumpyBackend):
    """NumPy, except that the first ``from_numpy`` after :attr:`hook` is set runs the hook first: in
    a search that is the queries' upload, after the first cache fill and before the kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.hook: Callable[[], None] | None = None

    def from_numpy(self, array: npt.NDArray[Any], dtype: DTypeName = "float32") -> npt.NDArray[Any]:
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return super().from_numpy(array, dtype)


class Everything(Filter):
    """Matches every row; runs ``hook`` first, while the search is between taking its table and
    filling any cache."""

    def __init__(self, hook: Callable[[], None] | None) -> None:
        self.hook = hook

    def mask(self, rows: RowSource) -> npt.NDArray[np.bool_]:
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return np.ones(len(rows), dtype=np.bool_)


def in_another_thread(change: Callable[[], object]) -> Callable[[], None]:
    """A hook that runs ``change`` to completion in another thread (so it takes the store's lock
    as a real writer would) and re-raises what it raised."""

    def hook() -> None:
        errors: list[BaseException] = []

        def run() -> None:
            try:
                change()
            except BaseException as exc:  # noqa: BLE001 - handed to the searching thread
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the change did not finish: it waited on the searching thread"
        if errors:
            raise errors[0]

    return hook


def make_store(backend: NumpyBackend | None = None) -> EmbeddingStore:
    return EmbeddingStore(backend or NumpyBackend(), ByteBudget(1 << 30), Sha256Hasher())


def fill(store: EmbeddingStore, vectors: npt.NDArray[np.float32], ids: tuple[str, ...], rotation: bool) -> None:
    store.add(vectors, ids=list(ids), labels=["a", "b"] * (len(ids) // 2), metadata=[{"n": i} for i in range(len(ids))])
    if rotation:
        store.fit_rotation(DIM, 8)


SEARCHES: dict[str, tuple[dict[str, Any], bool]] = {
    "prefix-cosine": ({"dimension": 8, "metric": "cosine"}, False),
    "prefix-l2": ({"dimension": 8, "metric": "l2"}, False),
    "funnel-cosine": ({"funnel": [(4, 20), (8, 10)], "metric": "cosine"}, False),
    "rotated-funnel-l2": ({"funnel": [(4, 20), (8, 10)], "metric": "l2"}, True),
}


def search(store: EmbeddingStore, queries: npt.NDArray[np.float32], kwargs: dict[str, Any], where: Filter | None = None) -> SearchResult:
    return store.search(queries, k=5, where=where, **kwargs)


def copy_of(store: EmbeddingStore, rotation: bool) -> EmbeddingStore:
    """A store built afresh from what ``store`` holds now (rows, labels, metadata, rotation width)."""
    fresh = make_store()
    for d in store.dimensions:
        table = store.table(d)
        fresh.add(table.to_numpy(), ids=list(table.ids), labels=table.labels, metadata=list(table.metadata))
        if rotation:
            fresh.fit_rotation(d, 8)
    return fresh


def charged(store: EmbeddingStore) -> tuple[int, dict[int, int]]:
    info = store.memory_info()
    assert info.used_bytes == info.store_bytes == sum(t.nbytes for t in info.tables.values())
    return info.used_bytes, {d: t.nbytes for d, t in info.tables.items()}


CHANGES = ["remove-all", "update", "drop-and-re-add"]


@pytest.mark.parametrize("moment", ["filter", "kernel"])
@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("name", list(SEARCHES))
def test_a_search_racing_a_change_answers_from_one_version_and_charges_only_the_current_one(
    name: str, change: str, moment: str
) -> None:
    kwargs, rotation = SEARCHES[name]
    backend = HookedBackend()
    store = make_store(backend)
    old = clustered(ROWS, DIM, seed=1)
    ids = tuple(f"r{i}" for i in range(ROWS))
    fill(store, old, ids, rotation)
    queries = clustered(4, DIM, seed=2)
    expected = search(copy_of(store, rotation), queries, kwargs)  # the version the search starts on

    def apply() -> None:
        if change == "remove-all":
            store.remove(list(ids))
        elif change == "update":
            store.update(list(ids[:10]), clustered(10, DIM, seed=3), metadata=[{"n": -1}] * 10)
        else:
            store.drop(DIM)
            store.add(clustered(ROWS // 2, DIM, seed=4))

    hook = in_another_thread(apply)
    if moment == "filter":
        result = search(store, queries, kwargs, where=Everything(hook))
    else:
        backend.hook = hook
        result = search(store, queries, kwargs)
    assert backend.hook is None, "the hook never ran"

    assert result.row_ids == ids
    np.testing.assert_array_equal(result.indices, expected.indices)
    np.testing.assert_allclose(result.scores, expected.scores, rtol=1e-6, atol=1e-6)

    still_rotated = rotation and change != "drop-and-re-add"
    fresh = copy_of(store, still_rotated)
    assert charged(store) == charged(fresh)
    if store.dimensions:  # the same caches touched on both: still the same charge
        again, anew = search(store, queries, kwargs), search(fresh, queries, kwargs)
        if not still_rotated:  # an updated table keeps its rotation; the copy fits its own
            np.testing.assert_array_equal(again.indices, anew.indices)
        assert charged(store) == charged(fresh)
    store.clear()
    assert store.accountant.report().used_bytes == 0 and store.accountant.report().by_owner == {}


def test_a_search_racing_the_removal_of_every_row_raises_nothing_and_leaves_nothing_charged() -> None:
    """The issue's reproduction: a filter runs while every row is removed (the search used to
    raise ``KeyError`` and leave its prefix norms charged to an empty store)."""
    store = make_store()
    store.add(clustered(30, DIM), ids=[f"r{i}" for i in range(30)])
    hook = in_another_thread(lambda: store.remove([f"r{i}" for i in range(30)]))
    result = store.search(clustered(2, DIM, seed=1), k=3, dimension=8, where=Everything(hook))
    assert result.indices.shape == (2, 3) and set(result.ids[0]) <= {f"r{i}" for i in range(30)}
    assert store.dimensions == ()
    assert store.memory_info().used_bytes == 0 and store.accountant.report().by_owner == {}
