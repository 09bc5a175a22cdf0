"""Row updates: remove and update by id, on every backend; memory returned; exact search after."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import embedtools as et
from embedtools import (
    ByteBudget,
    DimensionError,
    DuplicateIdError,
    EmbeddingStore,
    InvalidArgumentError,
    InvalidEmbeddingError,
    Sha256Hasher,
    UnknownIdError,
)
from tests.conformance.backends import IDS, PAIRS
from tests.helpers import assert_exact_topk, clustered
from tests.test_store import snapshot


def make_store(pair: tuple[str, str] = ("numpy", "cpu")) -> EmbeddingStore:
    return EmbeddingStore(et.make_backend(*pair), ByteBudget(1 << 30), Sha256Hasher())


def filled(pair: tuple[str, str] = ("numpy", "cpu")) -> tuple[EmbeddingStore, np.ndarray]:
    store = make_store(pair)
    full = clustered(50, 16, seed=1)
    ids = [f"r{i}" for i in range(50)]
    store.add(full, ids=ids, labels=[f"l{i % 3}" for i in range(50)], metadata=[{"i": i} for i in range(50)])
    store.add(full[:, :8], ids=ids)
    return store, full


@pytest.mark.parametrize("pair", PAIRS, ids=IDS)
def test_remove_from_every_table_and_search_stays_exact(pair: tuple[str, str]) -> None:
    store, full = filled(pair)
    before = store.memory_info().used_bytes
    assert store.remove(["r3", "r7", "r3"]) == 4  # two ids, two tables; a repeated id counts once
    keep = [i for i in range(50) if i not in (3, 7)]
    assert store.table(16).ids == tuple(f"r{i}" for i in keep) == store.table(8).ids
    assert store.table(16).metadata[3] == {"i": 4} and store.table(16).labels[3] == "l1"
    assert store.memory_info().used_bytes == before - 2 * (17 + 9) * 4
    queries = clustered(6, 16, seed=2)
    result = store.search(queries, k=5)
    assert not {"r3", "r7"} & {i for row in result.ids for i in row}
    assert_exact_topk(queries, full[keep], "cosine", 5, result.indices, result.scores)


def test_remove_from_one_table_and_all_rows() -> None:
    store, _ = filled()
    assert store.remove(["r0"], dimension=8) == 1
    assert "r0" in store.table(16).ids and "r0" not in store.table(8).ids
    assert store.remove([f"r{i}" for i in range(50)], dimension=16) == 50
    assert store.dimensions == (8,)


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ((["nope"],), {}, UnknownIdError),
        ((["r1", "nope"],), {"dimension": 16}, UnknownIdError),
        (("r1",), {}, InvalidArgumentError),
        (([1],), {}, InvalidArgumentError),
        ((["r1"],), {"dimension": 32}, DimensionError),
    ],
)
def test_bad_remove_changes_nothing(args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception]) -> None:
    store, _ = filled()
    before = snapshot(store)
    with pytest.raises(error):
        store.remove(*args, **kwargs)
    assert snapshot(store) == before


@pytest.mark.parametrize("pair", PAIRS, ids=IDS)
def test_update_replaces_by_id(pair: tuple[str, str]) -> None:
    store, full = filled(pair)
    new = clustered(2, 16, seed=9)
    store.update(["r5", "r0"], new, labels=["x", "y"], metadata=[{"new": True}, {}])
    table = store.table(16)
    np.testing.assert_array_equal(table.to_numpy()[[5, 0]], new)
    assert (table.labels[5], table.labels[0], table.metadata[5]) == ("x", "y", {"new": True})
    assert table.ids == tuple(f"r{i}" for i in range(50))
    store.update(["r9"], labels=["only-label"], dimension=8)
    assert store.table(8).labels[9] == "only-label"
    np.testing.assert_array_equal(store.table(8).to_numpy(), full[:, :8])
    expected = full.copy()
    expected[[5, 0]] = new
    assert_exact_topk(new, expected, "l2", 3, store.search(new, k=3, metric="l2").indices, store.search(new, k=3, metric="l2").scores)


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ((["nope"], np.ones((1, 16), np.float32)), {}, UnknownIdError),
        ((["r1", "r1"], np.ones((2, 16), np.float32)), {}, DuplicateIdError),
        ((["r1"], np.ones((2, 16), np.float32)), {}, DimensionError),
        ((["r1"], np.ones((1, 12), np.float32)), {}, DimensionError),
        ((["r1"], np.ones((1, 8), np.float32)), {"dimension": 16}, DimensionError),
        ((["r1"], np.array([[np.nan] * 16])), {}, InvalidEmbeddingError),
        ((["r1"],), {}, InvalidArgumentError),
        ((["r1"],), {"labels": ["a", "b"], "dimension": 16}, InvalidArgumentError),
        ((["r1"],), {"metadata": [{"a": object()}], "dimension": 16}, InvalidArgumentError),
    ],
)
def test_bad_update_changes_nothing(args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception]) -> None:
    store, _ = filled()
    before = snapshot(store)
    with pytest.raises(error):
        store.update(*args, **kwargs)
    assert snapshot(store) == before


def test_updates_keep_quantized_rotation_and_round_trip(tmp_path: Path) -> None:
    store, _ = filled()
    store.quantize(16, "int8")
    store.fit_rotation(16, components=4)
    store.remove(["r1", "r2"])
    store.update(["r10"], clustered(1, 16, seed=5))
    state = store.table(16)
    assert state.quantized["int8"].codes.shape == (48, 16) and state.rotation is not None
    assert store.backend.shape(state.rotation.prefix) == (48, 4)
    store.save(tmp_path / "s")
    loaded = make_store().load(tmp_path / "s")
    for d in (8, 16):
        np.testing.assert_array_equal(loaded.table(d).to_numpy(), store.table(d).to_numpy())
        assert loaded.table(d).ids == store.table(d).ids and loaded.table(d).metadata == store.table(d).metadata
    q = clustered(3, 16, seed=4)
    assert loaded.search(q, k=4, quantized="int8").ids == store.search(q, k=4, quantized="int8").ids


@pytest.mark.parametrize("pair", PAIRS, ids=IDS)
def test_add_and_search_take_torch_and_mlx_arrays(pair: tuple[str, str]) -> None:
    torch = pytest.importorskip("torch")
    mx = pytest.importorskip("mlx.core")
    store = make_store(pair)
    host = clustered(20, 8)
    store.add(torch.from_numpy(host).requires_grad_(True))
    store.add(mx.array(host[:, :4]))
    store.add(torch.from_numpy(host[:, :2]).to(torch.bfloat16))
    np.testing.assert_array_equal(store.table(8).to_numpy(), host)
    np.testing.assert_array_equal(store.table(4).to_numpy(), host[:, :4])
    assert store.search(torch.from_numpy(host[3]), k=1).indices.tolist() == [[3]]
    assert store.search(mx.array(host[:2, :4]), k=1).indices.tolist() == [[0], [1]]
    # sentence-transformers' encode without convert_to_*: a list of 1-D tensors (or arrays)
    store.add([torch.from_numpy(row) for row in clustered(3, 8, seed=7)])
    np.testing.assert_array_equal(store.table(8).to_numpy()[-3:], clustered(3, 8, seed=7))
    assert store.search([mx.array(host[5, :4])], k=1).indices.tolist() == [[5]]
