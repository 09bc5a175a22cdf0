"""The three seams of embedtools: array backend, memory accountant, hasher.

The store is written against these Protocols only; the container decides which classes fill them.
They are deliberately small: every method here is one a second implementation (torch, MLX, a test
fake) must write, so nothing goes in that the store does not call or that a user cannot use alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "METRICS",
    "ArrayBackend",
    "ArrayT",
    "DTypeName",
    "Hasher",
    "MemoryAccountant",
    "MemoryReport",
    "Metric",
    "QUANTIZATIONS",
    "Quantization",
]

ArrayT = TypeVar("ArrayT")

Metric = Literal["cosine", "dot", "l2"]
METRICS: tuple[Metric, ...] = ("cosine", "dot", "l2")

DTypeName = Literal["float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"]

Quantization = Literal["float16", "bfloat16", "int8", "binary"]
QUANTIZATIONS: tuple[Quantization, ...] = ("float16", "bfloat16", "int8", "binary")

#: Largest query × corpus score block a top-k computes at once (bytes); a batch whose full score
#: matrix would be larger is processed in query chunks.
DEFAULT_BLOCK_BYTES = 128 * 1024 * 1024


class ArrayBackend(Protocol[ArrayT]):
    """What the store needs from an array library (NumPy, PyTorch, MLX).

    It keeps 15 of the seed's 17 operations under clearer names (``create_array`` is ``asarray``,
    ``dot`` is ``matmul``, ``get_shape``/``get_dtype``/``get_memory_usage`` are ``shape``/``dtype``/
    ``nbytes``) and drops ``save``/``load``: file I/O belongs to the store's format, and the seed's
    pickle fallback executed code from files. It adds ``row_norms``, ``to_list``, ``convert``,
    ``free_bytes``, ``take_rows``, ``dequantize`` and ``topk``.
    """

    @property
    def name(self) -> str:
        """Library name: ``"numpy"``, ``"torch"`` or ``"mlx"``."""
        ...

    @property
    def device(self) -> str:
        """Where arrays live, e.g. ``"cpu"``, ``"cuda:0"``, ``"mps"``, ``"gpu"``."""
        ...

    def asarray(self, data: object, dtype: DTypeName = "float32") -> ArrayT:
        """A new array (always a copy) from nested lists or anything array-like."""
        ...

    def from_numpy(self, array: npt.NDArray[Any], dtype: DTypeName = "float32") -> ArrayT:
        """The backend's array for a host array; may share memory with it where the library can."""
        ...

    def to_numpy(self, array: ArrayT) -> npt.NDArray[Any]:
        """A host NumPy array with the same values; may share memory on CPU."""
        ...

    def convert(self, array: object) -> ArrayT:
        """This backend's array for a NumPy, PyTorch or MLX array, same dtype, on this backend's device.

        Zero-copy through DLPack or the buffer protocol where both libraries allow it (CPU memory,
        see the README's conversion table); a copy otherwise.
        """
        ...

    def to_list(self, array: ArrayT) -> list[Any]:
        """Nested Python lists of Python scalars."""
        ...

    def shape(self, array: ArrayT) -> tuple[int, ...]: ...

    def dtype(self, array: ArrayT) -> str:
        """The dtype's short name, e.g. ``"float32"``."""
        ...

    def nbytes(self, array: ArrayT) -> int:
        """Bytes the array's elements take (dtype size × element count); a view reports its own size."""
        ...

    def zeros(self, shape: tuple[int, ...], dtype: DTypeName = "float32") -> ArrayT: ...

    def ones(self, shape: tuple[int, ...], dtype: DTypeName = "float32") -> ArrayT: ...

    def random_normal(
        self,
        shape: tuple[int, ...],
        *,
        seed: int | None = None,
        mean: float = 0.0,
        std: float = 1.0,
        dtype: DTypeName = "float32",
    ) -> ArrayT:
        """Normal samples; the same ``seed`` gives the same numbers, ``None`` fresh ones. No global state."""
        ...

    def matmul(self, a: ArrayT, b: ArrayT) -> ArrayT: ...

    def row_norms(self, a: ArrayT) -> ArrayT:
        """L2 norm of each row of a 2-D array (of the vector, for 1-D), as float32."""
        ...

    def normalize(self, a: ArrayT) -> ArrayT:
        """Rows scaled to unit L2 norm; an all-zero row stays all zero (never NaN)."""
        ...

    def cosine_similarity(self, a: ArrayT, b: ArrayT) -> ArrayT:
        """``(m, d) × (n, d) → (m, n)`` cosine; 1-D inputs count as one row; zero vectors score 0."""
        ...

    def concatenate(self, arrays: Sequence[ArrayT], axis: int = 0) -> ArrayT: ...

    def stack(self, arrays: Sequence[ArrayT], axis: int = 0) -> ArrayT: ...

    def slice_last_dim(self, array: ArrayT, dim: int) -> ArrayT:
        """The first ``dim`` columns, as a view where the library has views (a Matryoshka prefix)."""
        ...

    def take_rows(self, array: ArrayT, indices: npt.NDArray[np.int64]) -> ArrayT:
        """Rows of ``array`` at host ``indices`` (any shape): ``indices.shape + array.shape[1:]``."""
        ...

    def dequantize(
        self,
        codes: ArrayT,
        kind: Quantization,
        *,
        width: int,
        scale: ArrayT | None = None,
        offset: ArrayT | None = None,
    ) -> ArrayT:
        """The float32 values quantised ``codes`` stand for; the last axis is decoded, any leading shape.

        ``float16`` codes are cast. ``bfloat16`` codes are raw 16-bit words (``int16``, or ``uint16``
        on NumPy: the top half of a float32, as NumPy must hold them). ``int8`` codes map to ``offset + scale * code`` per
        dimension (``scale``/``offset`` are ``(width,)`` float32). ``binary`` codes are sign bits
        packed eight to a byte, most significant first (``numpy.packbits``), decoded to ±1 over the
        first ``width`` bits. Lives on the backend so quantised tables are decoded on the device
        they live on, one block of rows at a time (see ``topk``'s ``decode``).
        """
        ...

    def free_bytes(self) -> int | None:
        """Free memory on this backend's device where the library reports it (CUDA, Metal); else ``None``."""
        ...

    def topk(
        self,
        queries: ArrayT,
        corpus: ArrayT,
        k: int,
        metric: Metric,
        *,
        corpus_norms: ArrayT | None = None,
        row_mask: npt.NDArray[np.bool_] | None = None,
        max_block_bytes: int = DEFAULT_BLOCK_BYTES,
        decode: Callable[[ArrayT], ArrayT] | None = None,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Exact top-``k`` rows of ``corpus`` for each query, best first, ties to the lower index.

        ``queries`` is ``(q, d)`` (or ``(d,)``, one query). Returns host ``(scores, indices)`` of shape
        ``(q, min(k, n))``: cosine similarity or dot product (descending), or Euclidean distance
        (ascending) for ``"l2"``. ``corpus_norms`` (from :meth:`row_norms`) saves recomputing them;
        the query × corpus score block, with each of its queries' running shortlists, stays within
        ``max_block_bytes`` (beyond one query row), whatever the corpus size and ``k``.
        ``row_mask`` (host, one bool per corpus row) limits the search to the rows where it is true:
        the exact top-k among them, ``min(k, matches)`` wide.

        ``decode`` (e.g. ``functools.partial(backend.dequantize, kind="int8", ...)``) says ``corpus``
        holds codes: each block of rows is decoded just before its product, so a quantised table is
        searched where it lives and never decoded whole. Its scores are approximations by nature, so
        ties at the cut are not settled, and ``cosine``/``l2`` need ``corpus_norms`` (of the original
        rows).
        """
        ...


@dataclass(frozen=True)
class MemoryReport:
    """A snapshot of a byte budget: what is used, by whom, and what is left."""

    used_bytes: int
    limit_bytes: int
    by_owner: Mapping[str, int] = field(default_factory=dict)

    @property
    def available_bytes(self) -> int:
        return max(self.limit_bytes - self.used_bytes, 0)


class MemoryAccountant(Protocol):
    """A hard byte budget that callers consult *before* they allocate.

    Charges are kept per owner (the store uses one owner per table), so replacing or growing a table
    reserves or releases only the difference.
    """

    def reserve(self, owner: str, nbytes: int) -> None:
        """Add ``nbytes`` to ``owner``'s charge, or raise :class:`MemoryLimitError` changing nothing."""
        ...

    def release(self, owner: str, nbytes: int | None = None) -> None:
        """Give back ``nbytes`` of ``owner``'s charge (all of it when ``None``)."""
        ...

    def report(self) -> MemoryReport: ...


class Hasher(Protocol):
    """Turns an experiment configuration into a short, stable hex digest for cache keys."""

    @property
    def length(self) -> int:
        """Hex characters in each digest."""
        ...

    def hash_config(self, config: Mapping[str, object]) -> str:
        """The digest, or :class:`UnhashableConfigError` for values without a canonical encoding."""
        ...
