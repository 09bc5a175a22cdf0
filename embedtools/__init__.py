"""embedtools: embeddings in memory on NumPy, PyTorch or MLX; exact search; safe files; config hashes.

Importing this package loads NumPy and nothing heavier: the container (dependency-injector) is
loaded on first use of ``embedtools.Container`` (or ``Config``, ``make_container``), torch/MLX only when a backend is built or looked up
(``embedtools.TorchBackend`` imports torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from embedtools.backends import Description, available_backends, describe, make_backend
from embedtools.budget import ByteBudget
from embedtools.errors import (
    BackendUnavailableError,
    DimensionError,
    DuplicateIdError,
    EmbedtoolsError,
    InvalidArgumentError,
    InvalidEmbeddingError,
    MemoryLimitError,
    ReadOnlyStoreError,
    StoreFormatError,
    StoreNotEmptyError,
    StoreNotFoundError,
    StoreWriteError,
    UnhashableConfigError,
    UnknownIdError,
)
from embedtools.filters import Filter, Ids, Label, Meta
from embedtools.hashing import Sha256Hasher, canonical_json, config_hash, param_hash
from embedtools.protocols import QUANTIZATIONS, ArrayBackend, ArrayOps, Backend, Hasher, LowPrecisionGemm, MemoryAccountant, MemoryReport, Metric, Quantization
from embedtools.results import MemoryInfo, SearchResult, TableMemory
from embedtools.store import EmbeddingStore
from embedtools.study import StudyRow, StudyTable, study
from embedtools.tables import Table

if TYPE_CHECKING:
    from embedtools.backends.mlx import MlxBackend
    from embedtools.backends.numpy import NumpyBackend
    from embedtools.backends.torch import TorchBackend
    from embedtools.container import Config, Container, make_container

__version__ = "0.1.0"

__all__ = [
    "ArrayBackend",
    "ArrayOps",
    "Backend",
    "BackendUnavailableError",
    "ByteBudget",
    "Config",
    "Container",
    "Description",
    "DimensionError",
    "DuplicateIdError",
    "EmbeddingStore",
    "EmbedtoolsError",
    "Filter",
    "Hasher",
    "Ids",
    "InvalidArgumentError",
    "InvalidEmbeddingError",
    "Label",
    "LowPrecisionGemm",
    "MemoryAccountant",
    "Meta",
    "MemoryInfo",
    "MemoryLimitError",
    "MemoryReport",
    "Metric",
    "MlxBackend",
    "NumpyBackend",
    "QUANTIZATIONS",
    "Quantization",
    "ReadOnlyStoreError",
    "SearchResult",
    "Sha256Hasher",
    "StudyRow",
    "StudyTable",
    "StoreFormatError",
    "StoreNotEmptyError",
    "StoreNotFoundError",
    "StoreWriteError",
    "Table",
    "TableMemory",
    "TorchBackend",
    "UnhashableConfigError",
    "UnknownIdError",
    "__version__",
    "available_backends",
    "canonical_json",
    "config_hash",
    "describe",
    "make_backend",
    "make_container",
    "param_hash",
    "study",
]


_LAZY = {
    "Config": "embedtools.container",
    "Container": "embedtools.container",
    "make_container": "embedtools.container",
    "NumpyBackend": "embedtools.backends.numpy",
    "TorchBackend": "embedtools.backends.torch",
    "MlxBackend": "embedtools.backends.mlx",
}

# Hidden from type checkers: a module ``__getattr__`` returning ``Any`` would make every misspelt
# name (``et.Lable``) type-check; they see the ``TYPE_CHECKING`` imports above instead.
if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        """Load the container and the concrete backends on first use (PEP 562), keeping the import light."""
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'embedtools' has no attribute {name!r}")
        import importlib

        return getattr(importlib.import_module(module), name)
