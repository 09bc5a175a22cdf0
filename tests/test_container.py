"""The container wires every collaborator from configuration, and users can override each one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from dependency_injector import providers

import embedtools as et
from embedtools import (
    ArrayBackend,
    BackendUnavailableError,
    ByteBudget,
    EmbeddingStore,
    InvalidArgumentError,
    MemoryReport,
    Sha256Hasher,
)
from embedtools.container import DEFAULT_CONFIG, make_container
from embedtools.testing import FakeBackend, RecordingAccountant, overriding
from tests.conformance.backends import PAIRS


def build_all(c: et.Container) -> EmbeddingStore:
    backend = c.backend()
    accountant = c.accountant()
    hasher = c.hasher()
    store = c.store()
    assert store.backend is backend and store.hasher is hasher
    assert isinstance(accountant.report(), MemoryReport)
    store.add(np.eye(3, dtype=np.float32))
    assert store.search(np.eye(3, dtype=np.float32)[0], k=1).indices.tolist() == [[0]]
    return store


def test_defaults() -> None:
    c = et.Container()
    store = build_all(c)
    assert store.backend.name == "numpy"
    assert store.memory_info().limit_bytes == int(float(DEFAULT_CONFIG["max_memory_gb"]) * 2**30)
    assert len(store.config_hash) == 16


@pytest.mark.parametrize("backend", ["auto", "numpy", "AUTO", "NumPy"])
@pytest.mark.parametrize("device", [None, "cpu"])
@pytest.mark.parametrize("max_memory_gb", [0.001, 1, 2.5])
@pytest.mark.parametrize("hash_length", [1, 16, 64])
def test_every_provider_builds_for_every_valid_value(backend: str, device: str | None, max_memory_gb: float, hash_length: int) -> None:
    c = et.Container()
    c.config.from_dict({"backend": backend, "device": device, "max_memory_gb": max_memory_gb, "hash_length": hash_length})
    store = build_all(c)
    assert store.backend.name == "numpy"
    assert store.memory_info().limit_bytes == int(max_memory_gb * 2**30)
    assert len(store.config_hash) == hash_length


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("device", [None, "cpu"])
def test_torch_and_mlx_are_wired_with_their_device(backend: str, device: str | None) -> None:
    c = et.Container()
    c.config.from_dict({"backend": backend, "device": device})
    store = build_all(c)
    assert (store.backend.name, store.backend.device) == (backend, "cpu")


@pytest.mark.parametrize(("backend", "device"), [("torch", "cuda:9"), ("torch", "tpu"), ("mlx", "cuda"), ("numpy", "gpu")])
def test_a_device_that_is_not_here_fails_at_construction(backend: str, device: str) -> None:
    c = et.Container()
    c.config.from_dict({"backend": backend, "device": device})
    with pytest.raises(BackendUnavailableError, match="usable|cpu only"):
        c.backend()


def test_auto_follows_the_documented_order_here() -> None:
    choice = et.backends.choose_auto()
    gpu = [p for p in PAIRS if p[1] != "cpu"]
    if not gpu:
        assert choice.name == "numpy" and "no GPU library is usable" in choice.reason
    else:
        order = [p for kind in ("gpu", "cuda", "mps") for p in gpu if p[1].startswith(kind)]
        assert (choice.name, choice.device) == order[0]
    assert et.backends.choose_auto("cpu").name == "numpy"


def test_memory_budget_as_a_share_of_free_device_memory() -> None:
    c = et.Container()
    c.config.max_memory_gb.from_value("80%")
    backend = FakeBackend(free_bytes=1000)
    with overriding(c, backend=backend):
        assert c.store().memory_info().limit_bytes == 800
    with pytest.raises(InvalidArgumentError, match="free memory"):
        c.store()  # numpy on the cpu reports no free memory
    for bad in ("0%", "150%", "x%"):
        c.config.max_memory_gb.from_value(bad)
        with overriding(c, backend=backend), pytest.raises(InvalidArgumentError):
            c.store()


@pytest.mark.parametrize(
    ("key", "value", "provider"),
    [
        ("backend", "jax", "backend"),
        ("backend", 3, "backend"),
        ("device", "cuda:7", "backend"),
        ("device", 0, "backend"),
        ("max_memory_gb", 0, "accountant"),
        ("max_memory_gb", -1, "accountant"),
        ("max_memory_gb", "8", "accountant"),
        ("max_memory_gb", float("nan"), "accountant"),
        ("hash_length", 0, "hasher"),
        ("hash_length", 65, "hasher"),
        ("hash_length", "16", "hasher"),
    ],
)
def test_bad_configuration_is_a_typed_error(key: str, value: Any, provider: str) -> None:
    c = et.Container()
    c.config.from_dict({key: value})
    with pytest.raises(et.EmbedtoolsError):
        getattr(c, provider)()
    with pytest.raises(et.EmbedtoolsError):
        c.store()


def test_backend_and_hasher_are_shared_accountant_is_per_store() -> None:
    c = et.Container()
    a, b = c.store(), c.store()
    assert a.backend is b.backend and a.hasher is b.hasher and a.accountant is not b.accountant


class FakeHasher:
    length = 4

    def hash_config(self, config: Mapping[str, object]) -> str:
        return "fake"


def test_override_hasher() -> None:
    c = et.Container()
    with overriding(c, hasher=FakeHasher()):
        assert c.store().config_hash == "fake"
    assert c.store().config_hash == "44136fa355b3678a"


def test_override_accountant() -> None:
    c = et.Container()
    recording = RecordingAccountant()
    with overriding(c, accountant=recording):
        store = c.store()
        store.add(np.ones((2, 3), np.float32))
    assert recording.calls and recording.calls[0].kind == "reserve" and recording.calls[0].nbytes == 2 * 4 * 4
    assert c.store().accountant is not recording


def test_a_refusing_accountant_leaves_the_store_unchanged() -> None:
    c = et.Container()
    recording = RecordingAccountant(refuse=True)
    with overriding(c, accountant=recording):
        store = c.store()
        with pytest.raises(et.MemoryLimitError):
            store.add(np.ones((2, 3), np.float32))
    assert store.dimensions == () and [call.kind for call in recording.calls] == ["refused"]
    assert recording.report().used_bytes == 0


def test_override_backend() -> None:
    c = et.Container()
    fake = FakeBackend()
    with overriding(c, backend=fake):
        store = c.store()
        store.add(np.ones((2, 3), np.float32))
        store.search(np.ones(3, np.float32), k=1)
    assert fake.count("topk") == 1
    assert c.store().backend is not fake


def test_the_raw_provider_override_still_works() -> None:
    c = et.Container()
    fake: et.Hasher = FakeHasher()
    with c.hasher.override(providers.Object(fake)):
        assert c.store().config_hash == "fake"


def test_override_store_factory_arguments() -> None:
    c = et.Container()
    with c.store.override(providers.Factory(EmbeddingStore, backend=c.backend, accountant=c.accountant, hasher=providers.Object(Sha256Hasher(8)), search_block_bytes=64)):
        assert len(c.store().config_hash) == 8


def test_invalid_override_fails_at_use() -> None:
    c = et.Container()
    with c.accountant.override(providers.Factory(ByteBudget, limit_bytes=-5)):
        with pytest.raises(InvalidArgumentError):
            c.store()


def test_unknown_keys_are_refused_with_a_suggestion_before_anything_is_built() -> None:
    c = et.Container()
    with pytest.raises(InvalidArgumentError, match="did you mean backend.*did you mean max_memory_gb") as info:
        c.config.from_dict({"backnd": "numpy", "max_memroy_gb": 1})
    assert "'backnd'" in str(info.value)
    assert c.config() == DEFAULT_CONFIG  # nothing was merged
    with pytest.raises(InvalidArgumentError, match="unknown configuration key 'colour'; the keys are auto_screen, backend, device"):
        c.config.from_dict({"colour": 1})


def test_make_container_is_the_typed_entry_point() -> None:
    store = make_container({"backend": "numpy", "max_memory_gb": 1, "hash_length": 8}).store()
    assert (store.backend.name, store.memory_info().limit_bytes, len(store.config_hash)) == ("numpy", 2**30, 8)
    assert make_container().store().memory_info().limit_bytes == 8 * 2**30
    with pytest.raises(InvalidArgumentError, match="did you mean max_memory_gb"):
        make_container({"max_memroy_gb": 1})  # type: ignore[arg-type]
