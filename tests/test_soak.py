"""Concurrency soak: readers search while a writer changes every table, then the budget is audited.

Three reader threads search (cosine and l2, prefix ``dimension=``, funnels, ``where=`` filters)
while one writer thread adds (with and without ids), removes (some rows, or all of a table),
updates, drops and re-adds tables and fits rotations. Every thread stops at a wall-clock deadline
and is joined with a timeout; any exception in any thread fails the test. At the end the store's
charge must equal that of a store freshly built from what it holds, once the same caches are
touched on both, and ``clear()`` must leave the accountant at zero.

``EMBEDTOOLS_SOAK_SECONDS`` (default 8) sets how long the threads run, for a long run by hand.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

import embedtools as et
from embedtools import ByteBudget, DimensionError, EmbeddingStore, Filter, Label, Meta, Metric, Sha256Hasher

SOAK_SECONDS = float(os.environ.get("EMBEDTOOLS_SOAK_SECONDS", "8"))
READERS = 3
DIMS = (16, 24)
#: The prefix widths readers search at (besides the full width); each is below both tables.
PREFIXES = (4, 8, 12)
METRICS: tuple[Metric, ...] = ("cosine", "l2")
FILTERS: tuple[Filter | None, ...] = (
    None,
    Label("a"),
    Label("b"),
    Meta("n").between(0, 50),
    Label("a") & Meta("n").between(10, None),
    ~Label("a"),
)
MAX_ROWS = 400
ROTATION_COMPONENTS = 8


def make_store() -> EmbeddingStore:
    return EmbeddingStore(et.make_backend("numpy"), ByteBudget(1 << 30), Sha256Hasher())


def rows(rng: np.random.Generator, n: int, d: int) -> npt.NDArray[np.float32]:
    return (rng.standard_normal((n, d)) + rng.integers(0, 3)).astype(np.float32)


def funnels(target: int) -> list[list[tuple[int, int]]]:
    return [[]] + ([[(4, 20)]] if target > 4 else [])


def check_result(result: et.SearchResult, metric: Metric, where: Filter | None, k: int) -> None:
    """What holds for any one table version: valid distinct rows, sorted finite scores, the filter
    obeyed (a row's label is the prefix of its id, and the writer never changes labels)."""
    assert result.indices.shape[1] <= k
    assert ((result.indices >= 0) & (result.indices < len(result.row_ids))).all()
    assert np.isfinite(result.scores).all()
    for row, scores in zip(result.indices, result.scores):
        assert len(set(row.tolist())) == row.size
        steps = np.diff(scores.astype(np.float64))
        assert (steps >= -1e-4).all() if metric == "l2" else (steps <= 1e-4).all()
    if isinstance(where, Label):
        label = "a" if where == Label("a") else "b"
        found = [id_ for ids in result.ids for id_ in ids]
        assert all(id_.startswith(f"{label}-") for id_ in found), (where, found)


class Soak:
    """The shared store, the deadline, and what the threads report."""

    def __init__(self, seconds: float) -> None:
        self.store = make_store()
        self.deadline = time.monotonic() + seconds
        self.errors: list[tuple[str, BaseException]] = []
        self.counts: dict[str, int] = {}
        self.rotated: dict[int, int] = {}  # the writer's own record: table -> rotation components
        self.guard = threading.Lock()

    def running(self) -> bool:
        return time.monotonic() < self.deadline and not self.errors

    def thread(self, name: str, body: Callable[[np.random.Generator], int], seed: int) -> threading.Thread:
        def run() -> None:
            try:
                done = body(np.random.default_rng(seed))
            except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
                with self.guard:
                    self.errors.append((name, exc))
                return
            with self.guard:
                self.counts[name] = done

        return threading.Thread(target=run, name=name, daemon=True)

    def read(self, rng: np.random.Generator) -> int:
        searches = 0
        while self.running():
            width = int(rng.choice(DIMS))
            dimension = None if rng.random() < 0.3 else int(rng.choice(PREFIXES))
            target = width if dimension is None else dimension
            metric = METRICS[int(rng.integers(len(METRICS)))]
            where = FILTERS[int(rng.integers(len(FILTERS)))]
            options = funnels(target)
            funnel = options[int(rng.integers(len(options)))]
            k = int(rng.integers(1, 8))
            try:
                result = self.store.search(
                    rows(rng, 3, width), k=k, dimension=dimension, metric=metric, funnel=funnel, where=where
                )
            except DimensionError:  # the writer had dropped every table this search could read
                continue
            check_result(result, metric, where, k)
            searches += 1
        return searches

    def write(self, rng: np.random.Generator) -> int:
        store, serial, changes = self.store, 0, 0
        while self.running():
            d = int(rng.choice(DIMS))
            ids: Sequence[str] = store.table(d).ids if d in store.dimensions else ()
            op = rng.random()
            if not ids or op < 0.25 or (op < 0.35 and len(ids) < MAX_ROWS):
                n = int(rng.integers(1, 40))
                labels = [str(rng.choice(["a", "b"])) for _ in range(n)]
                metadata = [{"n": int(rng.integers(0, 100))} for _ in range(n)]
                if rng.random() < 0.3:  # generated ids: position strings, never colliding
                    store.add(rows(rng, n, d), labels=[""] * n, metadata=metadata)
                else:
                    store.add(rows(rng, n, d), ids=[f"{label}-{serial + i}" for i, label in enumerate(labels)], labels=labels, metadata=metadata)
                    serial += n
            elif op < 0.5 or len(ids) > MAX_ROWS:
                gone = rng.choice(len(ids), size=int(rng.integers(1, max(2, len(ids) // 3))), replace=False)
                store.remove([ids[i] for i in gone], dimension=d)
            elif op < 0.7:
                some = [ids[i] for i in rng.choice(len(ids), size=int(rng.integers(1, min(len(ids), 20) + 1)), replace=False)]
                store.update(some, rows(rng, len(some), d), metadata=[{"n": int(rng.integers(0, 100))} for _ in some])
            elif op < 0.8:
                store.remove(list(ids), dimension=d)  # every row: the table goes
            elif op < 0.9:
                store.drop(d)
            else:
                store.fit_rotation(d, ROTATION_COMPONENTS)
                self.rotated[d] = ROTATION_COMPONENTS
            if d not in store.dimensions:
                self.rotated.pop(d, None)
            changes += 1
        return changes


def touch_every_cache(store: EmbeddingStore) -> None:
    """Every search shape the readers use, on every table: each cache they could have kept."""
    for d in store.dimensions:
        queries = np.ones((1, d), dtype=np.float32)
        for dimension in [None, *(p for p in PREFIXES if p < d)]:
            for metric in METRICS:
                for funnel in funnels(d if dimension is None else dimension):
                    store.search(queries, k=3, dimension=dimension, metric=metric, funnel=funnel)


def copy_of(store: EmbeddingStore, rotated: dict[int, int]) -> EmbeddingStore:
    fresh = make_store()
    for d in store.dimensions:
        table = store.table(d)
        fresh.add(table.to_numpy(), ids=list(table.ids), labels=table.labels, metadata=list(table.metadata))
        if d in rotated:
            fresh.fit_rotation(d, rotated[d])
    return fresh


def check_charged_as_fresh_plus_caches(store: EmbeddingStore, fresh: EmbeddingStore) -> None:
    """Each table is charged exactly what a fresh copy of its rows is charged for the table itself,
    plus the caches it lists (each at its size), and nothing else: no charge of a replaced version.

    Which caches a table holds depends on history (a prefix search while a narrower table was
    dropped caches prefix norms on the wider one), so a fresh copy's caches are not the reference;
    its table bill and the caches' sizes are."""
    charged(store)
    held, base = store.memory_info().tables, fresh.memory_info().tables
    assert held.keys() == base.keys()
    for d, table in held.items():
        bare = base[d].nbytes - sum(base[d].caches.values())
        assert table.nbytes == bare + sum(table.caches.values()), (d, table, base[d])
        for name, nbytes in table.caches.items():
            kind, width = name.split("/")
            assert int(width) < d
            assert nbytes == table.rows * 4 * (int(width) if kind.endswith("unit_prefix") else 1), (name, nbytes)
        assert set(base[d].caches) <= set(table.caches), "a search shape cached on the copy is not cached on the store"


def charged(store: EmbeddingStore) -> tuple[int, dict[int, tuple[int, int]]]:
    info = store.memory_info()
    assert info.used_bytes == info.store_bytes == sum(t.nbytes for t in info.tables.values())
    return info.used_bytes, {d: (t.rows, t.nbytes) for d, t in info.tables.items()}


def soak(seconds: float) -> dict[str, Any]:
    """Run the threads for ``seconds``, audit the budget, and return what ran."""
    run = Soak(seconds)
    run.store.add(rows(np.random.default_rng(0), 50, 16), ids=[f"a-start-{i}" for i in range(50)], labels=["a"] * 50, metadata=[{"n": i} for i in range(50)])
    threads = [run.thread(f"reader-{i}", run.read, seed=i + 1) for i in range(READERS)]
    threads.append(run.thread("writer", run.write, seed=99))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 60)
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"threads still running after the deadline: {stuck}"
    if run.errors:
        name, exc = run.errors[0]
        raise AssertionError(f"{name} raised {type(exc).__name__}: {exc}") from exc
    assert set(run.counts) == {t.name for t in threads} and all(run.counts.values()), run.counts

    store, fresh = run.store, copy_of(run.store, run.rotated)
    touch_every_cache(store)
    check_charged_as_fresh_plus_caches(store, fresh)
    touch_every_cache(fresh)
    check_charged_as_fresh_plus_caches(store, fresh)
    store.clear()
    report = store.accountant.report()
    assert report.used_bytes == 0 and report.by_owner == {}
    return {"threads": len(threads), "seconds": seconds, **run.counts}


def test_readers_and_a_writer_leave_the_budget_equal_to_a_fresh_accounting() -> None:
    print(soak(SOAK_SECONDS))
