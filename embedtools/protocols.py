"""The three seams of embedtools: array backend, memory accountant, hasher.

The store is written against these Protocols only; the container decides which classes fill them.
:class:`ArrayBackend` holds only what the library calls (the store, the search plan and the
quantised indexes); :class:`BlockPrimitives` is what the one blocked top-k of
:mod:`embedtools.search` needs from a backend; :class:`ArrayOps` keeps the seed's other array
operations, for users and the conformance suite. Every bundled backend satisfies all three, so a
new backend is a class of primitives, and a test fake need only write the first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar, cast

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt

    from embedtools.search.select import Candidates, HostBlock

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "METRICS",
    "ArrayBackend",
    "ArrayOps",
    "ArrayT",
    "Backend",
    "BlockPrimitives",
    "Capabilities",
    "SearchBackend",
    "block_primitives",
    "DTypeName",
    "Hasher",
    "HostFloat",
    "LowPrecisionGemm",
    "MemoryAccountant",
    "MemoryReport",
    "Metric",
    "QUANTIZATIONS",
    "Quantization",
]

ArrayT = TypeVar("ArrayT")
#: The host float types of :meth:`BlockPrimitives.host_matmul`.
HostFloat = TypeVar("HostFloat", np.float32, np.float64)

Metric = Literal["cosine", "dot", "l2"]
METRICS: tuple[Metric, ...] = ("cosine", "dot", "l2")

DTypeName = Literal["float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"]

Quantization = Literal["float16", "bfloat16", "int8", "binary"]
QUANTIZATIONS: tuple[Quantization, ...] = ("float16", "bfloat16", "int8", "binary")

#: Largest query × corpus score block a top-k computes at once (bytes); a batch whose full score
#: matrix would be larger is processed in query chunks.
DEFAULT_BLOCK_BYTES = 128 * 1024 * 1024


class ArrayBackend(Protocol[ArrayT]):
    """What the library calls on an array library (NumPy, PyTorch, MLX): conversions, norms,
    gathers, decoding and the exact top-k.

    Of the seed's operations it keeps conversion, ``shape``, ``normalize``, ``concatenate`` and
    ``slice_last_dim``, and drops ``save``/``load``: file I/O belongs to the store's format, and
    the seed's pickle fallback executed code from files. The seed's other operations are
    :class:`ArrayOps`; what the bundled top-k needs besides is :class:`BlockPrimitives`.
    """

    @property
    def name(self) -> str:
        """Library name: ``"numpy"``, ``"torch"`` or ``"mlx"``."""
        ...

    @property
    def device(self) -> str:
        """Where arrays live, e.g. ``"cpu"``, ``"cuda:0"``, ``"mps"``, ``"gpu"``."""
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

    def shape(self, array: ArrayT) -> tuple[int, ...]: ...

    def row_norms(self, a: ArrayT) -> ArrayT:
        """L2 norm of each row of a 2-D array (of the vector, for 1-D), as float32."""
        ...

    def normalize(self, a: ArrayT) -> ArrayT:
        """Rows scaled to unit L2 norm; an all-zero row stays all zero (never NaN)."""
        ...

    def concatenate(self, arrays: Sequence[ArrayT], axis: int = 0) -> ArrayT: ...

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


class ArrayOps(Protocol[ArrayT]):
    """The seed's array operations that the library itself does not call, on every bundled backend
    for users (under clearer names: ``create_array`` is ``asarray``, ``dot`` is ``matmul``,
    ``get_dtype``/``get_memory_usage`` are ``dtype``/``nbytes``; ``get_shape`` is the core's ``shape``)."""

    def asarray(self, data: object, dtype: DTypeName = "float32") -> ArrayT:
        """A new array (always a copy) from nested lists or anything array-like."""
        ...

    def to_list(self, array: ArrayT) -> list[Any]:
        """Nested Python lists of Python scalars."""
        ...

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

    def cosine_similarity(self, a: ArrayT, b: ArrayT) -> ArrayT:
        """``(m, d) × (n, d) → (m, n)`` cosine; 1-D inputs count as one row; zero vectors score 0."""
        ...

    def stack(self, arrays: Sequence[ArrayT], axis: int = 0) -> ArrayT: ...


@dataclass(frozen=True)
class Capabilities:
    """Device-specific choices of the blocked top-k, reported by a backend rather than inferred
    from its name, so that a new backend (or a test) states them in one place."""

    #: Select a block's candidates on the device, so that only they cross to the host; otherwise
    #: the kernel pulls each score block to the host and selects with NumPy, which on a CPU beats
    #: torch's and MLX's own compare, nonzero and partition.
    select_on_device: bool
    #: Size blocks for a GPU (:data:`embedtools.search.kernel.DEVICE_BLOCK_ROWS`: launches and
    #: waits per block dominate there), not for a CPU's cache.
    gpu: bool


@dataclass(frozen=True)
class LowPrecisionGemm(Generic[ArrayT]):
    """A backend's native low-precision product over a quantised index's codes (see
    :meth:`BlockPrimitives.low_precision`): :meth:`BlockPrimitives.block_scores` runs
    ``rows(codes[rows]) @ operand(queries)`` in the codes' own type and hands back float32.

    ``int8`` is an integer product, exact in int32: its operand is made from a host ``(q, d + 2)``
    float32 array the library prepares (:mod:`embedtools.search.int8_screen`) — each query's
    integer steps in ``[-127, 127]``, then its scale ``α`` and offset ``β`` — and each score is
    ``α·(codes·steps) + β`` in float32, the int32 product converted once. The library knows those
    values exactly, so ``values`` is ``None`` there."""

    #: A block of codes as the GEMM's low-precision rows (a reinterpreting view, not a decode).
    rows: Callable[[ArrayT], ArrayT]
    #: Host ``(q, d)`` float32 queries rounded to the low-precision type (``int8``: the packed
    #: steps, scale and offset above), as the product's right operand.
    operand: Callable[[npt.NDArray[np.float32]], ArrayT]
    #: The values ``operand`` holds, back on the host as float32 (the library's own rounding, so a
    #: certified bound uses the exact ``|q̃ - q|``); ``None`` for ``int8``.
    values: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]] | None


class BlockPrimitives(Protocol[ArrayT]):
    """What the one blocked exact top-k (:mod:`embedtools.search.exact`) needs from a backend
    besides the core: a score block and its selection, on the device. Blocks are ``(rows, queries)``."""

    @property
    def capabilities(self) -> Capabilities: ...

    def float32(self, array: ArrayT) -> ArrayT:
        """The array as float32 (no copy when it already is)."""
        ...

    def query_operand(self, queries: npt.NDArray[np.float32]) -> ArrayT:
        """Host ``(q, d)`` queries as the right operand of :meth:`block_scores`' product, laid out
        as this library's GEMM runs fastest (made once per chunk of queries)."""
        ...

    def block_scores(
        self,
        corpus: ArrayT,
        rows: slice,
        operand: ArrayT,
        scale: ArrayT | None,
        shift: ArrayT | None,
        rows_of: Callable[[ArrayT], ArrayT] | None,
    ) -> ArrayT:
        """``rows_of(corpus[rows]) @ queries.T``, each row's scores times ``scale[rows]`` minus
        ``shift[rows]``: a ``(rows, queries)`` block on the device. ``rows_of`` (a decode, or a
        screen's frame) turns the block's codes into rows; ``None`` takes them as they are. Scores
        are float32, or (with neither scale nor shift, selected on the host) a bfloat16 product's
        own bfloat16 scores, which :meth:`host_block` hands over as their words."""
        ...

    def host_block(self, block: ArrayT) -> HostBlock:
        """A score block on the host as ``(rows, queries)`` float32, or a bfloat16 block as its
        int16 words (:data:`~embedtools.search.select.HostBlock`), sharing its memory where it can."""
        ...

    def device_candidates(self, block: ArrayT, m: int, threshold: npt.NDArray[np.float32]) -> Candidates:
        """:func:`embedtools.search.select.host_candidates`'s contract, selected on the device."""
        ...

    def nth_best(self, block: ArrayT, n: int) -> npt.NDArray[np.float32]:
        """Each query's n-th best score of a block, on the host (found on the device)."""
        ...

    def frame_rows(self, rows: ArrayT, scale: float, centre: ArrayT | None) -> ArrayT:
        """``rows * scale - centre`` in float32: rows in a certified l2 screen's frame."""
        ...

    def low_precision(self, kind: Quantization) -> LowPrecisionGemm[ArrayT] | None:
        """The library's own product on ``kind``'s codes (``bfloat16``, ``float16``, ``int8``), or
        ``None`` where it has none (NumPy: a certified screen then decodes blocks to float32). Its
        arithmetic is what :mod:`embedtools.search.certified` bounds: products of the rounded
        values, float32 accumulation, the result rounded to ``kind`` at most once; ``int8``'s
        integer product is exact, then scaled and offset per query in float32."""
        ...

    def host_matmul(self, a: npt.NDArray[HostFloat], b: npt.NDArray[HostFloat]) -> npt.NDArray[HostFloat]:
        """``np.matmul(a, b)`` of host arrays (stacked alike), run on this library's own CPU threads.
        Between a search's device GEMMs the host multiplies small operands (queries rotated for
        a funnel, a certified funnel's bound); through NumPy's BLAS its threads stay spinning
        after each call and take the cores a torch search's next GEMM needs."""
        ...

    def gemm_speedup(self, kind: Quantization) -> float:
        """How many times faster :meth:`low_precision`'s product ran than float32's on this
        device, timed once (one small GEMM each, on first ask) and kept on the instance; ``0.0``
        without a native product. The automatic screening rule reads it."""
        ...


class SearchBackend(ArrayBackend[ArrayT], BlockPrimitives[ArrayT], Protocol[ArrayT]):
    """A backend the bundled top-k (:func:`embedtools.search.exact.exact_topk`) runs on."""


class Backend(SearchBackend[ArrayT], ArrayOps[ArrayT], Protocol[ArrayT]):
    """Every bundled backend (what :func:`embedtools.make_backend` returns): all three Protocols."""


def block_primitives(backend: ArrayBackend[Any]) -> SearchBackend[Any] | None:
    """``backend`` as a :class:`SearchBackend`, or ``None`` where it lacks the block primitives
    (a user's own backend may provide only :class:`ArrayBackend`): checked by one of them, as a
    runtime-checkable Protocol would, without its cost per search."""
    return cast("SearchBackend[Any]", backend) if callable(getattr(backend, "low_precision", None)) else None


@dataclass(frozen=True)
class MemoryReport:
    """A snapshot of a byte budget: what is used, by whom, and what is left."""

    used_bytes: int
    limit_bytes: int
    by_owner: Mapping[str, int] = field(default_factory=dict[str, int])

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
