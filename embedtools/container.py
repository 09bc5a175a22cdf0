"""The dependency-injection container: the one module that knows which class fills which seam.

dependency-injector does not type-check provider arguments, so each provider is annotated with the
Protocol it provides and built through a typed factory function that validates the configuration;
``tests/test_container.py`` builds every provider for every configuration value.
"""

from __future__ import annotations

from typing import Any

from dependency_injector import containers, providers

from embedtools.backends import make_backend, resolve
from embedtools.budget import ByteBudget
from embedtools.errors import InvalidArgumentError
from embedtools.hashing import DEFAULT_HASH_LENGTH, Sha256Hasher
from embedtools.progress import check_progress
from embedtools.protocols import ArrayBackend, Hasher, MemoryAccountant
from embedtools.store import EmbeddingStore
from embedtools.validation import check_positive_int

__all__ = ["DEFAULT_CONFIG", "Container"]

DEFAULT_CONFIG: dict[str, Any] = {
    "backend": "auto",
    "device": None,
    "max_memory_gb": 8.0,
    "hash_length": DEFAULT_HASH_LENGTH,
    "progress": "auto",
}


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


def _store(backend: ArrayBackend[Any], accountant: MemoryAccountant, hasher: Hasher, progress: object) -> EmbeddingStore:
    return EmbeddingStore(backend, accountant, hasher, progress=check_progress(progress))


class Container(containers.DeclarativeContainer):
    """``Container().store()`` gives a store wired from ``config``.

    The backend and hasher are singletons per container; the accountant is built once per store, so
    each store has its own ``max_memory_gb`` budget, as in the seed (override ``accountant`` with a
    ``providers.Singleton`` to make stores share one).
    """

    config = providers.Configuration(default=DEFAULT_CONFIG)
    backend: providers.Provider[ArrayBackend[Any]] = providers.Singleton(
        _backend, backend=config.backend, device=config.device
    )
    accountant: providers.Provider[MemoryAccountant] = providers.Factory(
        _accountant, max_memory_gb=config.max_memory_gb, backend=backend
    )
    hasher: providers.Provider[Hasher] = providers.Singleton(_hasher, hash_length=config.hash_length)
    store: providers.Provider[EmbeddingStore] = providers.Factory(
        _store, backend=backend, accountant=accountant, hasher=hasher, progress=config.progress
    )
