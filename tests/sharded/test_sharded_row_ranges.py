"""``EmbeddingStore.load(path, rows=...)``: what each worker of a sharded store reads of one file
(no cluster needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import embedtools as et


def saved(tmp_path: Path) -> tuple[et.EmbeddingStore, Path]:
    rng = np.random.default_rng(1)
    store = et.make_container({"backend": "numpy", "max_memory_gb": 0.5}).store()
    store.add(rng.standard_normal((30, 8)).astype(np.float32), labels=[i % 4 for i in range(30)],
              metadata=[{"i": i} for i in range(30)])  # fmt: skip
    store.add(rng.standard_normal((5, 3)).astype(np.float32))
    store.quantize(8, "int8")
    store.config = {"run": 1}
    path = tmp_path / "s.embedtools"
    store.save(path)
    return store, path


@pytest.mark.parametrize("mmap", [False, True])
def test_a_row_range_is_those_rows_with_the_files_index_calibration(tmp_path: Path, mmap: bool) -> None:
    whole, path = saved(tmp_path)
    part = et.make_container({"backend": "numpy"}).store().load(path, mmap=mmap, rows={8: (10, 25)})
    assert part.dimensions == (8,) and part.config == {"run": 1}
    table, full = part.table(8), whole.table(8)
    assert table.ids == full.ids[10:25] and table.labels == full.labels[10:25] and table.metadata == full.metadata[10:25]
    np.testing.assert_array_equal(table.to_numpy(), full.to_numpy()[10:25])
    np.testing.assert_array_equal(np.asarray(table.quantized["int8"].codes), np.asarray(full.quantized["int8"].codes)[10:25])
    assert part.memory_info().tables[8].rows == 15 and (part.mapped_from is not None) == mmap
    queries = full.to_numpy()[12:14]
    got, want = part.search(queries, 3, metric="l2"), whole.search(queries, 3, metric="l2", where=et.Ids(*full.ids[10:25]))
    assert got.ids == want.ids


def test_bad_ranges_are_refused_before_anything_is_read(tmp_path: Path) -> None:
    _, path = saved(tmp_path)
    store = et.make_container({"backend": "numpy"}).store()
    for rows in ({8: (5, 31)}, {8: (6, 5)}, {8: (-1, 3)}, {16: (0, 1)}, {8: (0, 2, 3)}, {8: (0.0, 2)}, {8: "ab"}):
        with pytest.raises(et.InvalidArgumentError):
            store.load(path, rows=rows)  # type: ignore[arg-type]
        assert store.dimensions == () and store.memory_info().used_bytes == 0
    assert store.load(path, rows={8: (4, 4), 3: (0, 5)}).dimensions == (3,)  # an empty range leaves its table out
