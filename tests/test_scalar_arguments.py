"""Issue 14, finding 5 (scalar arguments): every public entry point's scalar argument, given numpy
arrays and scalars, bools, floats, None, huge ints or strings, either works or raises an
EmbedtoolsError that leaves the store and its budget unchanged."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import embedtools as et
from embedtools import ByteBudget, Container, EmbeddingStore, EmbedtoolsError, InvalidArgumentError, Sha256Hasher
from embedtools.study import study
from tests.test_store import snapshot

VALUES: dict[str, object] = {
    "array": np.array([1, 2]),
    "str-array": np.array(["cosine", "int8"]),
    "0-d array": np.array(3),
    "np.int64": np.int64(3),
    "np.float64": np.float64(3.0),
    "np.bool_": np.bool_(True),
    "np.str_": np.str_("int8"),
    "True": True,
    "float": 3.0,
    "nan": float("nan"),
    "inf": float("inf"),
    "1e300": 1e300,
    "None": None,
    "10**400": 10**400,
    "2**70": 2**70,
    "-1": -1,
    "0": 0,
    "str": "3",
    "list": [1],
    "bytes": b"x",
}

Q = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)


def fresh_store() -> EmbeddingStore:
    store = EmbeddingStore(et.make_backend("numpy"), ByteBudget(1 << 26), Sha256Hasher())
    store.add(np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32), ids=[f"r{i}" for i in range(40)])
    store.quantize(16, "int8")
    return store


def container_store(key: str) -> Callable[[EmbeddingStore, Any], object]:
    def build(_: EmbeddingStore, value: Any) -> object:
        container = Container()
        container.config.from_dict({"backend": "numpy", "device": None, key: value})
        return container.store()

    return build


def small_study(**kwargs: Any) -> Callable[[EmbeddingStore, Any], object]:
    (name,) = kwargs
    settings: dict[str, Any] = {"k": 3, "dimensions": [8], "quantizations": ("int8",), "repeat": 1}

    def run(store: EmbeddingStore, value: Any) -> object:
        return study(store, Q, **{**settings, name: value})

    return run


ENTRIES: dict[str, Callable[[EmbeddingStore, Any], object]] = {
    "search k": lambda s, v: s.search(Q, k=v),
    "search dimension": lambda s, v: s.search(Q, k=3, dimension=v),
    "search metric": lambda s, v: s.search(Q, k=3, metric=v),
    "search quantized": lambda s, v: s.search(Q, k=3, quantized=v),
    "search rescore": lambda s, v: s.search(Q, k=3, quantized="int8", rescore=v),
    "search rescore_with": lambda s, v: s.search(Q, k=3, quantized="int8", rescore_with=v),
    "search funnel": lambda s, v: s.search(Q, k=3, funnel=v),
    "search funnel dimension": lambda s, v: s.search(Q, k=3, funnel=[(v, 10)]),
    "search funnel shortlist": lambda s, v: s.search(Q, k=3, funnel=[(4, v)]),
    "quantize kind": lambda s, v: s.quantize(16, v),
    "quantize dimension": lambda s, v: s.quantize(v, "binary"),
    "drop_quantized kind": lambda s, v: s.drop_quantized(16, v),
    "fit_rotation components": lambda s, v: s.fit_rotation(16, v),
    "fit_rotation dimension": lambda s, v: s.fit_rotation(v),
    "table": lambda s, v: s.table(v),
    "drop": lambda s, v: s.drop(v),
    "remove dimension": lambda s, v: s.remove(["r1"], dimension=v),
    "update dimension": lambda s, v: s.update(["r1"], labels=["x"], dimension=v),
    "search_block_bytes": lambda s, v: EmbeddingStore(
        et.make_backend("numpy"), ByteBudget(1 << 20), Sha256Hasher(), search_block_bytes=v
    ).search(Q, k=2),
    "store progress": lambda s, v: EmbeddingStore(et.make_backend("numpy"), ByteBudget(1 << 20), Sha256Hasher(), progress=v),
    "ByteBudget": lambda s, v: ByteBudget(v),
    "ByteBudget.from_gib": lambda s, v: ByteBudget.from_gib(v),
    "Sha256Hasher": lambda s, v: Sha256Hasher(v),
    "make_backend name": lambda s, v: et.make_backend(v),
    "make_backend device": lambda s, v: et.make_backend("numpy", v),
    "config_hash length": lambda s, v: et.config_hash({}, length=v),
    "study k": small_study(k=None),
    "study rescore": small_study(rescore=None),
    "study funnel_shortlist": small_study(funnel_shortlist=None),
    "study repeat": small_study(repeat=None),
    "study metric": small_study(metric=None),
    "study quantizations": small_study(quantizations=None),
    "study dimension": small_study(dimension=None),
    "study dimensions": small_study(dimensions=None),
    **{f"container {key}": container_store(key) for key in ("backend", "device", "max_memory_gb", "hash_length", "progress")},
}


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_every_scalar_argument_works_or_is_a_typed_error_that_changes_nothing(entry: str) -> None:
    call = ENTRIES[entry]
    for name, value in VALUES.items():
        store = fresh_store()
        before = snapshot(store)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                call(store, value)
        except EmbedtoolsError:
            assert snapshot(store) == before, f"{entry} = {name} failed and changed the store"
        except Exception as exc:  # the bug this guards against
            pytest.fail(f"{entry} = {name}: {type(exc).__name__}: {exc}")


@pytest.mark.parametrize("value", [np.array(["int8", "binary"]), np.array(["cosine"]), ["int8"], ("dot",)])
def test_arrays_for_metric_and_quantization_are_refused(value: object) -> None:
    store = fresh_store()
    before = snapshot(store)
    for call in (
        lambda: store.quantize(16, value),  # type: ignore[arg-type]
        lambda: store.search(Q, k=3, metric=value),  # type: ignore[arg-type]
        lambda: store.search(Q, k=3, quantized=value),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidArgumentError, match="unknown"):
            call()
    assert snapshot(store) == before


def test_numpy_integers_work_as_ints() -> None:
    """The signatures say int; numpy's integers (what arithmetic on arrays gives) work the same."""
    store = fresh_store()
    k: Any = np.int64(3)
    dim: Any = np.int32(8)
    result = store.search(Q, k=k, dimension=dim, funnel=[(np.int16(4), np.uint8(10))])  # type: ignore[list-item]
    assert result.indices.shape == (2, 3) and result.dimension == 8
    d: Any = np.int64(16)
    store.fit_rotation(d, np.int8(4))  # type: ignore[arg-type]
    kind: Any = np.str_("int8")
    assert store.search(Q, k=k, quantized=kind, rescore=k).indices.shape == (2, 3)


@pytest.mark.parametrize(
    ("gib", "message"),
    [
        (1e300, "more bytes than int64"),
        (10**400, "more bytes than int64"),
        (2**33, "more bytes than int64"),
        (float(2**33), "more bytes than int64"),
        (float("inf"), "positive finite"),
        (float("nan"), "positive finite"),
        (0, "positive finite"),
        (-1.0, "positive finite"),
        (True, "positive finite"),
        (np.bool_(True), "positive finite"),
        (None, "positive finite"),
        (np.array([1.0]), "positive finite"),
    ],
)
def test_max_memory_gb_beyond_int64_or_not_a_number_is_refused(gib: object, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        ByteBudget.from_gib(gib)
    container = Container()
    container.config.from_dict({"backend": "numpy", "max_memory_gb": gib})
    with pytest.raises(InvalidArgumentError, match=message):
        container.store()


def test_max_memory_gb_accepts_numpy_numbers_and_the_largest_int64_budget() -> None:
    assert ByteBudget.from_gib(np.float32(0.5)).limit_bytes == 1 << 29
    assert ByteBudget.from_gib(np.int64(2)).limit_bytes == 2 << 30
    assert ByteBudget.from_gib(2**33 - 1).limit_bytes == (2**33 - 1) * 2**30
    assert ByteBudget(2**63 - 1).limit_bytes == 2**63 - 1
    with pytest.raises(InvalidArgumentError, match="at most"):
        ByteBudget(2**63)


def test_cli_max_memory_gb_1e300_is_a_one_line_error(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from embedtools.cli import main

    folder = tmp_path / "seed"
    folder.mkdir()
    code = main(["convert", str(folder), str(tmp_path / "out.et"), "--max-memory-gb", "1e300"])
    err = capsys.readouterr().err
    assert code != 0 and "max_memory_gb" in err and "Traceback" not in err and not (tmp_path / "out.et").exists()
