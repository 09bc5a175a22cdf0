"""Quantised companions of a table: float16, bfloat16, int8 (scalar, calibrated per dimension), binary.

A quantised index holds a table's vectors in fewer bytes and ranks rows approximately; the store
takes a shortlist of ``k × rescore`` rows from it and rescores those exactly against the float32
table (sentence-transformers' ``rescore_multiplier`` idea), so returned scores are always exact.

Codes are computed once on the host, with NumPy, so that every backend holds bit-identical codes
(a file saved from CUDA loads on a Mac with the same ranking), then live on the backend's device
beside their table. Searching them is the backend's own blocked ``topk`` with a ``decode`` step per
block of rows (``ArrayBackend.dequantize``): on a GPU the codes never leave it.

* ``float16``: half the bytes; ranks by ``q · x16`` (cosine by the table's float32 norms).
* ``bfloat16``: half the bytes, float32's range with 8 bits of mantissa; kept as raw 16-bit words
  (NumPy has no bfloat16 dtype), rounded to nearest even exactly as torch and MLX round, and
  decoded by torch and MLX through their own bfloat16 type.
* ``int8``: a quarter; per-dimension calibration ``x ≈ offset + scale · code`` from the table's
  own min/max (stored with the index).
* ``binary``: 1/32; the sign bit of each value, ranked by Hamming distance between the query's and
  the row's sign bits. Hamming is ranked as ``±1 · ±1 = d − 2·hamming`` through a GEMM over decoded
  blocks: BLAS (or a GPU) on unpacked bits is faster than popcount over ``queries × rows × d/8``
  bytes on these machines, and it gives the same integers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Generic

import numpy as np

from embedtools.errors import DimensionError, InvalidArgumentError
from embedtools.protocols import QUANTIZATIONS, ArrayBackend, ArrayT, Metric, Quantization

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["QUANTIZATIONS", "Quantization", "QuantizedIndex", "check_quantization"]

F32 = np.float32


def check_quantization(kind: object) -> Quantization:
    """One of ``QUANTIZATIONS``; anything but a str (a numpy array, whose ``==`` is elementwise) is refused."""
    for known in QUANTIZATIONS:
        if isinstance(kind, str) and kind == known:
            return known
    raise InvalidArgumentError(f"unknown quantization {kind!r}; expected one of {', '.join(QUANTIZATIONS)}")


def check_codes(kind: object, code_width: int, width: int, scale: object, offset: object) -> Quantization:
    """The checked kind for ``dequantize``: codes as wide as ``width`` needs (binary: a bit per
    dimension, in whole bytes), and a calibration for int8 only."""
    checked = check_quantization(kind)
    expected = (width + 7) // 8 if checked == "binary" else width
    if code_width != expected:
        raise DimensionError(f"{checked} codes of width {width} are {expected} wide, got {code_width}")
    if (checked == "int8") != (scale is not None and offset is not None):
        raise InvalidArgumentError(f"{checked} codes take {'a scale and an offset' if checked == 'int8' else 'no calibration'}")
    return checked


@dataclass(frozen=True)
class QuantizedIndex(Generic[ArrayT]):
    """One quantised copy of a ``rows × dimension`` table, as arrays of one library.

    ``QuantizedIndex[numpy array]`` is how an index is built, saved and loaded; the store keeps
    ``to_backend``'s copy on its device. ``scale``/``offset`` are int8's calibration.
    """

    kind: Quantization
    dimension: int
    rows: int
    codes: ArrayT
    scale: ArrayT | None = None
    offset: ArrayT | None = None

    @staticmethod
    def nbytes_for(kind: Quantization, rows: int, dimension: int) -> int:
        """Bytes an index of this kind takes, known before it is built (for the budget)."""
        if kind in ("float16", "bfloat16"):
            return rows * dimension * 2
        if kind == "int8":
            return rows * dimension + 2 * dimension * 4
        return rows * ((dimension + 7) // 8)

    @property
    def nbytes(self) -> int:
        return self.nbytes_for(self.kind, self.rows, self.dimension)

    @staticmethod
    def build(kind: Quantization, vectors: npt.NDArray[np.float32]) -> QuantizedIndex[npt.NDArray[Any]]:
        """The index of host float32 ``vectors`` (int8 is calibrated on them), encoded in chunks of
        rows so the host memory beyond the codes stays a few MiB whatever the table's size."""
        n, d = vectors.shape
        scale = offset = None
        if kind == "int8":
            low = vectors.min(axis=0) if n else np.zeros(d, dtype=F32)
            span = vectors.max(axis=0) - low if n else np.zeros(d, dtype=F32)
            scale = np.where(span > 0, span / 255.0, 1.0).astype(F32)
            offset = (low + 128 * scale).astype(F32)
        dtype = {"float16": np.float16, "bfloat16": np.uint16, "int8": np.int8, "binary": np.uint8}[kind]
        codes = np.empty((n, (d + 7) // 8 if kind == "binary" else d), dtype=dtype)
        step = max(1, _CHUNK_VALUES // max(d, 1))
        for start in range(0, n, step):
            chunk = np.asarray(vectors[start : start + step], dtype=F32)
            codes[start : start + step] = _encode(kind, chunk, scale, offset, start)
        return QuantizedIndex(kind, d, n, codes, scale=scale, offset=offset)

    def to_backend(self, backend: ArrayBackend[Any]) -> QuantizedIndex[Any]:
        """This (host) index on ``backend``'s device, same codes.

        bfloat16 words travel as ``int16`` (the same bits): every library and device has int16,
        while torch on MPS had no uint16 before 2.9 and torch before 2.3 none at all.
        """
        codes = np.asarray(self.codes)
        if self.kind == "bfloat16":
            codes = codes.view(np.int16)
        return QuantizedIndex(
            self.kind,
            self.dimension,
            self.rows,
            backend.from_numpy(codes, dtype=str(codes.dtype)),  # type: ignore[arg-type]
            scale=None if self.scale is None else backend.from_numpy(np.asarray(self.scale)),
            offset=None if self.offset is None else backend.from_numpy(np.asarray(self.offset)),
        )

    def to_host(self, backend: ArrayBackend[ArrayT]) -> QuantizedIndex[npt.NDArray[Any]]:
        """This (``backend``'s) index as host arrays, to save."""
        codes = backend.to_numpy(self.codes)
        return QuantizedIndex(
            self.kind,
            self.dimension,
            self.rows,
            codes.view(np.uint16) if self.kind == "bfloat16" else codes,  # files keep uint16 words
            scale=None if self.scale is None else backend.to_numpy(self.scale),
            offset=None if self.offset is None else backend.to_numpy(self.offset),
        )

    def decoder(self, backend: ArrayBackend[ArrayT]) -> Callable[[ArrayT], ArrayT]:
        """Decodes a block of this index's codes on ``backend`` (``topk``'s ``decode``)."""
        return partial(backend.dequantize, kind=self.kind, width=self.dimension, scale=self.scale, offset=self.offset)

    def ranking(self, queries: npt.NDArray[np.float32], metric: Metric) -> tuple[npt.NDArray[np.float32], Metric]:
        """The queries and metric this index ranks a shortlist by.

        Binary ranks by Hamming distance whatever the metric: the queries' own sign bits as ±1,
        scored by ``dot`` against the rows' ±1 (more agreement, smaller distance). The others rank
        by the search's own metric on decoded values.
        """
        if self.kind == "binary":
            return np.where(queries > 0, F32(1), F32(-1)), "dot"
        return queries, metric


#: Values encoded at a time by :meth:`QuantizedIndex.build` (4 MiB of float32).
_CHUNK_VALUES = 1 << 20


def _encode(
    kind: Quantization,
    chunk: npt.NDArray[np.float32],
    scale: npt.NDArray[np.float32] | None,
    offset: npt.NDArray[np.float32] | None,
    first_row: int,
) -> npt.NDArray[Any]:
    """Codes of a chunk of rows (``first_row`` places errors in the whole table)."""
    if kind == "float16":
        with np.errstate(over="ignore"):
            halves = chunk.astype(np.float16)
        _check_in_range(kind, np.isfinite(halves), chunk, first_row)
        return halves
    if kind == "bfloat16":
        words = _to_bfloat16_bits(chunk)
        _check_in_range(kind, (words & np.uint16(0x7F80)) != 0x7F80, chunk, first_row)
        return words
    if kind == "binary":
        bits: npt.NDArray[np.uint8] = np.packbits(chunk > 0, axis=1)
        return bits
    assert scale is not None and offset is not None
    steps: npt.NDArray[np.int8] = np.clip(np.rint((chunk - offset) / scale), -128, 127).astype(np.int8)
    return steps


def _check_in_range(
    kind: Quantization, finite: npt.NDArray[np.bool_], chunk: npt.NDArray[np.float32], first_row: int
) -> None:
    """Refuse values a 16-bit float cannot hold: they would become inf, rank as NaN, and make a file
    that the format's own checks refuse to load."""
    if not finite.all():
        row, col = (int(i) for i in np.argwhere(~finite)[0])
        raise InvalidArgumentError(
            f"{kind} cannot hold {float(chunk[row, col]):g} (row {first_row + row}, column {col}): the table has values "
            f"beyond {kind}'s range; use {'bfloat16 or int8' if kind == 'float16' else 'int8'}"
        )


def _to_bfloat16_bits(vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    """bfloat16 as its 16 raw bits (NumPy has no bfloat16 dtype): float32's top half, rounded to
    nearest even — the same values torch's and MLX's bfloat16 hold."""
    bits = np.ascontiguousarray(vectors, dtype=F32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out: npt.NDArray[np.uint16] = ((bits + rounding) >> np.uint32(16)).astype(np.uint16)
    return out
