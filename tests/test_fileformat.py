"""save/load: exact round trips, verified files, atomic replacement, and a store left empty on failure."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import embedtools as et
from embedtools import (
    ByteBudget,
    EmbeddingStore,
    InvalidArgumentError,
    MemoryLimitError,
    Sha256Hasher,
    StoreFormatError,
    StoreNotEmptyError,
    StoreNotFoundError,
    fileformat,
)
from tests.helpers import clustered

ROOT = Path(__file__).resolve().parents[1]


def make_store(limit_bytes: int = 1 << 30) -> EmbeddingStore:
    return EmbeddingStore(et.make_backend("numpy"), ByteBudget(limit_bytes), Sha256Hasher())


def filled_store() -> EmbeddingStore:
    store = make_store()
    full = clustered(12, 16, seed=1)
    store.add(
        full,
        ids=["a\nb", " c ", "", "d\r", "é", "x" * 300] + [f"id{i}" for i in range(6)],
        labels=["lab\n1", "", " ", "l"] * 3,
        metadata=[{"i": i, "nested": {"s": "ü", "l": [1, None, True]}} for i in range(12)],
    )
    store.add(full[:, :4])
    store.config = {"model": "m", "dim": 16}
    return store


def assert_same(a: EmbeddingStore, b: EmbeddingStore) -> None:
    assert a.dimensions == b.dimensions
    for d in a.dimensions:
        ta, tb = a.table(d), b.table(d)
        np.testing.assert_array_equal(ta.to_numpy(), tb.to_numpy())
        assert (ta.ids, ta.labels, ta.metadata) == (tb.ids, tb.labels, tb.metadata)
    assert a.config == b.config and a.config_hash == b.config_hash
    assert a.memory_info().store_bytes == b.memory_info().store_bytes


def test_round_trip_is_exact(tmp_path: Path) -> None:
    store = filled_store()
    path = tmp_path / "store.safetensors"
    store.save(path)
    loaded = make_store().load(path)
    assert_same(store, loaded)
    q = clustered(3, 16, seed=9)
    np.testing.assert_array_equal(store.search(q, k=5).indices, loaded.search(q, k=5).indices)


def test_load_returns_the_same_store(tmp_path: Path) -> None:
    filled_store().save(tmp_path / "s")
    target = make_store()
    assert target.load(tmp_path / "s") is target


def test_header_records_version_hash_and_checksums(tmp_path: Path) -> None:
    store = filled_store()
    store.save(tmp_path / "s")
    header = fileformat.read_header(tmp_path / "s")
    assert header["format"] == "embedtools" and header["version"] == 1
    assert header["config_hash"] == store.config_hash and header["config"] == {"model": "m", "dim": 16}
    assert header["tables"] == [{"dimension": 4, "rows": 12, "dtype": "float32"}, {"dimension": 16, "rows": 12, "dtype": "float32"}]
    assert len(header["tensors"]) == 2 * 7
    vectors = store.table(16).to_numpy()
    assert header["tensors"]["16d/vectors"] == hashlib.sha256(vectors.tobytes()).hexdigest()


def test_header_stays_small_with_many_rows(tmp_path: Path) -> None:
    store = make_store()
    n = 20_000
    store.add(clustered(n, 2), ids=[f"document-{i}" for i in range(n)], metadata=[{"i": i} for i in range(n)])
    store.save(tmp_path / "s")
    with (tmp_path / "s").open("rb") as handle:
        header_bytes = int.from_bytes(handle.read(8), "little")
    assert header_bytes < 4096


def test_file_mode_follows_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        filled_store().save(tmp_path / "s")
    finally:
        os.umask(old)
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o640
    filled_store().save(tmp_path / "t")
    assert (tmp_path / "t").stat().st_mode & 0o777 == 0o666 & ~old


def test_save_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "s"
    make_store().save(path)
    filled_store().save(path)
    assert_same(filled_store(), make_store().load(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_failed_save_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s"
    filled_store().save(path)
    before = path.read_bytes()

    def crash(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        make_store().save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_save_bad_targets(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError):
        filled_store().save(tmp_path)
    with pytest.raises(StoreNotFoundError):
        filled_store().save(tmp_path / "missing" / "s")
    assert list(tmp_path.iterdir()) == []


KILLER = """
import sys, numpy as np, embedtools as et
store = et.EmbeddingStore(et.make_backend("numpy"), et.ByteBudget(1 << 32), et.Sha256Hasher())
rows = int(sys.argv[2])
store.add(np.full((rows, 256), 0.5, np.float32))
print("ready", flush=True)
while True:
    store.save(sys.argv[1])
"""


def test_a_save_killed_mid_write_leaves_a_valid_file(tmp_path: Path) -> None:
    """SIGKILL a process that saves in a loop, at many moments: the file always loads whole."""
    path = tmp_path / "s"
    old = make_store()
    old.add(clustered(7, 256), ids=[f"old{i}" for i in range(7)])
    old.save(path)
    outcomes = set()
    interrupted = 0
    for attempt in range(8):
        with subprocess.Popen(
            [sys.executable, "-c", KILLER, str(path), "20000"], stdout=subprocess.PIPE, cwd=ROOT
        ) as proc:
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
            time.sleep(0.05 + 0.07 * attempt)
            proc.send_signal(signal.SIGKILL)
        loaded = make_store().load(path)
        outcomes.add(len(loaded))
        assert len(loaded) in (7, 20_000)
        for stale in tmp_path.glob(".s.*.tmp"):
            stale.unlink()  # what a killed writer leaves behind: its own temp file, never the target
            interrupted += 1
    assert 20_000 in outcomes
    assert interrupted > 0, "no kill landed inside a write; the test proved nothing"


def corrupt(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def small_file(tmp_path: Path) -> Path:
    store = make_store()
    store.add(clustered(3, 4), ids=["a", "b", "c"], labels=["x", "y", "z"], metadata=[{"k": 1}, {}, {}])
    store.quantize(4, "int8")
    store.quantize(4, "binary")
    store.fit_rotation(4, components=2)
    path = tmp_path / "small"
    store.save(path)
    return path


def test_every_flipped_bit_is_caught(tmp_path: Path) -> None:
    """A single flipped bit anywhere in the file (every byte, several bit positions) is refused."""
    path = small_file(tmp_path)
    original = path.read_bytes()
    for offset in range(len(original)):
        for mask in (0x01, 0x10, 0x80):
            data = bytearray(original)
            data[offset] ^= mask
            path.write_bytes(bytes(data))
            store = make_store()
            with pytest.raises(StoreFormatError):
                store.load(path)
            assert store.dimensions == () and store.memory_info().used_bytes == 0, offset


@pytest.mark.parametrize("keep", [0, 4, 7, 8, 50, -1, -17])
def test_truncated_files_are_refused(tmp_path: Path, keep: int) -> None:
    path = small_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(StoreFormatError):
        make_store().load(path)


def test_other_files_are_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00" * 3 + b"not a store" * 20)
    with pytest.raises(StoreFormatError):
        make_store().load(garbage)
    from safetensors.numpy import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": np.zeros(3, np.float32)}, str(plain))
    with pytest.raises(StoreFormatError, match="no embedtools header"):
        make_store().load(plain)


def rewrite_header(path: Path, change: Any) -> None:
    """Re-save the tensors with a changed header whose own digest is valid (a forged file)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(path), framework="np") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        header = json.loads(handle.metadata()["embedtools"])
    change(header, tensors)
    text = json.dumps(header)
    save_file(tensors, str(path), metadata={"embedtools": text, "embedtools.sha256": hashlib.sha256(text.encode()).hexdigest()})


def tensor_digest(array: Any) -> str:
    """The README's tensor digest, written here from the format's text: SHA-256 of the raw bytes."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _set(key: str, value: Any) -> Any:
    return lambda header, tensors: header.__setitem__(key, value)


def _drop_tensor(header: dict[str, Any], tensors: dict[str, Any]) -> None:
    del tensors["4d/labels.utf8"]


def _bad_offsets(header: dict[str, Any], tensors: dict[str, Any]) -> None:
    tensors["4d/ids.offsets"] = np.array([0, 1, 9, 2], np.int64)
    header["tensors"]["4d/ids.offsets"] = tensor_digest(tensors["4d/ids.offsets"])


def _nan_vector(header: dict[str, Any], tensors: dict[str, Any]) -> None:
    tensors["4d/vectors"] = tensors["4d/vectors"].copy()
    tensors["4d/vectors"][0, 0] = np.nan
    header["tensors"]["4d/vectors"] = tensor_digest(tensors["4d/vectors"])


def _duplicate_ids(header: dict[str, Any], tensors: dict[str, Any]) -> None:
    tensors["4d/ids.utf8"] = np.frombuffer(b"aab", np.uint8).copy()
    header["tensors"]["4d/ids.utf8"] = tensor_digest(tensors["4d/ids.utf8"])


def _bad_metadata_row(header: dict[str, Any], tensors: dict[str, Any]) -> None:
    tensors["4d/metadata.utf8"] = np.frombuffer(b"[1]{}{}", np.uint8).copy()
    tensors["4d/metadata.offsets"] = np.array([0, 3, 5, 7], np.int64)
    for name in ("4d/metadata.utf8", "4d/metadata.offsets"):
        header["tensors"][name] = tensor_digest(tensors[name])


def _bad_int8_scale(header: dict[str, Any], tensors: dict[str, Any]) -> None:
    tensors["4d/quantized.int8.scale"] = np.zeros(4, np.float32)
    header["tensors"]["4d/quantized.int8.scale"] = tensor_digest(tensors["4d/quantized.int8.scale"])


def _binary_padding_bits(header: dict[str, Any], tensors: dict[str, Any]) -> None:
    tensors["4d/quantized.binary.codes"] = tensors["4d/quantized.binary.codes"] | np.uint8(1)  # past the 4 bits of a row
    header["tensors"]["4d/quantized.binary.codes"] = tensor_digest(tensors["4d/quantized.binary.codes"])


def _not_a_rotation(header: dict[str, Any], tensors: dict[str, Any]) -> None:
    tensors["4d/rotation.matrix"] = np.full((4, 4), 0.5, np.float32)
    header["tensors"]["4d/rotation.matrix"] = tensor_digest(tensors["4d/rotation.matrix"])


def _unknown_quantization(header: dict[str, Any], tensors: dict[str, Any]) -> None:
    header["tables"][0]["quantized"] = ["int4"]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (_bad_int8_scale, StoreFormatError),
        (_binary_padding_bits, StoreFormatError),
        (_not_a_rotation, StoreFormatError),
        (_set("tables", [{"dimension": 4, "rows": 3, "rotation": 9}]), StoreFormatError),
        (_unknown_quantization, StoreFormatError),
        (_set("version", 2), StoreFormatError),
        (_set("format", "other"), StoreFormatError),
        (_set("tables", [{"dimension": 4, "rows": 5}]), StoreFormatError),
        (_set("tables", [{"dimension": 4, "rows": 3}, {"dimension": 4, "rows": 3}]), StoreFormatError),
        (_set("tables", "no"), StoreFormatError),
        (_set("config", []), StoreFormatError),
        (_drop_tensor, StoreFormatError),
        (_bad_offsets, StoreFormatError),
        (_nan_vector, et.InvalidEmbeddingError),
        (_duplicate_ids, et.DuplicateIdError),
        (_bad_metadata_row, StoreFormatError),
    ],
)
def test_forged_files_are_refused_and_the_store_stays_empty(tmp_path: Path, change: Any, error: type[Exception]) -> None:
    path = small_file(tmp_path)
    rewrite_header(path, change)
    store = make_store()
    with pytest.raises(error):
        store.load(path)
    assert store.dimensions == () and store.memory_info().used_bytes == 0


def test_load_enforces_the_budget_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    filled_store().save(tmp_path / "s")

    def must_not_read(path: Any) -> Any:
        raise AssertionError("tensors were read before the budget was checked")

    monkeypatch.setattr(fileformat, "read_store", must_not_read)
    store = make_store(limit_bytes=12 * 17 * 4)  # the 16-d table fits, the 4-d one does not
    with pytest.raises(MemoryLimitError):
        store.load(tmp_path / "s")
    assert store.dimensions == () and store.memory_info().used_bytes == 0


def test_load_refuses_a_non_empty_store_and_missing_paths(tmp_path: Path) -> None:
    filled_store().save(tmp_path / "s")
    store = filled_store()
    with pytest.raises(StoreNotEmptyError):
        store.load(tmp_path / "s")
    with pytest.raises(StoreNotFoundError):
        make_store().load(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        make_store().load(tmp_path / "missing")
    with pytest.raises(StoreNotFoundError):
        make_store().load(tmp_path)  # a folder that is not a seed store


def test_a_store_saved_empty_loads_empty(tmp_path: Path) -> None:
    make_store().save(tmp_path / "s")
    loaded = make_store().load(tmp_path / "s")
    assert loaded.dimensions == () and len(loaded) == 0
