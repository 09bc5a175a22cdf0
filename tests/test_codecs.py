"""The codec registry: every kind-specific fact comes from one codec, so a new kind needs no other edit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast, get_args

import numpy as np
import pytest
from safetensors import safe_open

import embedtools as et
from embedtools import ByteBudget, EmbeddingStore, InvalidArgumentError, Sha256Hasher, StoreFormatError
from embedtools.quantize import (
    CODECS,
    QUANTIZATIONS,
    Calibration,
    Codec,
    Quantization,
    QuantizedIndex,
    register_codec,
    unregister_codec,
)
from embedtools.records import TableShape
from tests.conformance.backends import IDS, PAIRS
from tests.helpers import assert_exact_topk, clustered

FIXTURE = Path(__file__).parent / "fixtures" / "quantized_v1.embedtools"
TOY = cast(Quantization, "absmax8")


def make_store(pair: tuple[str, str] = ("numpy", "cpu")) -> EmbeddingStore:
    return EmbeddingStore(et.make_backend(*pair), ByteBudget(1 << 30), Sha256Hasher())


class AbsMax8(Codec):
    """A toy kind: symmetric int8 steps (``x ≈ scale · code``, no shift), decoded by int8's kernel."""

    kind = TOY
    dtype = device_dtype = np.dtype(np.int8)
    calibrated = True

    @property
    def kernel(self) -> Quantization:
        return "int8"

    def calibrate(self, vectors: Any) -> Calibration:
        peak = np.abs(vectors).max(axis=0) if len(vectors) else np.zeros(vectors.shape[1], np.float32)
        scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        return scale, np.zeros_like(scale)

    def encode(self, chunk: Any, calibration: Calibration | None, first_row: int) -> Any:
        assert calibration is not None
        return np.clip(np.rint(chunk / calibration[0]), -127, 127).astype(np.int8)


@pytest.fixture
def toy() -> Iterator[Codec]:
    codec = AbsMax8()
    register_codec(codec)
    try:
        yield codec
    finally:
        unregister_codec(TOY)
    assert TOY not in CODECS


def test_the_registry_is_the_quantization_literal() -> None:
    assert tuple(CODECS) == QUANTIZATIONS == get_args(Quantization)
    assert all(codec.kind == kind for kind, codec in CODECS.items())


def test_a_registered_kind_quantizes_searches_saves_and_loads(toy: Codec, tmp_path: Path) -> None:
    corpus = clustered(200, 20, seed=1)
    queries = clustered(4, 20, seed=2)
    store = make_store()
    store.add(corpus)
    store.quantize(20, TOY)
    assert store.memory_info().tables[20].quantized == {TOY: toy.nbytes(200, 20)} == {TOY: 200 * 20 + 2 * 20 * 4}
    for metric in ("cosine", "dot", "l2"):
        result = store.search(queries, k=5, metric=metric, quantized=TOY, rescore=40)  # every row: exact
        assert_exact_topk(queries, corpus, metric, 5, result.indices, result.scores)
    store.save(tmp_path / "s")
    with safe_open(str(tmp_path / "s"), framework="np") as handle:
        header = json.loads(handle.metadata()["embedtools"])
        names = {name for name in handle.keys() if "quantized" in name}
        codes = handle.get_tensor(f"20d/quantized.{TOY}.codes")
    assert header["tables"][0]["quantized"] == [TOY]
    assert names == {f"20d/quantized.{TOY}.{name}" for name in ("codes", "scale", "offset")}
    np.testing.assert_array_equal(codes, QuantizedIndex.build(TOY, corpus).codes)
    loaded = make_store().load(tmp_path / "s")
    assert loaded.memory_info().tables == store.memory_info().tables
    assert loaded.search(queries, quantized=TOY, rescore=2).ids == store.search(queries, quantized=TOY, rescore=2).ids
    assert TableShape(20, 200, (TOY,)).nbytes == TableShape(20, 200).nbytes + toy.nbytes(200, 20)
    (row,) = et.study(loaded, queries, k=5, dimensions=[20], quantizations=(TOY,), repeat=1).rows[1:]
    assert (row.kind, row.bytes_per_row) == (TOY, toy.nbytes(200, 20) / 200)


@pytest.mark.parametrize("pair", PAIRS, ids=IDS)
def test_a_registered_kind_decodes_on_every_backend(toy: Codec, pair: tuple[str, str]) -> None:
    corpus = clustered(150, 12, seed=3)
    queries = clustered(3, 12, seed=4)
    reference, store = make_store(), make_store(pair)
    for s in (reference, store):
        s.add(corpus)
        s.quantize(12, TOY)
    assert store.search(queries, k=4, quantized=TOY, rescore=2).ids == reference.search(queries, k=4, quantized=TOY, rescore=2).ids


def test_a_file_naming_an_unregistered_kind_is_refused(tmp_path: Path) -> None:
    codec = AbsMax8()
    register_codec(codec)
    try:
        store = make_store()
        store.add(clustered(30, 8))
        store.quantize(8, TOY)
        store.save(tmp_path / "s")
    finally:
        unregister_codec(TOY)
    with pytest.raises(StoreFormatError, match="bad quantized list"):
        make_store().load(tmp_path / "s")


def test_registration_refuses_a_taken_name_and_built_ins_stay() -> None:
    with pytest.raises(InvalidArgumentError, match="registered already"):
        register_codec(CODECS["int8"])
    with pytest.raises(InvalidArgumentError, match="not a registered extra kind"):
        unregister_codec("int8")
    with pytest.raises(InvalidArgumentError, match="not a registered extra kind"):
        unregister_codec("int4")


def test_file_tensors_come_from_the_codecs() -> None:
    specs = {kind: QuantizedIndex.file_tensors_for(kind, 5, 33) for kind in QUANTIZATIONS}
    assert {kind: {name: (spec.dtype.str, spec.shape) for name, spec in s.items()} for kind, s in specs.items()} == {
        "float16": {"codes": ("<f2", (5, 33))},
        "bfloat16": {"codes": ("<u2", (5, 33))},
        "int8": {"codes": ("|i1", (5, 33)), "scale": ("<f4", (33,)), "offset": ("<f4", (33,))},
        "binary": {"codes": ("|u1", (5, 5))},
    }
    for kind in QUANTIZATIONS:
        index = QuantizedIndex.build(kind, clustered(5, 33))
        built = index.file_tensors()
        assert {name: (a.dtype, a.shape) for name, a in built.items()} == {n: (s.dtype, s.shape) for n, s in specs[kind].items()}
        assert index.nbytes == sum(a.nbytes for a in built.values())


def test_a_file_written_before_the_registry_loads_and_resaves_byte_identical(tmp_path: Path) -> None:
    """tests/fixtures/quantized_v1.embedtools was written by the code before codecs (see its script)."""
    store = make_store().load(FIXTURE)
    assert {d: set(t.quantized) for d, t in store.memory_info().tables.items()} == {33: set(QUANTIZATIONS), 8: {"int8", "binary"}}
    store.save(tmp_path / "again")
    with safe_open(str(FIXTURE), framework="np") as handle:
        library = json.loads(handle.metadata()["embedtools"])["library"]
    if library == f"embedtools {et.__version__}":  # the header names the library's version
        assert (tmp_path / "again").read_bytes() == FIXTURE.read_bytes()
    table = store.table(33).to_numpy()
    for kind in QUANTIZATIONS:  # and today's encoders give the codes the file holds
        with safe_open(str(FIXTURE), framework="np") as handle:
            np.testing.assert_array_equal(handle.get_tensor(f"33d/quantized.{kind}.codes"), QuantizedIndex.build(kind, table).codes)
