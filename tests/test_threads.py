"""One store shared by threads: changes are serialised (nothing lost, nothing charged twice) and
searches run beside them."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

import embedtools as et
from embedtools import ByteBudget, EmbeddingStore, Sha256Hasher
from tests.helpers import clustered


def make_store() -> EmbeddingStore:
    return EmbeddingStore(et.make_backend("numpy"), ByteBudget(1 << 30), Sha256Hasher())


def test_concurrent_adds_lose_no_rows_and_charge_each_once() -> None:
    store = make_store()

    def add(worker: int) -> None:
        for step in range(5):
            store.add(clustered(20, 16, seed=worker * 10 + step), ids=[f"w{worker}-{step}-{i}" for i in range(20)])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(add, range(8)))
    assert len(store) == 8 * 5 * 20
    assert set(store.table(16).ids) == {f"w{w}-{s}-{i}" for w in range(8) for s in range(5) for i in range(20)}
    assert store.memory_info().used_bytes == 800 * 17 * 4


def test_concurrent_prefix_searches_cache_and_charge_the_norms_once() -> None:
    store = make_store()
    corpus = clustered(3000, 32)
    store.add(corpus)
    before = store.memory_info().used_bytes
    queries = clustered(4, 32, seed=1)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: store.search(queries, k=5, dimension=8), range(16)))
    assert store.memory_info().used_bytes == before + 3000 * 4  # one cached set of 8-d norms
    for result in results[1:]:
        np.testing.assert_array_equal(result.indices, results[0].indices)


def test_searches_beside_adds_see_each_table_whole() -> None:
    store = make_store()
    store.add(clustered(500, 16), ids=[f"a{i}" for i in range(500)])
    queries = clustered(3, 16, seed=2)

    def search(_: int) -> list[list[str]]:
        return store.search(queries, k=5).ids

    def add(step: int) -> None:
        store.add(clustered(50, 16, seed=100 + step), ids=[f"b{step}-{i}" for i in range(50)])

    with ThreadPoolExecutor(4) as pool:
        searches = [pool.submit(search, i) for i in range(20)]
        adds = [pool.submit(add, i) for i in range(10)]
        found = [f.result() for f in searches]
        for f in adds:
            f.result()
    known = set(store.table(16).ids)
    assert len(known) == 1000
    assert all(id_ in known for ids in found for row in ids for id_ in row)
