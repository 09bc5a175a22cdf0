"""Memory-mapped tables: searched from the file, charged only for what is resident, read-only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import embedtools as et
from embedtools import ByteBudget, EmbeddingStore, InvalidArgumentError, ReadOnlyStoreError, Sha256Hasher, StoreFormatError
from tests.helpers import assert_exact_topk, clustered


def make_store(backend: str = "numpy", limit_bytes: int = 1 << 30) -> EmbeddingStore:
    return EmbeddingStore(et.make_backend(backend, "cpu"), ByteBudget(limit_bytes), Sha256Hasher(), search_block_bytes=50_000)


def saved(tmp_path: Path) -> tuple[Path, np.ndarray]:
    store = make_store()
    corpus = clustered(2000, 32, seed=4)
    store.add(corpus, ids=[f"r{i}" for i in range(2000)], labels=["a", "b"] * 1000)
    store.quantize(32, "int8")
    path = tmp_path / "s"
    store.save(path)
    return path, corpus


def test_a_mapped_store_searches_exactly_and_charges_no_vectors(tmp_path: Path) -> None:
    path, corpus = saved(tmp_path)
    limit = 2000 * 4 + 2000 * 32 + 2 * 32 * 4 + 1000  # norms + the int8 index, far less than the table
    store = make_store(limit_bytes=limit).load(path, mmap=True)
    assert store.mapped_from == path
    vectors = store.table(32).vectors
    assert isinstance(vectors, np.memmap) or isinstance(getattr(vectors, "base", None), np.memmap)
    info = store.memory_info()
    assert info.tables[32].mapped and info.used_bytes == 2000 * 4 + 2000 * 32 + 2 * 32 * 4
    queries = clustered(6, 32, seed=5)
    for metric in ("cosine", "dot", "l2"):
        result = store.search(queries, k=7, metric=metric)
        assert_exact_topk(queries, corpus, metric, 7, result.indices, result.scores)
    assert store.search(queries, k=5, where=et.Label("a")).indices.shape == (6, 5)
    assert store.search(queries, k=5, quantized="int8").indices.shape == (6, 5)
    np.testing.assert_array_equal(store.table(32).to_numpy(), corpus)


@pytest.mark.parametrize(
    ("call", "args"),
    [
        ("add", (np.ones((1, 32), np.float32),)),
        ("remove", (["r1"],)),
        ("update", (["r1"], np.ones((1, 32), np.float32))),
        ("quantize", (32, "binary")),
        ("drop_quantized", (32, "int8")),
        ("fit_rotation", (32,)),
    ],
)
def test_a_mapped_store_is_read_only_until_materialized(tmp_path: Path, call: str, args: tuple[Any, ...]) -> None:
    path, _ = saved(tmp_path)
    store = make_store().load(path, mmap=True)
    with pytest.raises(ReadOnlyStoreError, match="materialize"):
        getattr(store, call)(*args)
    store.materialize()
    assert store.mapped_from is None and not isinstance(store.table(32).vectors, np.memmap)
    assert store.memory_info().used_bytes == 2000 * 33 * 4 + 2000 * 32 + 2 * 32 * 4
    getattr(store, call)(*args)


def test_saving_a_mapped_store_over_its_own_file(tmp_path: Path) -> None:
    path, corpus = saved(tmp_path)
    store = make_store().load(path, mmap=True)
    store.config = {"resaved": True}
    store.save(path)  # the mapping keeps the old file's data; the new one replaces it atomically
    again = make_store().load(path)
    np.testing.assert_array_equal(again.table(32).to_numpy(), corpus)
    assert again.config == {"resaved": True}


def test_mmap_refusals(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    with pytest.raises(InvalidArgumentError, match="numpy backend"):
        make_store("torch").load(path, mmap=True)
    with pytest.raises(InvalidArgumentError, match="seed folder"):
        make_store().load(Path(__file__).parent / "fixtures" / "seed_store_0_1_2", mmap=True)
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[:8], "little")
    start, _ = json.loads(bytes(data[8 : 8 + size]))["32d/vectors"]["data_offsets"]
    data[8 + size + start + 1000] ^= 0x01  # inside the mapped vectors: the streamed checksum catches it
    path.write_bytes(bytes(data))
    store = make_store()
    with pytest.raises(StoreFormatError):
        store.load(path, mmap=True)
    assert store.dimensions == () and store.mapped_from is None
