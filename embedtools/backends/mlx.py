"""MLX backend: Apple's array library, on the GPU (Metal) or the CPU (also on Linux, ``mlx[cpu]``).

Every operation runs on the device chosen at construction, passed as ``stream=`` to each call, so
MLX's process-wide default device is never changed. Imported only when an MLX backend is built.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import mlx.core as mx
import numpy as np

from embedtools.backends._dtypes import dtype_table, lookup_dtype
from embedtools.backends._norms import COSINE_RANGE, SQUARES_RANGE
from embedtools.backends._shared import SPEEDUP_SHAPE, SharedOps, measured_speedup
from embedtools.errors import BackendUnavailableError, DimensionError, InvalidArgumentError
from embedtools.protocols import Capabilities, DTypeName, LowPrecisionGemm, Quantization
from embedtools.quantize import check_codes
from embedtools.search.exact import BlockedTopk
from embedtools.search.select import Candidates

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["MlxBackend", "mlx_devices"]

_DTYPES: dict[str, mx.Dtype] = dtype_table(lambda name: getattr(mx, "bool_" if name == "bool" else name))


def _mx_dtype(dtype: str) -> mx.Dtype:
    return lookup_dtype(_DTYPES, dtype)


def _gpu_available() -> bool:
    if mx.metal.is_available():
        return True
    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and cuda.is_available())


def mlx_devices() -> tuple[str, ...]:
    """The devices MLX can use here, best first."""
    return ("gpu", "cpu") if _gpu_available() else ("cpu",)


def _as_2d(a: mx.array) -> mx.array:
    return mx.reshape(a, (1, -1)) if a.ndim == 1 else a


class MlxBackend(SharedOps[mx.array], BlockedTopk[mx.array]):
    """Arrays are ``mlx.core.array``; results are evaluated before they leave the backend."""

    name = "mlx"

    def __init__(self, device: str | None = None, *, select_on_device: bool | None = None) -> None:
        """``select_on_device``: where the top-k selects a block's candidates; by default on the
        GPU, and on the CPU with NumPy from a host copy of the block (MLX's argpartition costs
        far more per block there than the copy and NumPy's compare). ``True`` on a CPU runs the
        GPU's path."""
        there = mlx_devices()
        name = there[0] if device is None else device.strip().lower()
        if name not in there:
            raise BackendUnavailableError(f"MLX device {device!r} is not available here; usable: {', '.join(there)}")
        self.device: str = name
        self._device = mx.Device(mx.gpu if name == "gpu" else mx.cpu)
        self.capabilities: Capabilities = Capabilities(select_on_device=name == "gpu" if select_on_device is None else select_on_device, gpu=name == "gpu")
        self._speedups: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"MlxBackend(device={self.device!r})"

    def asarray(self, data: object, dtype: DTypeName = "float32") -> mx.array:
        target = _mx_dtype(dtype)
        if isinstance(data, mx.array):
            return mx.array(np.array(data, copy=True)).astype(target, stream=self._device)
        return mx.array(np.array(data, dtype=np.dtype(dtype)))

    def from_numpy(self, array: npt.NDArray[Any], dtype: DTypeName = "float32") -> mx.array:
        _mx_dtype(dtype)
        return mx.array(np.ascontiguousarray(array, dtype=np.dtype(dtype)))

    def to_numpy(self, array: mx.array) -> npt.NDArray[Any]:
        mx.eval(array)  # pyright: ignore[reportUnknownMemberType]  (mlx's stub leaves eval's *args unannotated)
        return cast("npt.NDArray[np.generic]", np.asarray(array))  # mx.array.__array__ returns a bare NDArray

    def convert(self, array: object) -> mx.array:
        if isinstance(array, mx.array):
            return array
        cpu = getattr(array, "cpu", None)
        if callable(cpu):  # a torch tensor, possibly on CUDA/MPS: MLX copies from host memory
            return mx.array(np.asarray(cast(Any, cpu()).detach()))
        return mx.array(np.asarray(array))

    def free_bytes(self) -> int | None:
        if self.device != "gpu" or not mx.metal.is_available():
            return None
        limit = int(mx.metal.device_info()["max_recommended_working_set_size"])
        return max(limit - int(mx.get_active_memory()), 0)

    def dtype(self, array: mx.array) -> str:
        return str(array.dtype).removeprefix("mlx.core.")

    def nbytes(self, array: mx.array) -> int:
        return int(array.nbytes)

    def zeros(self, shape: tuple[int, ...], dtype: DTypeName = "float32") -> mx.array:
        return mx.zeros(shape, dtype=_mx_dtype(dtype), stream=self._device)

    def ones(self, shape: tuple[int, ...], dtype: DTypeName = "float32") -> mx.array:
        return mx.ones(shape, dtype=_mx_dtype(dtype), stream=self._device)

    def random_normal(self, shape: tuple[int, ...],
                      *, seed: int | None = None, mean: float = 0.0, std: float = 1.0, dtype: DTypeName = "float32") -> mx.array:  # fmt: skip
        target = _mx_dtype(dtype)
        if target not in (mx.float16, mx.float32, mx.float64):
            raise InvalidArgumentError(f"random_normal needs a float dtype, got {dtype!r}")
        key = mx.random.key(secrets.randbits(63) if seed is None else seed)
        return mx.random.normal(shape, dtype=target, loc=mean, scale=std, key=key, stream=self._device)

    def matmul(self, a: mx.array, b: mx.array) -> mx.array:
        return mx.matmul(a, b, stream=self._device)

    def row_norms(self, a: mx.array) -> mx.array:
        dev = self._device
        x = a.astype(mx.float32, stream=dev)
        squares = mx.sum(mx.multiply(x, x, stream=dev), axis=-1, stream=dev)
        norms = mx.sqrt(squares, stream=dev)
        low, high = SQUARES_RANGE
        odd = mx.logical_not(mx.logical_and(squares >= low, squares <= high, stream=dev), stream=dev)
        if bool(cast("npt.NDArray[np.bool_]", np.array(mx.any(odd, stream=dev)))):  # squares beyond float32 (see _norms): scaled by each row's max
            biggest = mx.max(mx.abs(x, stream=dev), axis=-1, stream=dev)
            safe = mx.where(biggest > 0, biggest, mx.ones_like(biggest), stream=dev)
            unit = mx.divide(x, mx.expand_dims(safe, -1, stream=dev), stream=dev)
            scaled = mx.multiply(biggest, mx.sqrt(mx.sum(mx.multiply(unit, unit, stream=dev), axis=-1, stream=dev), stream=dev), stream=dev)
            norms = mx.where(odd, scaled, norms, stream=dev)
        return norms

    def normalize(self, a: mx.array) -> mx.array:
        x = a.astype(mx.float32, stream=self._device)
        norms = self.row_norms(x)
        dev = self._device
        divisor = mx.where(norms > 0, norms, mx.ones_like(norms), stream=dev)
        out = mx.divide(x, mx.expand_dims(divisor, -1, stream=dev), stream=dev)
        low, high = COSINE_RANGE
        odd = mx.logical_and(norms > 0, mx.logical_or(norms < low, norms > high, stream=dev), stream=dev)
        if bool(cast("npt.NDArray[np.bool_]", np.array(mx.any(odd, stream=dev)))):  # a norm down there may be a float32 subnormal: scale first
            biggest = mx.max(mx.abs(x, stream=dev), axis=-1, keepdims=True, stream=dev)
            scaled = mx.divide(x, mx.where(biggest > 0, biggest, mx.ones_like(biggest), stream=dev), stream=dev)
            length = mx.sqrt(mx.sum(mx.multiply(scaled, scaled, stream=dev), axis=-1, keepdims=True, stream=dev), stream=dev)
            unit = mx.divide(scaled, mx.where(length > 0, length, mx.ones_like(length), stream=dev), stream=dev)
            out = mx.where(mx.expand_dims(odd, -1, stream=dev), unit, out, stream=dev)
        return out

    def cosine_similarity(self, a: mx.array, b: mx.array) -> mx.array:
        a2, b2 = _as_2d(a), _as_2d(b)
        if a2.shape[1] != b2.shape[1]:
            raise DimensionError(f"cannot compare width {a2.shape[1]} with width {b2.shape[1]}")
        an, bn = self.normalize(a2), self.normalize(b2)
        # MLX's CPU matmul ran a contiguous right operand faster than a transposed
        # view: the smaller side is transposed into one, and the product transposed back if needed
        dev = self._device
        if an.size <= bn.size:
            return mx.transpose(mx.matmul(bn, mx.contiguous(an.T, stream=dev), stream=dev), stream=dev)
        return mx.matmul(an, mx.contiguous(bn.T, stream=dev), stream=dev)

    def concatenate(self, arrays: Sequence[mx.array], axis: int = 0) -> mx.array:
        return mx.concatenate(list(arrays), axis=axis, stream=self._device)

    def stack(self, arrays: Sequence[mx.array], axis: int = 0) -> mx.array:
        return mx.stack(list(arrays), axis=axis, stream=self._device)

    def take_rows(self, array: mx.array, indices: npt.NDArray[np.int64]) -> mx.array:
        return mx.take(array, mx.array(np.ascontiguousarray(indices, dtype=np.int64)), axis=0, stream=self._device)

    def dequantize(self, codes: mx.array, kind: Quantization,
                   *, width: int, scale: mx.array | None = None, offset: mx.array | None = None) -> mx.array:  # fmt: skip
        kind = check_codes(kind, int(codes.shape[-1]), width, scale, offset)
        dev = self._device
        if kind == "float16":
            return codes.astype(mx.float32, stream=dev)
        if kind == "bfloat16":
            return codes.view(mx.bfloat16, stream=dev).astype(mx.float32, stream=dev)  # MLX's own bfloat16
        if kind == "binary":
            shifts = mx.array([7, 6, 5, 4, 3, 2, 1, 0], dtype=mx.uint8)
            packed = mx.expand_dims(codes.astype(mx.uint8, stream=dev), -1, stream=dev)
            bits = mx.bitwise_and(mx.right_shift(packed, shifts, stream=dev), 1, stream=dev)
            signs = mx.reshape(bits, (*codes.shape[:-1], 8 * codes.shape[-1]))[..., :width].astype(mx.float32, stream=dev)
            return mx.subtract(mx.multiply(signs, 2, stream=dev), 1, stream=dev)
        assert scale is not None and offset is not None
        return mx.add(mx.multiply(codes.astype(mx.float32, stream=dev), scale, stream=dev), offset, stream=dev)

    def float32(self, array: mx.array) -> mx.array:
        return array.astype(mx.float32, stream=self._device)

    def query_operand(self, queries: npt.NDArray[np.float32]) -> mx.array:
        # rows @ (queries.T made contiguous): MLX's CPU matmul ran this layout faster
        # as queries @ rows.T, whose right operand is a transposed view
        return mx.contiguous(mx.array(queries).T, stream=self._device)

    def block_scores(self, corpus: mx.array, rows: slice,
                     operand: mx.array, scale: mx.array | None, shift: mx.array | None,
                     rows_of: Callable[[mx.array], mx.array] | None) -> mx.array:  # fmt: skip
        dev = self._device
        block = mx.matmul(corpus[rows] if rows_of is None else rows_of(corpus[rows]), operand, stream=dev)
        if block.dtype != mx.float32:  # a low-precision product: float32 accumulation, one rounding to its type
            block = block.astype(mx.float32, stream=dev)
        if scale is not None:
            block = mx.multiply(block, mx.expand_dims(scale[rows], 1, stream=dev), stream=dev)
        if shift is not None:
            block = mx.subtract(block, mx.expand_dims(shift[rows], 1, stream=dev), stream=dev)
        return block

    def host_block(self, block: mx.array) -> npt.NDArray[np.float32]:
        return _host_f32(block)

    def device_candidates(self, block: mx.array, m: int, threshold: npt.NDArray[np.float32]) -> Candidates:
        """Selected on the device, so that only the candidates cross to the host."""
        dev = self._device
        n, queries = block.shape
        if not np.isneginf(threshold).any():
            # MLX has no nonzero: count the scores above each threshold on the device, and take
            # only the top (most such count) per query instead of the top m
            above = mx.sum(mx.greater(block, mx.array(threshold), stream=dev), axis=0, stream=dev)
            m = min(m, int(cast("npt.NDArray[np.integer[Any]]", np.array(mx.max(above, stream=dev)))))  # __array__: a bare NDArray
            if m == 0:
                nothing = np.empty(0, dtype=np.int64)
                return nothing, np.empty(0, dtype=np.float32), nothing
        if m >= n:
            vals, cols = _host_f32(block), np.broadcast_to(np.arange(n, dtype=np.int64)[:, None], (n, queries))
        else:
            # MLX's topk returns no indices: argpartition for the m largest, on the device
            part = mx.argpartition(block, kth=n - m, axis=0, stream=dev)[n - m :]
            top = mx.take_along_axis(block, part, axis=0, stream=dev)
            mx.eval(top, part)  # pyright: ignore[reportUnknownMemberType]  (as in to_numpy)
            vals, cols = _host_f32(top), np.asarray(part).astype(np.int64)  # uint32, converted once
        rows = np.repeat(np.arange(queries, dtype=np.int64), cols.shape[0])
        return rows, np.ascontiguousarray(vals.T).reshape(-1), np.ascontiguousarray(cols.T).reshape(-1)

    def nth_best(self, block: mx.array, n: int) -> npt.NDArray[np.float32]:
        kth = block.shape[0] - n
        return _host_f32(mx.partition(block, kth=kth, axis=0, stream=self._device)[kth])

    def frame_rows(self, rows: mx.array, scale: float, centre: mx.array | None) -> mx.array:
        dev = self._device
        out = mx.multiply(rows, scale, stream=dev) if scale != 1.0 else rows
        return mx.subtract(out, centre, stream=dev) if centre is not None else out

    def low_precision(self, kind: Quantization) -> LowPrecisionGemm[mx.array] | None:
        """MLX's own bf16/fp16 matmul (Metal's GEMM accumulates half types in float32; the CPU's
        converts to float32 for its BLAS), the result rounded to the type once."""
        low = {"bfloat16": mx.bfloat16, "float16": mx.float16}.get(kind)
        if low is None:
            return None
        dev = self._device

        def as_rows(codes: mx.array) -> mx.array:
            return codes.view(mx.bfloat16, stream=dev) if kind == "bfloat16" else codes

        def operand(queries: npt.NDArray[np.float32]) -> mx.array:
            return mx.contiguous(mx.array(queries).astype(low, stream=dev).T, stream=dev)

        def values(queries: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
            return _host_f32(mx.array(queries).astype(low, stream=dev).astype(mx.float32, stream=dev))

        return LowPrecisionGemm(as_rows, operand, values)

    def gemm_speedup(self, kind: Quantization) -> float:
        if kind not in self._speedups:
            low = {"bfloat16": mx.bfloat16, "float16": mx.float16}.get(kind)
            if low is None:
                return 0.0
            rows, width, queries = SPEEDUP_SHAPE
            dev = self._device
            a = mx.random.normal((rows, width), key=mx.random.key(0), stream=dev)
            b = mx.random.normal((width, queries), key=mx.random.key(1), stream=dev)
            a_low, b_low = a.astype(low, stream=dev), b.astype(low, stream=dev)

            def wait(result: object) -> None:
                mx.eval(cast(mx.array, result))  # pyright: ignore[reportUnknownMemberType]  (as in to_numpy)

            self._speedups[kind] = measured_speedup(
                lambda n: mx.matmul(a[:n], b, stream=dev), lambda n: mx.matmul(a_low[:n], b_low, stream=dev), wait
            )
        return self._speedups[kind]


def _host_f32(a: mx.array) -> npt.NDArray[np.float32]:
    mx.eval(a)  # pyright: ignore[reportUnknownMemberType]  (as in MlxBackend.to_numpy)
    return np.array(a, dtype=np.float32)
