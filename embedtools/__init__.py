"""embedtools: embeddings in memory on NumPy, PyTorch or MLX; exact search; safe files; config hashes.

Importing this package loads NumPy and nothing heavier: the container (dependency-injector) is
loaded on first use of ``embedtools.Container``, and torch/MLX only when a backend is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from embedtools.backends import available_backends, make_backend
from embedtools.budget import ByteBudget
from embedtools.errors import (
    BackendUnavailableError,
    DimensionError,
    DuplicateIdError,
    EmbedtoolsError,
    InvalidArgumentError,
    InvalidEmbeddingError,
    MemoryLimitError,
    StoreFormatError,
    StoreNotEmptyError,
    StoreNotFoundError,
    UnhashableConfigError,
)
from embedtools.hashing import Sha256Hasher, canonical_json, config_hash, param_hash
from embedtools.protocols import ArrayBackend, Hasher, MemoryAccountant, MemoryReport, Metric
from embedtools.store import EmbeddingStore, MemoryInfo, SearchResult, Table, TableMemory

if TYPE_CHECKING:
    from embedtools.backends.numpy import NumpyBackend
    from embedtools.container import Container

__version__ = "0.1.0"

__all__ = [
    "ArrayBackend",
    "BackendUnavailableError",
    "ByteBudget",
    "Container",
    "DimensionError",
    "DuplicateIdError",
    "EmbeddingStore",
    "EmbedtoolsError",
    "Hasher",
    "InvalidArgumentError",
    "InvalidEmbeddingError",
    "MemoryAccountant",
    "MemoryInfo",
    "MemoryLimitError",
    "MemoryReport",
    "Metric",
    "NumpyBackend",
    "SearchResult",
    "Sha256Hasher",
    "StoreFormatError",
    "StoreNotEmptyError",
    "StoreNotFoundError",
    "Table",
    "TableMemory",
    "UnhashableConfigError",
    "__version__",
    "available_backends",
    "canonical_json",
    "config_hash",
    "make_backend",
    "param_hash",
]


def __getattr__(name: str) -> Any:
    """Load the container and concrete backends on first use (PEP 562), keeping the import light."""
    if name == "Container":
        from embedtools.container import Container

        return Container
    if name == "NumpyBackend":
        from embedtools.backends.numpy import NumpyBackend

        return NumpyBackend
    raise AttributeError(f"module 'embedtools' has no attribute {name!r}")
