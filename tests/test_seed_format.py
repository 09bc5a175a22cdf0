"""Stores written by embedding-tools 0.1.2 ``save_to_disk`` load, faithfully and safely."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import embedtools as et
from embedtools import ByteBudget, EmbeddingStore, MemoryLimitError, Sha256Hasher, StoreFormatError

FIXTURES = Path(__file__).parent / "fixtures"
SEED = FIXTURES / "seed_store_0_1_2"


def make_store(limit_bytes: int = 1 << 30) -> EmbeddingStore:
    return EmbeddingStore(et.make_backend("numpy"), ByteBudget(limit_bytes), Sha256Hasher())


def load(path: Path, limit_bytes: int = 1 << 30) -> EmbeddingStore:
    with pytest.warns(UserWarning, match="sliced_from"):
        return make_store(limit_bytes).load(path)


def test_the_committed_seed_store_loads() -> None:
    store = load(SEED)
    expected = np.load(FIXTURES / "seed_store_0_1_2_expected_8d.npy")
    assert store.dimensions == (4, 8)
    np.testing.assert_array_equal(store.table(8).to_numpy(), expected)
    np.testing.assert_array_equal(store.table(4).to_numpy(), expected[:, :4])
    assert store.table(8).ids == tuple(f"doc-{i}" for i in range(6)) == store.table(4).ids
    assert store.table(8).labels == ("even", "odd") * 3
    assert store.memory_info().store_bytes == 6 * 9 * 4 + 6 * 5 * 4


def test_search_agrees_with_what_the_seed_returned() -> None:
    store = load(SEED)
    query = np.load(FIXTURES / "seed_store_0_1_2_query.npy")
    seed_top3 = np.load(FIXTURES / "seed_store_0_1_2_top3.npy")
    np.testing.assert_array_equal(store.search(query, k=3).indices[0], seed_top3)


def test_a_seed_store_converts_to_an_embedtools_file(tmp_path: Path) -> None:
    store = load(SEED)
    store.save(tmp_path / "converted.safetensors")
    again = make_store().load(tmp_path / "converted.safetensors")
    np.testing.assert_array_equal(again.table(8).to_numpy(), store.table(8).to_numpy())
    assert again.table(4).labels == store.table(4).labels


def copy_seed(tmp_path: Path) -> Path:
    target = tmp_path / "seed"
    shutil.copytree(SEED, target)
    return target


def test_lines_are_read_without_stripping(tmp_path: Path) -> None:
    folder = copy_seed(tmp_path)
    (folder / "text_ids.txt").write_text("\n".join([" a", "b ", "", "d", "e\t", "f"]), encoding="utf-8")
    store = load(folder)
    assert store.table(8).ids == (" a", "b ", "", "d", "e\t", "f")


def test_missing_ids_and_labels_files_give_defaults(tmp_path: Path) -> None:
    folder = copy_seed(tmp_path)
    (folder / "text_ids.txt").unlink()
    (folder / "labels.txt").unlink()
    store = load(folder)
    assert store.table(8).ids == tuple(str(i) for i in range(6)) and store.table(8).labels == ("",) * 6


def break_ids(folder: Path) -> None:
    (folder / "text_ids.txt").write_text("only\ntwo", encoding="utf-8")


def duplicate_ids(folder: Path) -> None:
    (folder / "text_ids.txt").write_text("\n".join(["x"] * 6), encoding="utf-8")


def wrong_shape(folder: Path) -> None:
    np.save(folder / "embeddings_4d.npy", np.ones((6, 5), np.float32))


def nan_rows(folder: Path) -> None:
    data = np.load(folder / "embeddings_8d.npy")
    data[2, 2] = np.nan
    np.save(folder / "embeddings_8d.npy", data)


def truncated_npy(folder: Path) -> None:
    path = folder / "embeddings_8d.npy"
    path.write_bytes(path.read_bytes()[:-10])


def missing_npy(folder: Path) -> None:
    (folder / "embeddings_4d.npy").unlink()


def pickled_npy(folder: Path) -> None:
    np.save(folder / "embeddings_4d.npy", np.array([[object()] * 4] * 6, dtype=object), allow_pickle=True)


def truncated_json(folder: Path) -> None:
    path = folder / "metadata.json"
    path.write_text(path.read_text()[:40])


def bad_dimensions(folder: Path) -> None:
    (folder / "metadata.json").write_text(json.dumps({"dimensions": ["8"]}))


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (break_ids, StoreFormatError),
        (duplicate_ids, et.DuplicateIdError),
        (wrong_shape, StoreFormatError),
        (nan_rows, StoreFormatError),
        (truncated_npy, StoreFormatError),
        (missing_npy, StoreFormatError),
        (pickled_npy, StoreFormatError),
        (truncated_json, StoreFormatError),
        (bad_dimensions, StoreFormatError),
    ],
)
def test_damaged_seed_stores_are_refused_and_leave_the_store_empty(
    tmp_path: Path, damage: Callable[[Path], None], error: type[Exception]
) -> None:
    folder = copy_seed(tmp_path)
    damage(folder)
    store = make_store()
    with pytest.raises(error), warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*table-level metadata", UserWarning)
        store.load(folder)
    assert store.dimensions == () and store.memory_info().used_bytes == 0


def test_seed_load_enforces_the_budget(tmp_path: Path) -> None:
    store = make_store(limit_bytes=100)
    with pytest.raises(MemoryLimitError):
        store.load(SEED)
    assert store.dimensions == () and store.memory_info().used_bytes == 0
