"""Save and load of a sharded store: a folder (manifest + one file per shard), one embedtools file
loaded sharded, a sharded folder loaded into one store; refusals that change nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

import embedtools as et
from embedtools.sharded import ShardedStore, load_into
from tests.sharded.conftest import CALL_SECONDS, CONFIG


def stores(client: Any, shards: int = 3) -> tuple[et.EmbeddingStore, ShardedStore, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(7)
    single = et.make_container(CONFIG).store()
    sharded = ShardedStore(client, CONFIG, shards=shards, timeout=CALL_SECONDS)
    for n, d in ((40, 8), (13, 8), (9, 4)):
        x = rng.standard_normal((n, d)).astype(np.float32)
        labels = [f"l{i % 3}" for i in range(n)]
        assert sharded.add(x, labels=labels) == single.add(x, labels=labels)
    single.config = sharded.config = {"model": "m"}
    single.quantize(8, "int8")
    sharded.quantize(8, "int8")
    return single, sharded, rng.standard_normal((6, 8)).astype(np.float32)


def same_results(a: Any, b: Any, queries: np.ndarray[Any, Any]) -> None:
    for metric in ("l2", "cosine"):
        x, y = a.search(queries, 7, metric=metric), b.search(queries, 7, metric=metric)
        assert x.ids == y.ids
        np.testing.assert_allclose(x.scores, y.scores, rtol=1e-5)
    assert a.search(queries[:, :4], 3, metric="l2").ids == b.search(queries[:, :4], 3, metric="l2").ids


def test_folder_round_trip_with_manifest_and_digests(client: Any, tmp_path: Path) -> None:
    single, sharded, queries = stores(client)
    folder = tmp_path / "sharded"
    sharded.save(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == [f"shard-0000{i}.embedtools" for i in range(3)]
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", *(s["file"] for s in manifest["shards"])]
    loaded = ShardedStore.load(client, folder, CONFIG, timeout=CALL_SECONDS)
    assert loaded.table(8).quantized == ("int8",) and loaded.config == {"model": "m"}
    assert loaded.config_hash == single.config_hash
    assert loaded.ids(8) == single.table(8).ids and loaded.ids(4) == single.table(4).ids
    same_results(loaded, sharded, queries)
    with pytest.raises(et.ReadOnlyStoreError):  # mapped on NumPy workers by default
        loaded.add(queries)
    assert len(loaded) == len(single)
    loaded.materialize()
    loaded.add(queries)
    assert len(loaded) == len(single) + 6
    for s in (loaded, sharded):
        s.close()


def test_a_damaged_or_swapped_shard_file_is_refused(client: Any, tmp_path: Path) -> None:
    _, sharded, _ = stores(client, 2)
    sharded.save(tmp_path / "s")
    sharded.close()
    folder = tmp_path / "s"
    first, second = (folder / "shard-00000.embedtools").read_bytes(), (folder / "shard-00001.embedtools").read_bytes()
    (folder / "shard-00000.embedtools").write_bytes(second)  # valid files, but not the ones the manifest names
    (folder / "shard-00001.embedtools").write_bytes(first)
    with pytest.raises(et.StoreFormatError, match="header's SHA-256"):
        ShardedStore.load(client, folder, CONFIG)
    (folder / "shard-00000.embedtools").write_bytes(first)
    (folder / "shard-00001.embedtools").write_bytes(second[:-3] + b"xyz")  # a tensor's bytes changed
    with pytest.raises(et.StoreFormatError):
        ShardedStore.load(client, folder, CONFIG)
    with pytest.raises(et.StoreFormatError, match="SHA-256"):
        load_into(et.make_container(CONFIG).store(), folder)


def test_one_file_loads_sharded_by_the_placement_rule_without_rows_through_the_client(client: Any, tmp_path: Path) -> None:
    single, sharded, queries = stores(client)
    sharded.close()
    single.add(np.random.default_rng(10).standard_normal((20000, 16)).astype(np.float32))
    single.save(tmp_path / "one.embedtools")
    loaded = ShardedStore.load(client, tmp_path / "one.embedtools", CONFIG, shards=3, timeout=CALL_SECONDS)
    through = loaded.bytes_through_client
    rows_bytes = sum(single.table(d).to_numpy().nbytes for d in single.dimensions)
    assert 0 < through < rows_bytes // 100  # paths, ranges and small answers only: no row
    assert loaded.table(8).shard_rows == (18, 18, 17) and loaded.table(4).shard_rows == (3, 3, 3)
    assert loaded.table(16).shard_rows == (6667, 6667, 6666)
    assert loaded.ids(8) == single.table(8).ids and loaded.ids(16) == single.table(16).ids
    assert loaded.table(8).quantized == ("int8",)
    same_results(loaded, single, queries)
    info = loaded.memory_info()
    assert all(t.mapped for m in info.shards for t in m.tables.values())
    unmapped = ShardedStore.load(client, tmp_path / "one.embedtools", CONFIG, shards=2, mmap=False)
    assert not any(t.mapped for m in unmapped.memory_info().shards for t in m.tables.values())
    same_results(unmapped, single, queries)
    for s in (loaded, unmapped):
        s.close()


def test_a_sharded_folder_loads_into_one_store(client: Any, tmp_path: Path) -> None:
    single, sharded, queries = stores(client)
    sharded.remove(["3", "20"])
    single.remove(["3", "20"])
    sharded.save(tmp_path / "s")
    one = load_into(et.make_container(CONFIG).store(), tmp_path / "s")
    assert one.table(8).ids == single.table(8).ids and one.config == single.config
    assert one.table(8).labels == single.table(8).labels
    same_results(one, single, queries)
    copy = sharded.to_store(et.make_container(CONFIG).store())
    assert copy.table(8).ids == single.table(8).ids
    np.testing.assert_array_equal(copy.table(8).to_numpy(), single.table(8).to_numpy())
    sharded.close()


def test_refusals_leave_every_shard_unchanged(client: Any) -> None:
    single, sharded, queries = stores(client)
    before = (len(sharded), sharded.ids(8), sharded.search(queries, 5).ids, sharded.memory_info().store_bytes)

    def unchanged() -> None:
        assert (len(sharded), sharded.ids(8), sharded.search(queries, 5).ids, sharded.memory_info().store_bytes) == before

    rng = np.random.default_rng(8)
    bad: list[tuple[type[Exception], Any]] = [
        (et.DuplicateIdError, lambda: sharded.add(rng.standard_normal((2, 8)), ids=["new", "5"], labels=["a", "b"])),
        (et.DuplicateIdError, lambda: sharded.add(rng.standard_normal((2, 8)), ids=["x", "x"], labels=["a", "b"])),
        (et.InvalidEmbeddingError, lambda: sharded.add(np.full((2, 8), np.nan))),
        (et.InvalidArgumentError, lambda: sharded.add(rng.standard_normal((2, 8)), labels=["a"])),
        (et.UnknownIdError, lambda: sharded.remove(["1", "nope"])),
        (et.UnknownIdError, lambda: sharded.remove(["52", "60"], dimension=8)),
        (et.UnknownIdError, lambda: sharded.update(["2", "nope"], rng.standard_normal((2, 8)))),
        (et.DimensionError, lambda: sharded.update(["2"], rng.standard_normal((1, 5)))),
        (et.DimensionError, lambda: sharded.search(rng.standard_normal((1, 5)))),
        (et.InvalidArgumentError, lambda: sharded.search(queries, 0)),
        (et.InvalidArgumentError, lambda: sharded.search(queries, 3, metric="hamming")),  # type: ignore[arg-type]
        (et.InvalidArgumentError, lambda: sharded.quantize(8, "int3")),  # type: ignore[arg-type]
        (et.UnhashableConfigError, lambda: setattr(sharded, "config", {"f": object()})),
    ]
    for error, change in bad:
        with pytest.raises(error):
            change()
        unchanged()
    with pytest.raises(et.InvalidArgumentError):
        ShardedStore(client, cast("et.Config", {"backend": "numpy", "max_memroy_gb": 1}))
    sharded.close()


def test_a_shard_refusing_rows_for_its_budget_changes_nothing_anywhere(client: Any) -> None:
    """Shard 1's budget holds 100 rows of 64d; an add whose piece for it is larger is refused
    before any shard takes a row, though shard 0 could have taken its piece."""
    small: et.Config = {"backend": "numpy", "max_memory_gb": 100 * 65 * 4 / 2**30}
    sharded = ShardedStore(client, [CONFIG, small], shards=2, timeout=CALL_SECONDS)
    rng = np.random.default_rng(9)
    sharded.add(rng.standard_normal((150, 64)).astype(np.float32))
    before = sharded.memory_info()
    with pytest.raises(et.MemoryLimitError, match="shard 1"):
        sharded.add(rng.standard_normal((60, 64)).astype(np.float32))
    after = sharded.memory_info()
    assert [m.used_bytes for m in after.shards] == [m.used_bytes for m in before.shards]
    assert sharded.table(64).shard_rows == (75, 75) and len(sharded) == 150
    sharded.add(rng.standard_normal((40, 64)).astype(np.float32))  # 20 each: fits
    assert sharded.table(64).shard_rows == (95, 95)
    sharded.close()
