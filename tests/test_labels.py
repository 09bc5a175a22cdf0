"""Integer labels (issue 14, finding 8): str or int per table, typed through filters and files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open

import embedtools as et
from embedtools import EmbeddingStore, InvalidArgumentError, Label, StoreFormatError
from tests.helpers import clustered
from tests.test_store import make_store, snapshot


def label_types(store: EmbeddingStore, d: int) -> set[type]:
    return {type(label) for label in store.table(d).labels}


def found(store: EmbeddingStore, d: int, where: et.Filter) -> list[int]:
    result = store.search(clustered(1, d, seed=9), k=len(store.table(d)), where=where)
    return sorted(result.indices[0].tolist())


def test_int_labels_are_kept_as_ints_and_filtered_by_kind() -> None:
    store = make_store()
    store.add(clustered(6, 4), labels=[0, 1, 2, 0, 1, 2])
    store.add(clustered(2, 4, seed=1), labels=np.array([2, 7], dtype=np.int32))  # numpy ints count as int
    assert store.table(4).labels == (0, 1, 2, 0, 1, 2, 2, 7) and label_types(store, 4) == {int}
    assert found(store, 4, Label(1)) == [1, 4]
    assert found(store, 4, Label(np.int64(2), 7)) == [2, 5, 6, 7]
    assert found(store, 4, Label("1")) == []  # the str "1" is not the int 1
    assert found(store, 4, ~Label(0)) == [1, 2, 4, 5, 6, 7]
    assert found(store, 4, Label(-5, 2**63 - 1)) == []


def test_str_labels_never_match_int_filters() -> None:
    store = make_store()
    store.add(clustered(3, 4), labels=["1", "2", "1"])
    assert label_types(store, 4) == {str}
    assert found(store, 4, Label(1)) == [] and found(store, 4, Label("1")) == [0, 2]


def test_one_label_kind_per_table_each_table_its_own() -> None:
    store = make_store()
    store.add(clustered(3, 4), labels=[1, 2, 3])
    store.add(clustered(3, 8), labels=["a", "b", "c"])
    assert label_types(store, 4) == {int} and label_types(store, 8) == {str}
    store.add(clustered(2, 4, seed=3), labels=["x", "y"], replace=True)  # a new table picks its kind again
    assert store.table(4).labels == ("x", "y")


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([1.0, 2.0, 3.0], "str or int"),
        (np.array([1.0, 2.0, 3.0]), "str or int"),
        ([np.float32(1), 2, 3], "str or int"),
        ([True, False, True], "str or int"),
        (np.array([True, False, True]), "str or int"),
        ([1, "a", 2], "mix int"),
        (["a", 1, 2], "mix str"),
        ([None, 1, 2], "str or int"),
        ([2**63, 0, 0], "int64"),
        ([-(2**63) - 1, 0, 0], "int64"),
        ([[1], [2], [3]], "str or int"),
        ([1, 2], "2 entries for 3 rows"),
        ("abc", "sequence"),
    ],
)
def test_bad_labels_are_refused_and_change_nothing(labels: Any, message: str) -> None:
    store = make_store()
    store.add(clustered(3, 4), labels=[1, 2, 3])
    before = snapshot(store)
    for call in (
        lambda: store.add(clustered(3, 8), labels=labels),
        lambda: store.add(clustered(3, 4, seed=1), labels=labels),
        lambda: store.update(["0", "1", "2"], labels=labels, dimension=4),
    ):
        with pytest.raises(InvalidArgumentError, match=message):
            call()
        assert snapshot(store) == before and label_types(store, 4) == {int} and store.dimensions == (4,)


def test_the_other_kind_is_refused_once_a_table_has_one() -> None:
    store = make_store()
    store.add(clustered(3, 4), labels=[1, 2, 3])
    store.add(clustered(3, 8), labels=["a", "b", "c"])
    store.add(clustered(2, 16))  # no labels: "" (str)
    before = snapshot(store)
    with pytest.raises(InvalidArgumentError, match="labels are int"):
        store.add(clustered(1, 4, seed=1), labels=["4"])
    with pytest.raises(InvalidArgumentError, match="labels are str"):
        store.add(clustered(1, 8, seed=1), labels=[4])
    with pytest.raises(InvalidArgumentError, match="labels are str"):
        store.add(clustered(1, 16, seed=1), labels=[4])
    with pytest.raises(InvalidArgumentError, match="labels are int"):
        store.update(["0"], labels=["4"], dimension=4)
    with pytest.raises(InvalidArgumentError, match="labels are str"):
        store.update(["0"], labels=[4], dimension=8)
    with pytest.raises(InvalidArgumentError, match="no default"):
        store.add(clustered(1, 4, seed=1))  # an int table has no default label to give the row
    assert snapshot(store) == before


def test_update_and_remove_keep_int_labels() -> None:
    store = make_store()
    store.add(clustered(5, 4), ids=list("abcde"), labels=[10, 11, 12, 13, 14])
    new: list[int | np.integer[Any]] = [np.int8(-1), 99]
    store.update(["b", "d"], labels=new, dimension=4)
    assert store.table(4).labels == (10, -1, 12, 99, 14) and label_types(store, 4) == {int}
    store.remove(["a", "c"])
    assert store.table(4).labels == (-1, 99, 14) and found(store, 4, Label(99)) == [1]


@pytest.mark.parametrize("mmap", [False, True])
def test_int_labels_round_trip_through_save_and_load(tmp_path: Path, mmap: bool) -> None:
    store = make_store()
    labels = [0, -1, 2**63 - 1, -(2**63), 7, 0]
    store.add(clustered(6, 4), labels=labels, metadata=[{"i": i} for i in range(6)])
    store.add(clustered(3, 8), labels=["3", "", "x"])
    store.quantize(4, "int8")
    path = tmp_path / "store.et"
    store.save(path)
    loaded = make_store().load(path, mmap=mmap)
    assert loaded.table(4).labels == tuple(labels) and label_types(loaded, 4) == {int}
    assert loaded.table(8).labels == ("3", "", "x") and label_types(loaded, 8) == {str}
    assert found(loaded, 4, Label(0)) == [0, 5] and found(loaded, 8, Label("3")) == [0]
    assert found(loaded, 8, Label(3)) == []
    if not mmap:
        loaded.save(tmp_path / "again.et")
        assert make_store().load(tmp_path / "again.et").table(4).labels == tuple(labels)


def header(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="np") as handle:
        meta = handle.metadata()
    assert meta is not None
    return dict(json.loads(meta["embedtools"]))


def test_file_marks_int_labels_and_writes_str_labels_as_before(tmp_path: Path) -> None:
    store = make_store()
    store.add(clustered(2, 4), labels=[5, -6])
    store.add(clustered(2, 8), labels=["5", "-6"])
    store.save(tmp_path / "s.et")
    tables = {t["dimension"]: t for t in header(tmp_path / "s.et")["tables"]}
    assert tables[4]["label_type"] == "int64" and "label_type" not in tables[8]
    with safe_open(str(tmp_path / "s.et"), framework="np") as handle:
        # both tables keep their labels as UTF-8 text: the int table as canonical decimals
        assert handle.get_tensor("4d/labels.utf8").tobytes() == handle.get_tensor("8d/labels.utf8").tobytes() == b"5-6"


def resign(path: Path, edit: Any) -> None:
    """Rewrite a file with edited string tensors and header, re-signed so only the edit is wrong."""
    import hashlib

    from safetensors.numpy import save_file

    with safe_open(str(path), framework="np") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        meta = handle.metadata()
    assert meta is not None
    head = json.loads(meta["embedtools"])
    edit(tensors, head)
    head["tensors"] = {name: hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data).hexdigest() for name, a in sorted(tensors.items())}
    text = json.dumps(head, separators=(",", ":"))
    save_file(tensors, str(path), metadata={"embedtools": text, "embedtools.sha256": hashlib.sha256(text.encode()).hexdigest()})


def set_labels(texts: list[str], label_type: object) -> Any:
    def edit(tensors: dict[str, np.ndarray], head: dict[str, Any]) -> None:
        encoded = [t.encode() for t in texts]
        tensors["4d/labels.utf8"] = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        tensors["4d/labels.offsets"] = np.concatenate([[0], np.cumsum([len(b) for b in encoded])]).astype(np.int64)
        head["tables"][0]["label_type"] = label_type

    return edit


@pytest.mark.parametrize(
    ("texts", "label_type"),
    [
        (["1", "+2"], "int64"),
        (["1", " 2"], "int64"),
        (["1", "02"], "int64"),
        (["1", "-0"], "int64"),
        (["1", "2.0"], "int64"),
        (["1", ""], "int64"),
        (["1", "\u0663"], "int64"),  # an Arabic-Indic digit, which int() would accept
        (["1", str(2**63)], "int64"),
        (["1", "9" * 5000], "int64"),
        (["1", "2"], "int32"),
        (["1", "2"], ["int64"]),
    ],
)
def test_bad_int_labels_in_a_file_are_refused(tmp_path: Path, texts: list[str], label_type: object) -> None:
    store = make_store()
    store.add(clustered(2, 4), labels=[1, 2])
    path = tmp_path / "s.et"
    store.save(path)
    resign(path, set_labels(texts, label_type))
    target = make_store()
    with pytest.raises(StoreFormatError):
        target.load(path)
    assert target.dimensions == () and target.memory_info().used_bytes == 0


def test_a_file_without_label_type_reads_decimal_labels_as_str(tmp_path: Path) -> None:
    """Files written before int labels have no ``label_type``: their labels stay str, digits or not."""
    store = make_store()
    store.add(clustered(2, 4), labels=[1, 2])
    path = tmp_path / "s.et"
    store.save(path)
    resign(path, lambda tensors, head: head["tables"][0].pop("label_type"))
    loaded = make_store().load(path)
    assert loaded.table(4).labels == ("1", "2") and label_types(loaded, 4) == {str}


def test_seed_folders_keep_str_labels(tmp_path: Path) -> None:
    folder = tmp_path / "seed"
    folder.mkdir()
    np.save(folder / "embeddings_4d.npy", clustered(3, 4))
    (folder / "metadata.json").write_text(json.dumps({"dimensions": [4]}))
    (folder / "labels.txt").write_text("1\n2\n3")
    store = make_store().load(folder)
    assert store.table(4).labels == ("1", "2", "3") and label_types(store, 4) == {str}


def test_int_labels_are_charged_as_str_labels_are_not_at_all() -> None:
    """Labels are uncharged host data, whatever their kind: the budget sees only vectors and indexes."""
    with_ints, with_strs = make_store(), make_store()
    with_ints.add(clustered(20, 8), labels=list(range(20)))
    with_strs.add(clustered(20, 8), labels=[f"label-{i}" for i in range(20)])
    assert with_ints.memory_info().used_bytes == with_strs.memory_info().used_bytes == 20 * (8 + 1) * 4
