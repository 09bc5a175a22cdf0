"""The dependency-injection container: which class fills which seam, and what configuration means.

dependency-injector does not type-check provider arguments, so each provider is annotated with the
Protocol it provides and built through a typed factory function that validates its own value;
``tests/test_container.py`` builds every provider for every configuration value. Keys are checked
here, before any provider is built, because the library merges an unknown key silently: a typo in
``max_memory_gb`` would otherwise give the 8 GiB default. Typed code passes a :class:`Config` to
:func:`make_container` (checkers flag a wrong key or value); ``c.config.from_dict`` refuses the same
keys at run time. Fakes for tests swap providers through ``embedtools.testing.overriding``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, Literal, TypedDict, cast

from dependency_injector import containers, providers

from embedtools.backends import make_backend, resolve
from embedtools.budget import ByteBudget
from embedtools.errors import InvalidArgumentError
from embedtools.hashing import DEFAULT_HASH_LENGTH, Sha256Hasher
from embedtools.progress import check_progress
from embedtools.protocols import ArrayBackend, Hasher, MemoryAccountant
from embedtools.store import EmbeddingStore
from embedtools.validation import check_positive_int

__all__ = ["CONFIG_KEYS", "DEFAULT_CONFIG", "Config", "Configuration", "Container", "check_config_keys", "make_container"]


class Config(TypedDict, total=False):
    """The container's configuration; every key is optional and falls back to ``DEFAULT_CONFIG``.

    Backend names are matched case-insensitively at run time; the ``Literal`` lists the spellings
    typed code should use.
    """

    backend: Literal["auto", "numpy", "torch", "mlx"]
    device: str | None
    max_memory_gb: float | str
    hash_length: int
    progress: Literal["auto"] | bool
    auto_screen: bool


DEFAULT_CONFIG: Config = {
    "backend": "auto",
    "device": None,
    "max_memory_gb": 8.0,
    "hash_length": DEFAULT_HASH_LENGTH,
    "progress": "auto",
    "auto_screen": True,
}

CONFIG_KEYS: frozenset[str] = frozenset(Config.__annotations__)


def check_config_keys(options: Mapping[str, object]) -> None:
    """Refuse a key the container does not read, naming the closest known key."""
    problems: list[str] = []
    for key in options:
        if key not in CONFIG_KEYS:
            close = difflib.get_close_matches(str(key), sorted(CONFIG_KEYS), n=1)
            problems.append(f"{key!r} (did you mean {close[0]}?)" if close else repr(key))
    if problems:
        raise InvalidArgumentError(
            f"unknown configuration key {', '.join(problems)}; the keys are {', '.join(sorted(CONFIG_KEYS))}"
        )


class Configuration(providers.Configuration):
    """``providers.Configuration`` that refuses unknown top-level keys in ``from_dict``."""

    def from_dict(self, options: dict[str, Any], required: bool = False) -> None:
        check_config_keys(options)
        super().from_dict(options, required)


def _backend(backend: object, device: object) -> ArrayBackend[Any]:
    choice = resolve(backend, device)
    return make_backend(choice.name, choice.device)


def _accountant(max_memory_gb: object, backend: ArrayBackend[Any]) -> MemoryAccountant:
    """A budget of ``max_memory_gb`` GiB, or ``"80%"``: that share of the device's free memory now."""
    if isinstance(max_memory_gb, str) and max_memory_gb.strip().endswith("%"):
        try:
            share = float(max_memory_gb.strip()[:-1]) / 100
        except ValueError:
            raise InvalidArgumentError(f"max_memory_gb {max_memory_gb!r} is not a percentage") from None
        if not 0 < share <= 1:
            raise InvalidArgumentError(f"max_memory_gb {max_memory_gb!r} must be in (0%, 100%]")
        free = backend.free_bytes()
        if free is None:
            raise InvalidArgumentError(
                f"max_memory_gb={max_memory_gb!r} needs a device that reports its free memory (CUDA, MPS, "
                f"MLX on Metal); {backend.name} on {backend.device} does not: give GiB instead"
            )
        return ByteBudget(max(int(free * share), 1))
    return ByteBudget.from_gib(max_memory_gb)


def _hasher(hash_length: object) -> Hasher:
    return Sha256Hasher(check_positive_int(hash_length, "hash_length", upper=64))


def _store(backend: ArrayBackend[Any], accountant: MemoryAccountant, hasher: Hasher, progress: object, auto_screen: object) -> EmbeddingStore:
    if not isinstance(auto_screen, bool):
        raise InvalidArgumentError(f"auto_screen must be true or false, got {auto_screen!r}")
    return EmbeddingStore(backend, accountant, hasher, progress=check_progress(progress), auto_screen=auto_screen)


class Container(containers.DeclarativeContainer):
    """``Container().store()`` gives a store wired from ``config``.

    The backend and hasher are singletons per container; the accountant is built once per store, so
    each store has its own ``max_memory_gb`` budget, as in the seed (override ``accountant`` with a
    ``providers.Singleton`` to make stores share one).
    """

    config: Configuration = Configuration(default=dict(DEFAULT_CONFIG))
    backend: providers.Provider[ArrayBackend[Any]] = providers.Singleton(
        _backend, backend=config.backend, device=config.device
    )
    accountant: providers.Provider[MemoryAccountant] = providers.Factory(
        _accountant, max_memory_gb=config.max_memory_gb, backend=backend
    )
    hasher: providers.Provider[Hasher] = providers.Singleton(_hasher, hash_length=config.hash_length)
    store: providers.Provider[EmbeddingStore] = providers.Factory(
        _store, backend=backend, accountant=accountant, hasher=hasher, progress=config.progress, auto_screen=config.auto_screen
    )


def make_container(config: Config | None = None) -> Container:
    """A container configured from ``config``: the typed entry point, checked by mypy and pyright.

    A function, not a method: ``Container()`` is a ``DynamicContainer`` at run time, which does not
    carry methods defined on the declarative class.
    """
    container = Container()
    if config is not None:
        container.config.from_dict(cast("dict[str, Any]", dict(config)))
    return container
