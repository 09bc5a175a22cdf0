"""Quantised companions of a table: float16, int8 (scalar, calibrated per dimension) and binary.

A quantised index holds a table's vectors in fewer bytes and ranks rows approximately; the store
takes a shortlist of ``k × rescore`` rows from it and rescores those exactly against the float32
table (sentence-transformers' ``rescore_multiplier`` idea), so returned scores are always exact.

The indexes live in host memory as NumPy arrays whatever the backend (their kernels are NumPy's
BLAS): a first step that makes their memory and recall measurable; moving them onto torch/MLX
devices is left for later.

* ``float16``: half the bytes; ranks by ``q · x16`` (cosine by the table's float32 norms).
* ``bfloat16``: half the bytes, float32's range with 8 bits of mantissa; kept as raw 16-bit words
  (NumPy has no bfloat16 dtype), rounded to nearest even exactly as torch and MLX round.
* ``int8``: a quarter; per-dimension calibration ``x ≈ offset + scale · code`` from the table's
  own min/max (stored with the index), ranked by ``(q ⊙ scale) · code + q · offset``.
* ``binary``: 1/32; the sign bit of each value, ranked by Hamming distance between the query's and
  the row's sign bits. Hamming is computed as ``(d − (±1 · ±1)) / 2`` through a float GEMM over
  unpacked blocks: on these machines BLAS on unpacked bits is faster than NumPy's popcount over
  ``queries × rows × d/8`` bytes, and it gives the same integers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from embedtools.errors import InvalidArgumentError
from embedtools.protocols import Metric
from embedtools.search import host_candidates, run_topk

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["QUANTIZATIONS", "Quantization", "QuantizedIndex", "check_quantization"]

Quantization = Literal["float16", "bfloat16", "int8", "binary"]
QUANTIZATIONS: tuple[Quantization, ...] = ("float16", "bfloat16", "int8", "binary")

F32 = np.float32


def check_quantization(kind: object) -> Quantization:
    for known in QUANTIZATIONS:
        if kind == known:
            return known
    raise InvalidArgumentError(f"unknown quantization {kind!r}; expected one of {', '.join(QUANTIZATIONS)}")


@dataclass(frozen=True)
class QuantizedIndex:
    """One quantised copy of a table (host arrays); ``scale``/``offset`` are int8's calibration."""

    kind: Quantization
    dimension: int
    codes: npt.NDArray[np.generic]
    scale: npt.NDArray[np.float32] | None = None
    offset: npt.NDArray[np.float32] | None = None

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
        extra = sum(a.nbytes for a in (self.scale, self.offset) if a is not None)
        return int(self.codes.nbytes) + extra

    @classmethod
    def build(cls, kind: Quantization, vectors: npt.NDArray[np.float32]) -> QuantizedIndex:
        d = vectors.shape[1]
        if kind == "float16":
            return cls(kind, d, vectors.astype(np.float16))
        if kind == "bfloat16":
            return cls(kind, d, _to_bfloat16_bits(vectors))
        if kind == "binary":
            return cls(kind, d, np.packbits(vectors > 0, axis=1))
        low = vectors.min(axis=0)
        span = vectors.max(axis=0) - low
        scale = np.where(span > 0, span / 255.0, 1.0).astype(F32)
        codes = np.clip(np.rint((vectors - low) / scale) - 128, -128, 127).astype(np.int8)
        return cls(kind, d, codes, scale=scale, offset=(low + 128 * scale).astype(F32))

    def decoded(self, rows: slice) -> npt.NDArray[np.float32]:
        """Float32 values of a block of rows as this index represents them."""
        if self.kind == "float16":
            return self.codes[rows].astype(F32)
        if self.kind == "bfloat16":
            return (np.asarray(self.codes[rows], dtype=np.uint32) << np.uint32(16)).view(F32)
        if self.kind == "binary":
            signs = np.unpackbits(np.asarray(self.codes[rows], dtype=np.uint8), axis=1, count=self.dimension).astype(F32)
            return 2 * signs - 1
        assert self.scale is not None and self.offset is not None
        return self.codes[rows].astype(F32) * self.scale + self.offset

    def shortlist(
        self,
        queries: npt.NDArray[np.float32],
        size: int,
        metric: Metric,
        norms: npt.NDArray[np.float32],
        max_block_bytes: int,
    ) -> npt.NDArray[np.int64]:
        """The ``size`` best rows per query by this index's approximate scores."""
        n = self.codes.shape[0]
        if self.kind == "binary":
            # Hamming ranking: larger ±1 agreement is a smaller Hamming distance, whatever the metric.
            q = np.where(queries > 0, 1.0, -1.0).astype(F32)
            column_scale = column_shift = None
        else:
            q = queries
            safe = np.where(norms > 0, norms, 1).astype(F32)
            column_scale = 1 / safe if metric == "cosine" else None
            column_shift = 0.5 * norms * norms if metric == "l2" else None

        def score_block(qs: slice, rs: slice) -> npt.NDArray[np.float32]:
            block: npt.NDArray[np.float32] = self.decoded(rs) @ q[qs].T
            if column_scale is not None:
                block *= column_scale[rs, None]
            if column_shift is not None:
                block -= column_shift[rs, None]
            return block

        def no_rescoring(qs: slice, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
            return np.zeros(idx.shape, dtype=F32)  # pragma: no cover - the ranking metric is never l2 here

        _, indices = run_topk(
            q.shape[0],
            n,
            self.dimension,
            min(size, n),
            "dot",
            max_block_bytes,
            score_block=score_block,
            candidates=host_candidates,
            to_host=lambda block: np.ascontiguousarray(block.T),
            l2_distances=no_rescoring,
            settle_ties=False,  # a shortlist, rescored exactly afterwards: its ties need no settling
        )
        return indices


def _to_bfloat16_bits(vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    """bfloat16 as its 16 raw bits (NumPy has no bfloat16 dtype): float32's top half, rounded to
    nearest even — the same values torch's and MLX's bfloat16 hold."""
    bits = np.ascontiguousarray(vectors, dtype=F32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out: npt.NDArray[np.uint16] = ((bits + rounding) >> np.uint32(16)).astype(np.uint16)
    return out
