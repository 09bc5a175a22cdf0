"""Quantised companions of a table, one codec per kind in one registry (:data:`CODECS`).

A quantised index holds a table's vectors in fewer bytes and ranks rows approximately; the store
takes a shortlist of ``k × rescore`` rows from it and rescores those exactly against the float32
table (sentence-transformers' ``rescore_multiplier`` idea), so returned scores are always exact.

Everything kind-specific lives in the kind's :class:`Codec` and nowhere else: its bytes per row
(what the store bills), how float32 rows become codes, the tensors it keeps in a file and the checks
they pass at load, the parameters of the backend's ``dequantize`` primitive, and how a query is
ranked against it. The store, the file format, its records and ``study`` ask the registry, so a new
kind is a new codec here (plus a ``dequantize`` branch in the backends if no existing kernel decodes
its codes: :attr:`Codec.kernel`).

Codes are computed once on the host, with NumPy, so that every backend holds bit-identical codes
(a file saved from CUDA loads on a Mac with the same ranking), then live on the backend's device
beside their table, decoded there one block of rows at a time: on a GPU the codes never leave it.

* ``float16``: half the bytes; ranks by ``q · x16`` (cosine by the table's float32 norms).
* ``bfloat16``: half the bytes, float32's range with 8 bits of mantissa; kept as raw 16-bit words
  (NumPy has no bfloat16 dtype), rounded to nearest even exactly as torch and MLX round, and
  decoded by torch and MLX through their own bfloat16 type.
* ``int8``: a quarter; per-dimension calibration ``x ≈ offset + scale · code`` from the table's
  own min/max (stored with the index).
* ``binary``: 1/32; the sign bit of each value, ranked by Hamming distance between the query's and
  the row's sign bits. Hamming is ranked as ``±1 · ±1 = d − 2·hamming`` through the same GEMM over
  decoded blocks as every other kind: no popcount kernel per backend, and the same integers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Generic

import numpy as np

from embedtools.errors import DimensionError, InvalidArgumentError
from embedtools.protocols import QUANTIZATIONS, ArrayBackend, ArrayT, Metric, Quantization

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = [
    "CODECS",
    "QUANTIZATIONS",
    "Calibration",
    "Codec",
    "Quantization",
    "QuantizedIndex",
    "TensorSpec",
    "check_codes",
    "check_quantization",
    "register_codec",
    "unregister_codec",
]

F32 = np.float32
_F32 = np.dtype(np.float32)

#: Values encoded at a time by :meth:`QuantizedIndex.build` (4 MiB of float32).
_CHUNK_VALUES = 1 << 20

#: A per-dimension calibration, ``(scale, offset)``: ``x ≈ offset + scale · code``.
Calibration = tuple["npt.NDArray[np.float32]", "npt.NDArray[np.float32]"]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor a codec keeps in a file: its NumPy dtype (the file format names it) and shape."""

    dtype: np.dtype[Any]
    shape: tuple[int, ...]


class Codec(ABC):
    """One quantisation kind: every fact about it that the store, the file and the backends use.

    Codecs hold no state; the registry holds one instance per kind. A calibrated codec carries a
    per-dimension ``scale`` and ``offset`` (the only decode parameters the backends' ``dequantize``
    primitive takes), saved as the tensors ``scale`` and ``offset`` beside ``codes``.
    """

    #: The kind's name: in ``quantize(d, kind)``, in file headers and tensor names.
    kind: ClassVar[Quantization]
    #: The codes' dtype on the host and in the file.
    dtype: ClassVar[np.dtype[Any]]
    #: The dtype codes travel to a backend as (the same bits): one every library and device has.
    device_dtype: ClassVar[np.dtype[Any]]
    #: Whether the codes carry a ``(scale, offset)`` calibration.
    calibrated: ClassVar[bool] = False

    @property
    def kernel(self) -> Quantization:
        """The ``kind`` the backends' ``dequantize`` is called with: a codec whose codes an existing
        kernel decodes (another encoder of int8 steps, say) names it and needs no backend code."""
        return self.kind

    def code_width(self, width: int) -> int:
        """Code columns of a row of ``width`` dimensions."""
        return width

    def nbytes(self, rows: int, width: int) -> int:
        """Bytes an index of ``rows`` rows takes, known before it is built: what the store bills."""
        calibration = 2 * width * _F32.itemsize if self.calibrated else 0
        return rows * self.code_width(width) * self.dtype.itemsize + calibration

    def calibrate(self, vectors: npt.NDArray[np.float32]) -> Calibration | None:
        """The calibration of the whole table (``None`` for an uncalibrated codec)."""
        return None

    @abstractmethod
    def encode(self, chunk: npt.NDArray[np.float32], calibration: Calibration | None, first_row: int) -> npt.NDArray[Any]:
        """Codes of a chunk of float32 rows; refuses values the kind cannot hold with an
        :class:`InvalidArgumentError` naming the row in the whole table (``first_row`` + row)."""

    def file_tensors(self, rows: int, width: int) -> dict[str, TensorSpec]:
        """The tensors an index keeps in a file, by name (``{d}d/quantized.{kind}.{name}``)."""
        tensors = {"codes": TensorSpec(self.dtype, (rows, self.code_width(width)))}
        if self.calibrated:
            tensors.update(scale=TensorSpec(_F32, (width,)), offset=TensorSpec(_F32, (width,)))
        return tensors

    def problem(self, tensors: Mapping[str, npt.NDArray[Any]], width: int) -> str | None:
        """What is wrong with tensors of the right names, dtypes and shapes read from a file (``None``
        if nothing): values ``save`` could not have written, which would rank as NaN or not at all."""
        if not self.calibrated:
            return None
        scale, offset = tensors["scale"], tensors["offset"]
        if not (np.isfinite(scale).all() and np.isfinite(offset).all() and (scale > 0).all()):
            return "has a bad calibration (scale must be finite and positive)"
        return None

    def ranking(self, queries: npt.NDArray[np.float32], metric: Metric) -> tuple[npt.NDArray[np.float32], Metric]:
        """The queries and metric a shortlist is ranked by: the search's own, on decoded values."""
        return queries, metric


def _refuse(kind: str, fits: npt.NDArray[np.bool_], chunk: npt.NDArray[np.float32], first_row: int, instead: str) -> None:
    """Refuse values a 16-bit float cannot hold: they would become inf, rank as NaN, and make a file
    that the format's own checks refuse to load."""
    if not fits.all():
        row, col = (int(i) for i in np.argwhere(~fits)[0])
        raise InvalidArgumentError(
            f"{kind} cannot hold {float(chunk[row, col]):g} (row {first_row + row}, column {col}): the table has values "
            f"beyond {kind}'s range; use {instead}"
        )


def _finite_problem(values: npt.NDArray[Any]) -> str | None:
    return None if np.isfinite(values).all() else "holds NaN or infinite values"


class _Float16Codec(Codec):
    kind = "float16"
    dtype = device_dtype = np.dtype(np.float16)

    def encode(self, chunk: npt.NDArray[np.float32], calibration: Calibration | None, first_row: int) -> npt.NDArray[Any]:
        with np.errstate(over="ignore"):
            halves = chunk.astype(np.float16)
        _refuse(self.kind, np.isfinite(halves), chunk, first_row, "bfloat16 or int8")
        return halves

    def problem(self, tensors: Mapping[str, npt.NDArray[Any]], width: int) -> str | None:
        return _finite_problem(tensors["codes"])


class _BFloat16Codec(Codec):
    """Raw 16-bit words in files (uint16, as NumPy must hold them); ``int16`` on a backend, because
    every library and device has it, while torch on MPS had no uint16 before 2.9 and torch before
    2.3 none at all."""

    kind = "bfloat16"
    dtype = np.dtype(np.uint16)
    device_dtype = np.dtype(np.int16)

    def encode(self, chunk: npt.NDArray[np.float32], calibration: Calibration | None, first_row: int) -> npt.NDArray[Any]:
        words = _to_bfloat16_bits(chunk)
        _refuse(self.kind, (words & np.uint16(0x7F80)) != 0x7F80, chunk, first_row, "int8")
        return words

    def problem(self, tensors: Mapping[str, npt.NDArray[Any]], width: int) -> str | None:
        return _finite_problem((tensors["codes"].astype(np.uint32) << np.uint32(16)).view(np.float32))


class _Int8Codec(Codec):
    kind = "int8"
    dtype = device_dtype = np.dtype(np.int8)
    calibrated = True

    def calibrate(self, vectors: npt.NDArray[np.float32]) -> Calibration:
        """Per-dimension min/max over the table, 255 steps between them (a constant column: step 1)."""
        n, d = vectors.shape
        low = vectors.min(axis=0) if n else np.zeros(d, dtype=F32)
        span = vectors.max(axis=0) - low if n else np.zeros(d, dtype=F32)
        scale = np.where(span > 0, span / 255.0, 1.0).astype(F32)
        return scale, (low + 128 * scale).astype(F32)

    def encode(self, chunk: npt.NDArray[np.float32], calibration: Calibration | None, first_row: int) -> npt.NDArray[Any]:
        assert calibration is not None
        scale, offset = calibration
        steps: npt.NDArray[np.int8] = np.clip(np.rint((chunk - offset) / scale), -128, 127).astype(np.int8)
        return steps


class _BinaryCodec(Codec):
    """Sign bits packed eight to a byte, most significant first (``numpy.packbits``)."""

    kind = "binary"
    dtype = device_dtype = np.dtype(np.uint8)

    def code_width(self, width: int) -> int:
        return (width + 7) // 8

    def encode(self, chunk: npt.NDArray[np.float32], calibration: Calibration | None, first_row: int) -> npt.NDArray[Any]:
        bits: npt.NDArray[np.uint8] = np.packbits(chunk > 0, axis=1)
        return bits

    def problem(self, tensors: Mapping[str, npt.NDArray[Any]], width: int) -> str | None:
        """The bits past ``width`` in a row's last byte are zero, as ``packbits`` writes them."""
        padding = np.uint8((1 << (8 * self.code_width(width) - width)) - 1)
        codes = tensors["codes"]
        if padding and codes.size and (codes[:, -1] & padding).any():
            return "has bits set past the table's width"
        return None

    def ranking(self, queries: npt.NDArray[np.float32], metric: Metric) -> tuple[npt.NDArray[np.float32], Metric]:
        """Hamming distance whatever the metric: the queries' own sign bits as ±1, scored by ``dot``
        against the rows' ±1 (more agreement, smaller distance)."""
        return np.where(queries > 0, F32(1), F32(-1)), "dot"


_REGISTRY: dict[Quantization, Codec] = {codec.kind: codec for codec in (_Float16Codec(), _BFloat16Codec(), _Int8Codec(), _BinaryCodec())}
assert tuple(_REGISTRY) == QUANTIZATIONS, "the built-in codecs are the Quantization literal's kinds, in its order"

#: Every quantisation kind's codec, by kind: the built-ins (:data:`QUANTIZATIONS`) and any registered.
CODECS: Mapping[Quantization, Codec] = MappingProxyType(_REGISTRY)


def register_codec(codec: Codec) -> None:
    """Make ``codec``'s kind usable everywhere a kind is (quantize, search, save, load).

    A kind name that exists already is refused: files name kinds, so a kind means one encoding.
    """
    if codec.kind in _REGISTRY:
        raise InvalidArgumentError(f"quantization {codec.kind!r} is registered already")
    if codec.kernel not in _REGISTRY and codec.kernel != codec.kind:
        raise InvalidArgumentError(f"codec {codec.kind!r} decodes with unknown kernel {codec.kernel!r}")
    _REGISTRY[codec.kind] = codec


def unregister_codec(kind: str) -> None:
    """Remove a kind :func:`register_codec` added (built-in kinds stay: files name them)."""
    if kind in QUANTIZATIONS or kind not in _REGISTRY:
        raise InvalidArgumentError(f"quantization {kind!r} is not a registered extra kind")
    del _REGISTRY[kind]


def check_quantization(kind: object) -> Quantization:
    """A registered kind; anything but a str (a numpy array, whose ``==`` is elementwise) is refused."""
    for known in _REGISTRY:
        if isinstance(kind, str) and kind == known:
            return known
    raise InvalidArgumentError(f"unknown quantization {kind!r}; expected one of {', '.join(_REGISTRY)}")


def check_codes(kind: object, code_width: int, width: int, scale: object, offset: object) -> Quantization:
    """The checked kind for ``dequantize``: codes as wide as the codec makes them at ``width``, and a
    calibration exactly when the codec has one."""
    checked = check_quantization(kind)
    codec = _REGISTRY[checked]
    expected = codec.code_width(width)
    if code_width != expected:
        raise DimensionError(f"{checked} codes of width {width} are {expected} wide, got {code_width}")
    if codec.calibrated != (scale is not None and offset is not None):
        raise InvalidArgumentError(f"{checked} codes take {'a scale and an offset' if codec.calibrated else 'no calibration'}")
    return checked


@dataclass(frozen=True)
class QuantizedIndex(Generic[ArrayT]):
    """One quantised copy of a ``rows × dimension`` table, as arrays of one library.

    ``QuantizedIndex[numpy array]`` is how an index is built, saved and loaded; the store keeps
    ``to_backend``'s copy on its device. ``scale``/``offset`` are a calibrated codec's (int8's).
    """

    kind: Quantization
    dimension: int
    rows: int
    codes: ArrayT
    scale: ArrayT | None = None
    offset: ArrayT | None = None

    @property
    def codec(self) -> Codec:
        return CODECS[self.kind]

    @staticmethod
    def nbytes_for(kind: Quantization, rows: int, dimension: int) -> int:
        """Bytes an index of this kind takes, known before it is built (for the budget)."""
        return CODECS[check_quantization(kind)].nbytes(rows, dimension)

    @property
    def nbytes(self) -> int:
        return self.codec.nbytes(self.rows, self.dimension)

    @staticmethod
    def build(
        kind: Quantization, vectors: npt.NDArray[np.float32], *, chunk_values: int = _CHUNK_VALUES
    ) -> QuantizedIndex[npt.NDArray[Any]]:
        """The index of host float32 ``vectors`` (calibrated on them), encoded in chunks of whole rows
        of about ``chunk_values`` values, so the host memory beyond the codes stays a few MiB
        whatever the table's size."""
        codec = CODECS[check_quantization(kind)]
        n, d = vectors.shape
        calibration = codec.calibrate(vectors)
        codes = np.empty((n, codec.code_width(d)), dtype=codec.dtype)
        step = max(1, chunk_values // max(d, 1))
        for start in range(0, n, step):
            chunk = np.asarray(vectors[start : start + step], dtype=F32)
            codes[start : start + step] = codec.encode(chunk, calibration, start)
        scale, offset = calibration if calibration is not None else (None, None)
        return QuantizedIndex(codec.kind, d, n, codes, scale=scale, offset=offset)

    def to_backend(self, backend: ArrayBackend[Any]) -> QuantizedIndex[Any]:
        """This (host) index on ``backend``'s device, same codes (as the codec's ``device_dtype``)."""
        codes = np.asarray(self.codes).view(self.codec.device_dtype)
        return QuantizedIndex(
            self.kind,
            self.dimension,
            self.rows,
            backend.from_numpy(codes, dtype=str(codes.dtype)),  # type: ignore[arg-type]
            scale=None if self.scale is None else backend.from_numpy(np.asarray(self.scale)),
            offset=None if self.offset is None else backend.from_numpy(np.asarray(self.offset)),
        )

    def to_host(self, backend: ArrayBackend[ArrayT]) -> QuantizedIndex[npt.NDArray[Any]]:
        """This (``backend``'s) index as host arrays in the file's dtypes, to save."""
        return QuantizedIndex(
            self.kind,
            self.dimension,
            self.rows,
            backend.to_numpy(self.codes).view(self.codec.dtype),
            scale=None if self.scale is None else backend.to_numpy(self.scale),
            offset=None if self.offset is None else backend.to_numpy(self.offset),
        )

    def decoder(self, backend: ArrayBackend[ArrayT]) -> Callable[[ArrayT], ArrayT]:
        """Decodes a block of this index's codes on ``backend`` (``topk``'s ``decode``)."""
        return partial(backend.dequantize, kind=self.codec.kernel, width=self.dimension, scale=self.scale, offset=self.offset)

    def ranking(self, queries: npt.NDArray[np.float32], metric: Metric) -> tuple[npt.NDArray[np.float32], Metric]:
        """The queries and metric this index ranks a shortlist by (see :meth:`Codec.ranking`)."""
        return self.codec.ranking(queries, metric)

    # ------------------------------------------------------------------------------------ files

    @staticmethod
    def file_tensors_for(kind: Quantization, rows: int, dimension: int) -> dict[str, TensorSpec]:
        """The tensors a file holds for an index of this kind, by name, known from the header."""
        return CODECS[check_quantization(kind)].file_tensors(rows, dimension)

    def file_tensors(self) -> dict[str, npt.NDArray[Any]]:
        """This host index's tensors for a file, by the names of :meth:`file_tensors_for`."""
        tensors: dict[str, npt.NDArray[Any]] = {"codes": np.ascontiguousarray(self.codes)}
        if self.scale is not None and self.offset is not None:
            tensors.update(scale=np.asarray(self.scale), offset=np.asarray(self.offset))
        return tensors

    @staticmethod
    def from_file(kind: Quantization, dimension: int, tensors: Mapping[str, npt.NDArray[Any]]) -> QuantizedIndex[npt.NDArray[Any]] | str:
        """The index that tensors read from a file hold, or what is wrong with them (a phrase for
        the format's message). Their names, dtypes and shapes were checked against the header."""
        codec = CODECS[check_quantization(kind)]
        problem = codec.problem(tensors, dimension)
        if problem is not None:
            return problem
        codes = tensors["codes"]
        if not codec.calibrated:
            return QuantizedIndex(codec.kind, dimension, int(codes.shape[0]), codes)
        return QuantizedIndex(codec.kind, dimension, int(codes.shape[0]), codes, scale=tensors["scale"], offset=tensors["offset"])


def _to_bfloat16_bits(vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    """bfloat16 as its 16 raw bits (NumPy has no bfloat16 dtype): float32's top half, rounded to
    nearest even — the same values torch's and MLX's bfloat16 hold."""
    bits = np.ascontiguousarray(vectors, dtype=F32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out: npt.NDArray[np.uint16] = ((bits + rounding) >> np.uint32(16)).astype(np.uint16)
    return out
