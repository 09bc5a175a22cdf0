"""save: only regular files are replaced, OS failures are typed, temp files follow one pattern, bytes
are deterministic and tensors are streamed, not copied."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import embedtools as et
from embedtools import (
    ByteBudget,
    EmbeddingStore,
    EmbedtoolsError,
    InvalidArgumentError,
    Sha256Hasher,
    StoreFormatError,
    StoreNotFoundError,
    StoreWriteError,
    fileformat,
)
from tests.helpers import clustered

ROOT = Path(__file__).resolve().parents[1]


def make_store() -> EmbeddingStore:
    return EmbeddingStore(et.make_backend("numpy"), ByteBudget(1 << 30), Sha256Hasher())


def filled_store(rows: int = 12) -> EmbeddingStore:
    store = make_store()
    store.add(clustered(rows, 16, seed=3), ids=[f"r{i}" for i in range(rows)], labels=["x"] * rows,
              metadata=[{"i": i, "s": "ü"} for i in range(rows)])
    store.add(clustered(rows, 4, seed=4))
    store.quantize(16, "int8")
    store.quantize(16, "binary")
    store.config = {"model": "m", "nested": {"a": [1, 2.5, None]}}
    return store


def snapshot(store: EmbeddingStore) -> tuple[Any, ...]:
    info = store.memory_info()
    return (store.dimensions, len(store), info.used_bytes, info.store_bytes,
            [store.table(d).to_numpy().tobytes() for d in store.dimensions], [store.table(d).ids for d in store.dimensions])


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def temp_pattern(name: str) -> re.Pattern[str]:
    return re.compile(re.escape(f".{fileformat.temp_prefix(name)}.") + r"[0-9a-f]{12}\.tmp")


@pytest.fixture
def store() -> Iterator[EmbeddingStore]:
    s = filled_store()
    before = snapshot(s)
    yield s
    assert snapshot(s) == before  # a save, failed or not, changes nothing in the store or budget


# ------------------------------------------------------------------------- what may be replaced


def assert_refused(store: EmbeddingStore, target: Path, kind: str) -> None:
    folder = target.parent
    before = listing(folder)
    with pytest.raises(InvalidArgumentError, match=kind):
        store.save(target)
    assert listing(folder) == before


def test_save_refuses_a_fifo(tmp_path: Path, store: EmbeddingStore) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert_refused(store, fifo, "FIFO")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_save_refuses_a_device_and_a_socket(tmp_path: Path, store: EmbeddingStore) -> None:
    """A null-device node made in tmp_path (root may mknod), else a socket: both fail the same check."""
    device = tmp_path / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        device = tmp_path / "no-mknod-here"
    else:
        assert_refused(store, device, "character device")
        assert stat.S_ISCHR(os.lstat(device).st_mode)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "sock"))
        assert_refused(store, tmp_path / "sock", "socket")
        assert stat.S_ISSOCK(os.lstat(tmp_path / "sock").st_mode)


def test_save_refuses_a_directory_and_symlinks_to_non_files(tmp_path: Path, store: EmbeddingStore) -> None:
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    for name, points_to in (("to-dir", "dir"), ("to-fifo", "fifo"), ("dangling", "missing"), ("loop", "loop")):
        (tmp_path / name).symlink_to(tmp_path / points_to)
    assert_refused(store, tmp_path / "dir", "directory")
    assert_refused(store, tmp_path / "to-dir", "symlink to a directory")
    assert_refused(store, tmp_path / "to-fifo", "symlink to a FIFO")
    assert_refused(store, tmp_path / "dangling", "does not exist")
    assert_refused(store, tmp_path / "loop", "symlink")
    assert os.readlink(tmp_path / "to-fifo") == str(tmp_path / "fifo")


def test_save_through_a_symlink_replaces_its_target(tmp_path: Path, store: EmbeddingStore) -> None:
    """The link stays a link (``latest -> runs/store-1``) and what it names gets the new content."""
    (tmp_path / "runs").mkdir()
    real = tmp_path / "runs" / "store-1"
    make_store().save(real)
    (tmp_path / "latest").symlink_to(real)
    store.save(tmp_path / "latest")
    assert os.readlink(tmp_path / "latest") == str(real)
    assert len(make_store().load(real)) == len(store)
    assert listing(tmp_path) == ["latest", "runs"] and listing(tmp_path / "runs") == ["store-1"]


# ------------------------------------------------------------------------- typed errors


@pytest.mark.parametrize("bad", [5, None, 1.5, b"bytes-path", ["a"], ""])
def test_save_refuses_non_paths(tmp_path: Path, store: EmbeddingStore, bad: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidArgumentError, match="path"):
        store.save(bad)
    assert listing(tmp_path) == []


def test_save_refuses_a_nul_in_the_path(tmp_path: Path, store: EmbeddingStore) -> None:
    with pytest.raises(InvalidArgumentError, match="NUL"):
        store.save(tmp_path / "a\0b")
    assert listing(tmp_path) == []


def test_save_into_a_missing_folder_or_below_a_file(tmp_path: Path, store: EmbeddingStore) -> None:
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(StoreNotFoundError):
        store.save(tmp_path / "missing" / "s")
    with pytest.raises(StoreNotFoundError, match="not a folder"):
        store.save(tmp_path / "file" / "s")
    assert listing(tmp_path) == ["file"] and (tmp_path / "file").read_bytes() == b"x"


def test_a_long_name_saves_with_a_shortened_temp_name(tmp_path: Path, store: EmbeddingStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 240-byte name is legal, but ``.NAME.<12 hex>.tmp`` would be 258 bytes: the temp's NAME is cut."""
    target = tmp_path / ("é" * 100 + "s" * 40)  # 240 bytes in UTF-8
    assert len(os.fsencode(target.name)) == 240
    seen: list[str] = []
    real_replace = os.replace

    def spy(src: Any, dst: Any) -> None:
        seen.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    store.save(target)
    assert len(seen) == 1 and temp_pattern(target.name).fullmatch(seen[0]) and len(os.fsencode(seen[0])) <= 255
    assert seen[0].startswith("." + "é" * 100)
    assert listing(tmp_path) == [target.name]
    assert snapshot(make_store().load(target)) == snapshot(store)


def test_a_name_too_long_for_the_filesystem_is_a_store_write_error(tmp_path: Path, store: EmbeddingStore) -> None:
    target = tmp_path / ("n" * 256)
    with pytest.raises(StoreWriteError, match="too long") as caught:
        store.save(target)
    assert caught.value.errno == errno.ENAMETOOLONG and isinstance(caught.value, OSError)
    assert listing(tmp_path) == []


def test_a_folder_without_write_permission_is_a_store_write_error(
    tmp_path: Path, store: EmbeddingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tests run as root, whom ``chmod`` does not stop, so the refusal is the OS's EACCES on create."""
    target = tmp_path / "s"
    make_store().save(target)
    before = target.read_bytes()
    real_open = os.open

    def denied(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(StoreWriteError, match="Permission denied") as caught:
        store.save(target)
    assert caught.value.errno == errno.EACCES and isinstance(caught.value, EmbedtoolsError)
    assert target.read_bytes() == before and listing(tmp_path) == ["s"]


def test_a_disk_full_mid_write_is_a_store_write_error(tmp_path: Path, store: EmbeddingStore, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "s"
    make_store().save(target)
    before = target.read_bytes()
    real_write = os.write
    calls = []

    def full(fd: int, data: Any) -> int:
        calls.append(fd)
        if len(calls) > 2:  # the header went out; the disk fills during the tensors
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StoreWriteError, match="No space left") as caught:
        store.save(target)
    assert caught.value.errno == errno.ENOSPC and len(calls) == 3
    assert target.read_bytes() == before and listing(tmp_path) == ["s"]


FILE_SIZE_LIMIT = """
import resource, signal, sys, numpy as np, embedtools as et
store = et.EmbeddingStore(et.make_backend("numpy"), et.ByteBudget(1 << 30), et.Sha256Hasher())
store.add(np.ones((2000, 64), np.float32))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    store.save(sys.argv[1])
except et.StoreWriteError as exc:
    print("StoreWriteError", exc.errno, len(store), store.memory_info().store_bytes)
"""


def test_a_real_write_failure_mid_file_is_a_store_write_error(tmp_path: Path) -> None:
    """A file-size limit makes the kernel refuse the write half-way, as a full disk would."""
    target = tmp_path / "s"
    make_store().save(target)
    before = target.read_bytes()
    out = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, str(target)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    store = make_store()
    store.add(np.ones((2000, 64), np.float32))
    assert out.stdout.split() == ["StoreWriteError", str(errno.EFBIG), "2000", str(store.memory_info().store_bytes)]
    assert target.read_bytes() == before and listing(tmp_path) == ["s"]


# ------------------------------------------------------------------------- temp files


def test_a_later_save_removes_stale_temps_but_not_a_running_saves(tmp_path: Path, store: EmbeddingStore) -> None:
    target = tmp_path / "s"
    stale = tmp_path / ".s.0123456789ab.tmp"
    running = tmp_path / ".s.ba9876543210.tmp"
    others = [".s.backup.tmp", ".s.0123456789ab.tmp.keep", ".t.0123456789ab.tmp", "s.0123456789ab.tmp"]
    for path in [stale, running, *(tmp_path / name for name in others)]:
        path.write_bytes(b"partial")
    (tmp_path / ".s.fedcba987654.tmp").mkdir()  # the pattern, but not a file: left alone
    with running.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # what a save in progress holds on its temp
        store.save(target)
        assert not stale.exists() and running.read_bytes() == b"partial"
        assert all((tmp_path / name).read_bytes() == b"partial" for name in others)
    assert fileformat.remove_stale_temp_files(target) == (running,)
    assert listing(tmp_path) == sorted([*others, ".s.fedcba987654.tmp", "s"])
    assert snapshot(make_store().load(target)) == snapshot(store)


def test_concurrent_saves_of_one_path_each_write_a_whole_file(tmp_path: Path) -> None:
    """Each save's cleanup sees the others' temps locked, so none deletes a temp still being written."""
    target = tmp_path / "s"
    stores = [filled_store(rows) for rows in (5, 50, 500, 5000)]
    errors: list[BaseException] = []

    def save(s: EmbeddingStore) -> None:
        try:
            for _ in range(5):
                s.save(target)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert len(make_store().load(target)) in {len(s) for s in stores}
    assert listing(tmp_path) == ["s"]


# ------------------------------------------------------------------------- the bytes written


def test_two_saves_write_the_same_bytes(tmp_path: Path, store: EmbeddingStore) -> None:
    """safetensors' save_file ordered the header's ``__metadata__`` by a Rust HashMap: it varied."""
    digests = set()
    for i in range(30):
        store.save(tmp_path / f"s{i % 2}")
        digests.add(hashlib.sha256((tmp_path / f"s{i % 2}").read_bytes()).hexdigest())
    assert len(digests) == 1


SAVE_AGAIN = """
import sys
from tests.test_save_safety import filled_store
filled_store().save(sys.argv[1])
"""


def test_another_process_writes_the_same_bytes(tmp_path: Path) -> None:
    filled_store().save(tmp_path / "here")
    subprocess.run([sys.executable, "-c", SAVE_AGAIN, str(tmp_path / "there")], check=True, cwd=ROOT, timeout=120)
    assert (tmp_path / "here").read_bytes() == (tmp_path / "there").read_bytes()


def test_the_file_is_what_safetensors_save_writes(tmp_path: Path) -> None:
    """Same layout, order, padding and bytes as ``safetensors.numpy.save``, whose metadata order varies
    from call to call: one of its outputs is ours exactly, and every one parses to our header."""
    from safetensors import safe_open
    from safetensors.numpy import save

    store = filled_store()
    store.fit_rotation(4, components=2)
    store.quantize(4, "float16")
    store.quantize(4, "bfloat16")
    store.save(tmp_path / "s")
    ours = (tmp_path / "s").read_bytes()
    with safe_open(str(tmp_path / "s"), framework="np") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = handle.metadata()
    assert {str(t.dtype) for t in tensors.values()} >= {"float32", "int64", "uint8", "int8", "float16", "uint16"}

    def parts(data: bytes) -> tuple[dict[str, Any], bytes]:
        size = int.from_bytes(data[:8], "little")
        return json.loads(data[8 : 8 + size]), data[8 + size :]

    theirs = [save(tensors, metadata=metadata) for _ in range(64)]
    assert ours in theirs
    assert all(len(t) == len(ours) and parts(t) == parts(ours) for t in theirs)


def test_save_streams_tensors_instead_of_copying_them(tmp_path: Path) -> None:
    """Peak Python/NumPy allocation during save stays well under the table: the writer hands the
    arrays' own buffers to ``os.write``; what it allocates is per row (the ids, labels and metadata
    strings), small beside 4 KiB vectors."""
    store = make_store()
    store.add(np.random.default_rng(0).standard_normal((5_000, 1024)).astype(np.float32))
    table_bytes = 5_000 * 1024 * 4
    tracemalloc.start()
    try:
        store.save(tmp_path / "s")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (tmp_path / "s").stat().st_size > table_bytes
    assert peak < table_bytes // 4, f"save allocated {peak} bytes for a {table_bytes}-byte table"


@pytest.mark.parametrize("bad", [None, 5, b"store.safetensors", "", "a\0b"])
def test_load_refuses_non_paths_with_a_typed_error(tmp_path: Path, bad: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``load(None)`` was a ``TypeError`` and ``load("")`` read the working folder as a seed store."""
    monkeypatch.chdir(tmp_path)
    budget = et.ByteBudget(1 << 20)
    store = EmbeddingStore(et.make_backend("numpy"), budget, et.Sha256Hasher())
    with pytest.raises(InvalidArgumentError, match="path"):
        store.load(bad)
    assert store.dimensions == () and budget.report().used_bytes == 0


def test_load_of_a_name_too_long_is_a_typed_error(tmp_path: Path) -> None:
    store = EmbeddingStore(et.make_backend("numpy"), et.ByteBudget(1 << 20), et.Sha256Hasher())
    with pytest.raises(StoreNotFoundError, match="too long"):
        store.load(tmp_path / ("x" * 300))


def test_load_refuses_a_fifo_instead_of_blocking_on_it(tmp_path: Path) -> None:
    fifo = tmp_path / "store.safetensors"
    os.mkfifo(fifo)
    budget = et.ByteBudget(1 << 20)
    store = EmbeddingStore(et.make_backend("numpy"), budget, et.Sha256Hasher())
    for mmap in (False, True):
        with pytest.raises(StoreFormatError, match="FIFO"):
            store.load(fifo, mmap=mmap)
    assert store.dimensions == () and budget.report().used_bytes == 0
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
