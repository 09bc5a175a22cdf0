"""NumPy backend: the reference implementation, and the default on every machine."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from embedtools.backends._dtypes import dtype_table, lookup_dtype
from embedtools.backends._norms import COSINE_RANGE, SQUARES_RANGE
from embedtools.backends._shared import SharedOps
from embedtools.errors import DimensionError, InvalidArgumentError
from embedtools.protocols import Capabilities, DTypeName, LowPrecisionGemm, Quantization
from embedtools.quantize import check_codes
from embedtools.search.exact import BlockedTopk
from embedtools.search.merge import host_nth_best
from embedtools.search.select import Candidates, host_candidates

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["NumpyBackend"]

F32 = np.float32

_DTYPES: dict[str, np.dtype[Any]] = dtype_table(np.dtype)


def _np_dtype(dtype: str) -> np.dtype[Any]:
    return lookup_dtype(_DTYPES, dtype)


class NumpyBackend(SharedOps["npt.NDArray[Any]"], BlockedTopk["npt.NDArray[Any]"]):
    """Arrays are ``numpy.ndarray`` on the host; matmul goes to the BLAS numpy was built with."""

    name: str = "numpy"
    device: str = "cpu"
    #: Blocks are already host memory: NumPy's selection needs no copy, and blocks are cache-sized.
    capabilities: Capabilities = Capabilities(select_on_device=False, gpu=False)

    def __init__(self) -> None:
        self._halves: npt.NDArray[np.float32] | None = None

    def _half_table(self) -> npt.NDArray[np.float32]:
        """float32 value of every float16 bit pattern (256 KiB, built on first use): a lookup
        decodes a block of float16 codes faster than NumPy's own float16 cast."""
        if self._halves is None:
            self._halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(F32)
        return self._halves

    def __repr__(self) -> str:
        return "NumpyBackend()"

    def asarray(self, data: object, dtype: DTypeName = "float32") -> npt.NDArray[Any]:
        return np.array(data, dtype=_np_dtype(dtype))

    def from_numpy(self, array: npt.NDArray[Any], dtype: DTypeName = "float32") -> npt.NDArray[Any]:
        return np.asarray(array, dtype=_np_dtype(dtype))

    def to_numpy(self, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return np.asarray(array)

    def convert(self, array: object) -> npt.NDArray[Any]:
        if isinstance(array, np.ndarray):
            return cast("npt.NDArray[Any]", array)  # isinstance leaves shape and dtype unknown
        if hasattr(array, "__dlpack__"):  # which does not narrow to numpy's (private) _SupportsDLPack
            try:
                shared: npt.NDArray[Any] = np.from_dlpack(cast(Any, array))  # torch on CPU, MLX: zero-copy
                return shared
            except (BufferError, RuntimeError, TypeError, ValueError):
                pass  # a device tensor (CUDA/MPS) or a dtype numpy lacks: copy through the host
        cpu = getattr(array, "cpu", None)
        host: object = cast(Any, cpu()).detach() if callable(cpu) else array  # a torch tensor on CUDA/MPS
        return np.asarray(host)

    def free_bytes(self) -> int | None:
        return None

    def dtype(self, array: npt.NDArray[Any]) -> str:
        return str(array.dtype)

    def nbytes(self, array: npt.NDArray[Any]) -> int:
        return int(array.nbytes)

    def zeros(self, shape: tuple[int, ...], dtype: DTypeName = "float32") -> npt.NDArray[Any]:
        return np.zeros(shape, dtype=_np_dtype(dtype))

    def ones(self, shape: tuple[int, ...], dtype: DTypeName = "float32") -> npt.NDArray[Any]:
        return np.ones(shape, dtype=_np_dtype(dtype))

    def random_normal(self, shape: tuple[int, ...],
                      *, seed: int | None = None, mean: float = 0.0, std: float = 1.0,
                      dtype: DTypeName = "float32") -> npt.NDArray[Any]:  # fmt: skip
        target = _np_dtype(dtype)
        if target.kind != "f":
            raise InvalidArgumentError(f"random_normal needs a float dtype, got {dtype!r}")
        samples = np.random.default_rng(seed).standard_normal(shape, dtype=np.float64)
        return (samples * std + mean).astype(target)

    def matmul(self, a: npt.NDArray[Any], b: npt.NDArray[Any]) -> npt.NDArray[Any]:
        out: npt.NDArray[Any] = np.matmul(a, b)
        return out

    def row_norms(self, a: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        x = np.asarray(a, dtype=F32)
        squares = np.einsum("ij,ij->i", x, x) if x.ndim == 2 else np.asarray(np.dot(x, x))
        out: npt.NDArray[np.float32] = np.sqrt(squares, dtype=F32)
        low, high = SQUARES_RANGE
        odd = ~((squares >= low) & (squares <= high))  # beyond float32's squares (see _norms)
        if odd.any():  # on the host, float64 holds every float32 square: no scaling needed
            if x.ndim == 1:
                with np.errstate(over="ignore"):
                    return np.asarray(np.sqrt(np.dot(x.astype(np.float64), x.astype(np.float64))), dtype=F32)
            wide = x[odd].astype(np.float64)
            with np.errstate(over="ignore"):  # a norm beyond float32 is inf, which add refuses
                out[odd] = np.sqrt(np.einsum("ij,ij->i", wide, wide))
        return out

    def normalize(self, a: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        x = np.asarray(a, dtype=F32)
        norms = self.row_norms(x)
        divisor = _safe_divisor(norms)
        out: npt.NDArray[np.float32] = x / (divisor[..., None] if x.ndim > 1 else divisor)
        low, high = COSINE_RANGE
        odd = (norms > 0) & ((norms < low) | (norms > high))
        if odd.any():  # a norm down there may be a float32 subnormal, too coarse to divide by
            wide = (x[odd] if x.ndim > 1 else x).astype(np.float64)
            unit: npt.NDArray[np.float32] = (wide / np.sqrt(np.einsum("...d,...d->...", wide, wide))[..., None]).astype(F32)
            if x.ndim == 1:
                return unit
            out[odd] = unit
        return out

    def cosine_similarity(self, a: npt.NDArray[Any], b: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        a2 = np.atleast_2d(np.asarray(a, dtype=F32))
        b2 = np.atleast_2d(np.asarray(b, dtype=F32))
        if a2.shape[1] != b2.shape[1]:
            raise DimensionError(f"cannot compare width {a2.shape[1]} with width {b2.shape[1]}")
        out: npt.NDArray[np.float32] = self.normalize(a2) @ self.normalize(b2).T
        return out

    def concatenate(self, arrays: Sequence[npt.NDArray[Any]], axis: int = 0) -> npt.NDArray[Any]:
        return np.concatenate(list(arrays), axis=axis)

    def stack(self, arrays: Sequence[npt.NDArray[Any]], axis: int = 0) -> npt.NDArray[Any]:
        return np.stack(list(arrays), axis=axis)

    def take_rows(self, array: npt.NDArray[Any], indices: npt.NDArray[np.int64]) -> npt.NDArray[Any]:
        # taken by the flat indices and reshaped: np.take with a 2-D index array ran slower
        host, where = np.asarray(array), np.asarray(indices, dtype=np.int64)
        out: npt.NDArray[Any] = np.take(host, where.reshape(-1), axis=0).reshape(*where.shape, *host.shape[1:])
        return out

    def dequantize(self, codes: npt.NDArray[Any], kind: Quantization,
                   *, width: int, scale: npt.NDArray[Any] | None = None,
                   offset: npt.NDArray[Any] | None = None) -> npt.NDArray[np.float32]:  # fmt: skip
        c = np.asarray(codes)
        kind = check_codes(kind, c.shape[-1], width, scale, offset)
        if kind == "float16":
            out = self._half_table().take(np.ascontiguousarray(c, dtype=np.float16).view(np.uint16))
        elif kind == "bfloat16":
            out = (c.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(F32)  # int16 or uint16 words
        elif kind == "binary":
            out = np.unpackbits(c.astype(np.uint8, copy=False), axis=-1, count=width).astype(F32)
            out *= 2
            out -= 1
        else:
            assert scale is not None and offset is not None
            out = c.astype(F32)
            out *= scale
            out += offset
        return out

    def float32(self, array: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        return np.asarray(array, dtype=F32)

    def query_operand(self, queries: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        # blocks are (rows, queries): OpenBLAS ran this GEMM shape faster than (queries, rows); a
        # contiguous copy (made once per chunk of queries) ran each block's GEMM faster than the
        # transposed view did
        return np.ascontiguousarray(queries.T)

    def block_scores(self, corpus: npt.NDArray[Any], rows: slice,
                     operand: npt.NDArray[np.float32], scale: npt.NDArray[np.float32] | None,
                     shift: npt.NDArray[np.float32] | None,
                     rows_of: Callable[[npt.NDArray[Any]], npt.NDArray[Any]] | None) -> npt.NDArray[np.float32]:  # fmt: skip
        block: npt.NDArray[np.float32] = (corpus[rows] if rows_of is None else rows_of(corpus[rows])) @ operand
        if scale is not None:
            block *= scale[rows, None]
        if shift is not None:
            block -= shift[rows, None]
        return block

    def host_block(self, block: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return block

    def device_candidates(self, block: npt.NDArray[np.float32], m: int, threshold: npt.NDArray[np.float32]) -> Candidates:
        return host_candidates(block, m, threshold)

    def nth_best(self, block: npt.NDArray[np.float32], n: int) -> npt.NDArray[np.float32]:
        return host_nth_best(block.T, n)

    def frame_rows(self, rows: npt.NDArray[Any], scale: float, centre: npt.NDArray[np.float32] | None) -> npt.NDArray[np.float32]:
        out: npt.NDArray[np.float32] = rows * F32(scale) if scale != 1.0 else rows
        return out - centre if centre is not None else out

    def low_precision(self, kind: Quantization) -> LowPrecisionGemm[npt.NDArray[Any]] | None:
        """None: NumPy has no bf16/fp16 GEMM; a certified screen decodes blocks to float32 (correct, not faster)."""
        return None

    def gemm_speedup(self, kind: Quantization) -> float:
        """Never measured: without a native product there is nothing to time."""
        return 0.0


def _safe_divisor(norms: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Norms with zeros replaced by one, so zero vectors divide to zero instead of NaN."""
    return np.where(norms > 0, norms, F32(1.0))
