"""Quantised indexes: real bytes charged, exact scores after rescoring, recall floors, files, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

import embedtools as et
from embedtools import ByteBudget, EmbeddingStore, InvalidArgumentError, MemoryLimitError, Sha256Hasher
from embedtools.quantize import QUANTIZATIONS, Quantization, QuantizedIndex
from tests.conformance.backends import IDS, PAIRS
from tests.helpers import assert_exact_topk, clustered, matryoshka_like, reference_scores


def make_store(pair: tuple[str, str] = ("numpy", "cpu"), limit_bytes: int = 1 << 30) -> EmbeddingStore:
    return EmbeddingStore(et.make_backend(*pair), ByteBudget(limit_bytes), Sha256Hasher())


def recall(found: Any, truth: Any) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found.tolist(), truth.tolist(), strict=True)]))


def test_indexes_take_the_bytes_they_claim() -> None:
    x = clustered(1000, 100)
    for kind, ratio in (("float16", 2), ("bfloat16", 2), ("int8", 4), ("binary", 32)):
        index = QuantizedIndex.build(kind, x)  # type: ignore[arg-type]
        assert index.nbytes == QuantizedIndex.nbytes_for(kind, 1000, 100)  # type: ignore[arg-type]
        assert x.nbytes / index.codes.nbytes == pytest.approx(ratio, rel=0.05)


def test_int8_calibration_round_trips_within_half_a_step() -> None:
    x = clustered(500, 16, seed=3)
    x[:, 5] = 2.5  # a constant column
    index = QuantizedIndex.build("int8", x)
    assert index.scale is not None
    err = np.abs(index.decoder(et.NumpyBackend())(index.codes) - x)
    assert (err <= index.scale / 2 + 1e-6).all()


def test_quantize_charges_and_releases() -> None:
    store = make_store()
    store.add(clustered(200, 64))
    base = store.memory_info().used_bytes
    store.quantize(64, "binary")
    store.quantize(64, "int8")
    info = store.memory_info()
    assert info.tables[64].quantized == {"binary": 200 * 8, "int8": 200 * 64 + 2 * 64 * 4}
    assert info.used_bytes == base + 200 * 8 + 200 * 64 + 512
    store.quantize(64, "int8")  # again: recalibrated, charged once
    assert store.memory_info().used_bytes == info.used_bytes
    store.drop_quantized(64, "binary")
    assert store.memory_info().used_bytes == base + 200 * 64 + 512
    with pytest.raises(InvalidArgumentError):
        store.drop_quantized(64, "binary")


def test_quantize_over_budget_changes_nothing() -> None:
    store = make_store(limit_bytes=100 * 65 * 4 + 10)
    store.add(clustered(100, 64))
    with pytest.raises(MemoryLimitError):
        store.quantize(64, "float16")
    assert store.memory_info().tables[64].quantized == {}
    with pytest.raises(InvalidArgumentError):
        store.search(clustered(1, 64, seed=2), quantized="float16")


@pytest.mark.parametrize("pair", PAIRS, ids=IDS)
@pytest.mark.parametrize(
    ("kind", "rescore", "floor"), [("float16", 2, 1.0), ("bfloat16", 2, 1.0), ("int8", 4, 0.97), ("binary", 20, 0.9)]
)
def test_quantized_search_returns_exact_scores_with_high_recall(pair: tuple[str, str], kind: Any, rescore: int, floor: float) -> None:
    corpus = matryoshka_like(3000, 96, seed=5)
    queries = corpus[np.random.default_rng(6).integers(0, 3000, 40)] + 0.05 * np.random.default_rng(7).standard_normal((40, 96)).astype(np.float32)
    store = make_store(pair)
    store.add(corpus)
    store.quantize(96, kind)
    result = store.search(queries, k=10, quantized=kind, rescore=rescore)
    ref = reference_scores(queries, corpus, "cosine")
    np.testing.assert_allclose(result.scores, np.take_along_axis(ref, result.indices, axis=1), atol=1e-4)
    assert recall(result.indices, np.argsort(-ref, axis=1)[:, :10]) >= floor


@pytest.mark.parametrize("pair", PAIRS, ids=IDS)
def test_full_rescoring_is_exact_search(pair: tuple[str, str]) -> None:
    corpus = clustered(300, 33)  # 33: binary rows end in a part-filled byte
    queries = clustered(5, 33, seed=1)
    store = make_store(pair)
    store.add(corpus)
    for kind in QUANTIZATIONS:
        store.quantize(33, kind)
        for metric in ("cosine", "dot", "l2"):
            result = store.search(queries, k=5, metric=metric, quantized=kind, rescore=60)  # the whole table
            assert_exact_topk(queries, corpus, metric, 5, result.indices, result.scores)


def test_indexes_follow_their_table_through_add_and_files(tmp_path: Path) -> None:
    store = make_store()
    store.add(clustered(100, 16), ids=[f"a{i}" for i in range(100)])
    store.quantize(16, "int8")
    store.quantize(16, "binary")
    store.add(clustered(50, 16, seed=1) * 10, ids=[f"b{i}" for i in range(50)])  # recalibrated over 150 rows
    index = store.table(16).quantized["int8"]
    assert index.codes.shape == (150, 16)
    np.testing.assert_array_equal(index.codes, QuantizedIndex.build("int8", store.table(16).to_numpy()).codes)
    assert store.memory_info().tables[16].nbytes == 150 * 17 * 4 + 150 * 16 + 128 + 150 * 2
    store.save(tmp_path / "s")
    loaded = make_store().load(tmp_path / "s")
    assert loaded.memory_info().tables == store.memory_info().tables
    for kind in ("int8", "binary"):
        np.testing.assert_array_equal(loaded.table(16).quantized[kind].codes, store.table(16).quantized[kind].codes)
    q = clustered(3, 16, seed=4)
    assert loaded.search(q, quantized="int8").ids == store.search(q, quantized="int8").ids
    store.add(clustered(10, 16, seed=2), replace=True)
    assert set(store.table(16).quantized) == {"int8", "binary"}


def test_load_charges_quantized_bytes_before_reading(tmp_path: Path) -> None:
    store = make_store()
    store.add(clustered(100, 16))
    store.quantize(16, "float16")
    store.save(tmp_path / "s")
    small = make_store(limit_bytes=100 * 17 * 4 + 100)  # the floats fit, the float16 index does not
    with pytest.raises(MemoryLimitError):
        small.load(tmp_path / "s")
    assert small.dimensions == () and small.memory_info().used_bytes == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quantized": "int4"}, "unknown quantization"),
        ({"quantized": "float16"}, "no float16 index"),
        ({"quantized": "int8", "rescore": 0}, "rescore"),
        ({"quantized": "int8", "funnel": [(8, 40)]}, "cannot be combined"),
        ({"quantized": "int8", "dimension": 8}, "full width"),
    ],
)
def test_bad_quantized_search(kwargs: dict[str, Any], message: str) -> None:
    store = make_store()
    store.add(clustered(100, 16))
    store.quantize(16, "int8")
    with pytest.raises(InvalidArgumentError, match=message):
        store.search(clustered(2, 16, seed=1), k=10, **kwargs)
    with pytest.raises(InvalidArgumentError):
        store.quantize(16, "int4")  # type: ignore[arg-type]
    with pytest.raises(et.DimensionError):
        store.quantize(32, "int8")


def test_bfloat16_rounds_as_torch_does() -> None:
    torch = pytest.importorskip("torch")
    x = clustered(300, 40, seed=8) * 37.0
    decoded = QuantizedIndex.build("bfloat16", x).decoder(et.NumpyBackend())(np.asarray(QuantizedIndex.build("bfloat16", x).codes))
    np.testing.assert_array_equal(decoded, torch.from_numpy(x).to(torch.bfloat16).float().numpy())


def test_bfloat16_index_round_trips(tmp_path: Path) -> None:
    store = make_store()
    store.add(clustered(50, 12))
    store.quantize(12, "bfloat16")
    store.save(tmp_path / "s")
    loaded = make_store().load(tmp_path / "s")
    np.testing.assert_array_equal(loaded.table(12).quantized["bfloat16"].codes, store.table(12).quantized["bfloat16"].codes)
    assert loaded.memory_info().tables[12].quantized == {"bfloat16": 50 * 12 * 2}


@pytest.mark.parametrize("pair", PAIRS, ids=IDS)
def test_indexes_live_on_the_backend_with_the_same_codes_everywhere(pair: tuple[str, str], tmp_path: Path) -> None:
    corpus = clustered(300, 20, seed=2)
    reference = make_store()
    reference.add(corpus)
    store = make_store(pair)
    store.add(corpus)
    for kind in QUANTIZATIONS:
        reference.quantize(20, kind)
        store.quantize(20, kind)
        index = store.table(20).quantized[kind]
        assert type(index.codes) is type(store.backend.from_numpy(np.zeros(1)))  # the backend's own arrays
        np.testing.assert_array_equal(index.to_host(store.backend).codes, reference.table(20).quantized[kind].to_host(reference.backend).codes)
    store.save(tmp_path / "s")
    on_numpy = make_store().load(tmp_path / "s")
    again = make_store(pair).load(tmp_path / "s")
    q = clustered(4, 20, seed=3)
    for kind in QUANTIZATIONS:
        codes = on_numpy.table(20).quantized[kind].codes
        np.testing.assert_array_equal(codes, reference.table(20).quantized[kind].codes)
        # the same codes rank alike; ties in approximate scores may fall either way across libraries
        assert again.search(q, quantized=kind, rescore=2).ids == store.search(q, quantized=kind, rescore=2).ids
        full = on_numpy.search(q, quantized=kind, rescore=30)  # rescoring every row: exact everywhere
        assert full.ids == store.search(q, quantized=kind, rescore=30).ids == reference.search(q).ids


@pytest.mark.parametrize("pair", PAIRS, ids=IDS)
@pytest.mark.parametrize("share", [0.1, 0.6])  # a selective filter gathers its rows, a broad one masks the others
def test_filtered_quantized_search_is_exact_with_full_rescoring(pair: tuple[str, str], share: float) -> None:
    corpus = clustered(500, 16, seed=4)
    labels = ["in" if i < share * 500 else "out" for i in np.random.default_rng(5).permutation(500)]
    store = make_store(pair)
    store.add(corpus, labels=labels)
    store.quantize(16, "binary")
    queries = clustered(6, 16, seed=6)
    keep = np.array([label == "in" for label in labels])
    for metric in ("cosine", "l2"):
        result = store.search(queries, k=5, metric=metric, quantized="binary", rescore=100, where=et.Label("in"))
        assert keep[result.indices].all()
        exact = store.search(queries, k=5, metric=metric, where=et.Label("in"))
        np.testing.assert_array_equal(result.indices, exact.indices)
        np.testing.assert_allclose(result.scores, exact.scores, rtol=1e-5, atol=1e-6)


def test_values_beyond_a_16_bit_float_are_refused_and_change_nothing() -> None:
    kind: Quantization = "float16"
    big = 1e5
    store = make_store()
    store.add(clustered(50, 8))
    store.quantize(8, kind)
    charged = store.memory_info().used_bytes
    huge = clustered(2, 8, seed=1)
    huge[1, 3] = big
    with pytest.raises(InvalidArgumentError, match=f"{kind} cannot hold"):
        store.add(huge)  # the index is rebuilt with the table: nothing half-added
    assert len(store) == 50 and store.memory_info().used_bytes == charged
    other = make_store()
    other.add(huge)
    with pytest.raises(InvalidArgumentError, match="beyond"):
        other.quantize(8, kind)
    assert other.memory_info().tables[8].quantized == {}
    other.quantize(8, "int8")  # int8 calibrates to any finite range
    assert other.search(huge, k=1, quantized="int8", rescore=2).indices.tolist() == [[0], [1]]
    # bfloat16 overflows only past 3.39e38 (rounded up), beyond what a store accepts; built directly:
    with pytest.raises(InvalidArgumentError, match="bfloat16 cannot hold"):
        QuantizedIndex.build("bfloat16", np.array([[1.0, 3.4e38]], dtype=np.float32))
    assert QuantizedIndex.build("bfloat16", np.array([[1.0, 3.38e38]], dtype=np.float32)).rows == 1


class _WatchedBackend:
    """The NumPy backend, failing the test when any call is handed the table's float32 rows (or a
    view of them) once ``rows`` is set: the store reads its tables only through its backend."""

    def __init__(self) -> None:
        self.inner = et.NumpyBackend()
        self.rows: np.ndarray | None = None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            rows = self.rows
            if rows is not None and any(isinstance(a, np.ndarray) and np.may_share_memory(a, rows) for a in (*args, *kwargs.values())):
                raise AssertionError(f"the float32 table was read (by {name})")
            return attr(*args, **kwargs)

        return call


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_rescoring_with_an_index_never_reads_the_float_table(metric: Any) -> None:
    corpus = matryoshka_like(2000, 64, seed=8)
    queries = corpus[:20] + 0.05 * np.random.default_rng(9).standard_normal((20, 64)).astype(np.float32)
    backend = _WatchedBackend()
    store = EmbeddingStore(cast(et.ArrayBackend[Any], backend), ByteBudget(1 << 30), Sha256Hasher())
    store.add(corpus)
    store.quantize(64, "binary")
    store.quantize(64, "int8")
    exact = store.search(queries, k=10, metric=metric)
    backend.rows = store.table(64).vectors
    result = store.search(queries, k=10, metric=metric, quantized="binary", rescore=20, rescore_with="int8")
    int8 = store.table(64).quantized["int8"]
    values = et.NumpyBackend().dequantize(int8.codes, "int8", width=64, scale=int8.scale, offset=int8.offset)
    picked = values[result.indices]  # (q, k, d): the int8 values of the returned rows
    dots = np.einsum("qkd,qd->qk", picked.astype(np.float64), queries.astype(np.float64))
    if metric == "cosine":
        expected = dots / (np.linalg.norm(corpus, axis=1)[result.indices] * np.linalg.norm(queries, axis=1)[:, None])
    elif metric == "l2":
        expected = np.linalg.norm(picked - queries[:, None, :], axis=2)
    else:
        expected = dots
    np.testing.assert_allclose(result.scores, expected, rtol=1e-4, atol=1e-4)  # the int8 values' scores
    assert recall(result.indices, exact.indices) >= 0.85  # int8's own ranking error on 64-d rows


def test_bad_rescore_with_is_refused() -> None:
    store = make_store()
    store.add(clustered(100, 16))
    store.quantize(16, "binary")
    q = clustered(2, 16, seed=1)
    for kwargs, message in (
        ({"rescore_with": "int8"}, "pass quantized"),
        ({"quantized": "binary", "rescore_with": "int8"}, "no int8 index to rescore with"),
        ({"quantized": "binary", "rescore_with": "int3"}, "unknown quantization"),
    ):
        with pytest.raises(InvalidArgumentError, match=message):
            store.search(q, k=3, **kwargs)  # type: ignore[arg-type]
    assert store.search(q, k=3, quantized="binary", rescore_with="binary").indices.shape == (2, 3)


@pytest.mark.parametrize("pair", PAIRS, ids=IDS)
def test_rescoring_with_an_index_agrees_across_backends(pair: tuple[str, str]) -> None:
    corpus = clustered(300, 24, seed=10)
    queries = clustered(5, 24, seed=11)
    results = []
    for where in (("numpy", "cpu"), pair):
        store = make_store(where)
        store.add(corpus)
        store.quantize(24, "binary")
        store.quantize(24, "int8")
        results.append(store.search(queries, k=5, quantized="binary", rescore=60, rescore_with="int8"))  # every row
    assert results[0].ids == results[1].ids
    np.testing.assert_allclose(results[0].scores, results[1].scores, rtol=1e-5, atol=1e-6)


def test_a_mapped_table_searches_from_its_in_memory_indexes(tmp_path: Path) -> None:
    store = make_store()
    store.add(clustered(400, 32, seed=12))
    store.quantize(32, "binary")
    store.quantize(32, "int8")
    store.save(tmp_path / "s")
    mapped = make_store().load(tmp_path / "s", mmap=True)
    assert mapped.mapped_from is not None
    index = mapped.table(32).quantized["int8"]
    assert not isinstance(index.codes, np.memmap)  # indexes are read into memory; only the rows are mapped
    q = clustered(3, 32, seed=13)
    a = mapped.search(q, k=5, quantized="binary", rescore=10, rescore_with="int8")
    b = store.search(q, k=5, quantized="binary", rescore=10, rescore_with="int8")
    assert a.ids == b.ids
    np.testing.assert_array_equal(a.scores, b.scores)


def test_building_in_chunks_gives_the_codes_of_one_pass() -> None:
    x = clustered(1000, 24, seed=14) * 3
    whole = {kind: QuantizedIndex.build(kind, x) for kind in QUANTIZATIONS}
    for kind in QUANTIZATIONS:
        chunked = QuantizedIndex.build(kind, x, chunk_values=24 * 7)  # 7 rows a chunk, the last one short
        np.testing.assert_array_equal(chunked.codes, whole[kind].codes)
    x[993, 5] = 1e6  # reported at its row in the table, not in its chunk
    with pytest.raises(InvalidArgumentError, match="row 993, column 5"):
        QuantizedIndex.build("float16", x, chunk_values=24 * 7)
