"""MLX backend: Apple's array library, on the GPU (Metal) or the CPU (also on Linux, ``mlx[cpu]``).

Every operation runs on the device chosen at construction, passed as ``stream=`` to each call, so
MLX's process-wide default device is never changed. Imported only when an MLX backend is built.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from embedtools.backends._dtypes import dtype_table, lookup_dtype
from embedtools.backends._norms import COSINE_RANGE, SQUARES_RANGE
from embedtools.certified import IDENTITY, Frame, Screened, l2_topk, merge_side
from embedtools.errors import BackendUnavailableError, DimensionError, InvalidArgumentError
from embedtools.protocols import DEFAULT_BLOCK_BYTES, DTypeName, Metric, Quantization
from embedtools.quantize import check_codes
from embedtools.search import Candidates, check_k, check_metric, check_topk_inputs, host_candidates, rows_per_block, run_topk
from embedtools.validation import check_prefix

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
    return a.reshape(1, -1) if a.ndim == 1 else a


class MlxBackend:
    """Arrays are ``mlx.core.array``; results are evaluated before they leave the backend."""

    def __init__(self, device: str | None = None) -> None:
        there = mlx_devices()
        name = there[0] if device is None else device.strip().lower()
        if name not in there:
            raise BackendUnavailableError(f"MLX device {device!r} is not available here; usable: {', '.join(there)}")
        self._name = name
        self._device = mx.Device(mx.gpu if name == "gpu" else mx.cpu)
        # Top-k selects a block's candidates on the GPU there; on the CPU, NumPy selects them from
        # a host copy of the block (MLX's argpartition took ~6 ms a block here; the copy and
        # NumPy's compare ~0.2 ms).
        # Tests set it on a CPU backend to run the GPU's selection.
        self._select_on_device = name == "gpu"

    @property
    def name(self) -> str:
        return "mlx"

    @property
    def device(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"MlxBackend(device={self._name!r})"

    def asarray(self, data: object, dtype: DTypeName = "float32") -> mx.array:
        target = _mx_dtype(dtype)
        if isinstance(data, mx.array):
            return mx.array(np.array(data, copy=True)).astype(target, stream=self._device)
        return mx.array(np.array(data, dtype=np.dtype(dtype)))

    def from_numpy(self, array: npt.NDArray[Any], dtype: DTypeName = "float32") -> mx.array:
        _mx_dtype(dtype)
        return mx.array(np.ascontiguousarray(array, dtype=np.dtype(dtype)))

    def to_numpy(self, array: mx.array) -> npt.NDArray[Any]:
        mx.eval(array)
        return np.asarray(array)

    def convert(self, array: object) -> mx.array:
        if isinstance(array, mx.array):
            return array
        cpu = getattr(array, "cpu", None)
        if callable(cpu):  # a torch tensor, possibly on CUDA/MPS: MLX copies from host memory
            return mx.array(np.asarray(cpu().detach()))
        return mx.array(np.asarray(array))

    def free_bytes(self) -> int | None:
        if self._name != "gpu" or not mx.metal.is_available():
            return None
        limit = int(mx.metal.device_info()["max_recommended_working_set_size"])
        return max(limit - int(mx.get_active_memory()), 0)

    def to_list(self, array: mx.array) -> list[Any]:
        out: object = array.tolist()
        return out if isinstance(out, list) else [out]

    def shape(self, array: mx.array) -> tuple[int, ...]:
        return tuple(int(s) for s in array.shape)

    def dtype(self, array: mx.array) -> str:
        return str(array.dtype).removeprefix("mlx.core.")

    def nbytes(self, array: mx.array) -> int:
        return int(array.nbytes)

    def zeros(self, shape: tuple[int, ...], dtype: DTypeName = "float32") -> mx.array:
        return mx.zeros(shape, dtype=_mx_dtype(dtype), stream=self._device)

    def ones(self, shape: tuple[int, ...], dtype: DTypeName = "float32") -> mx.array:
        return mx.ones(shape, dtype=_mx_dtype(dtype), stream=self._device)

    def random_normal(
        self,
        shape: tuple[int, ...],
        *,
        seed: int | None = None,
        mean: float = 0.0,
        std: float = 1.0,
        dtype: DTypeName = "float32",
    ) -> mx.array:
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
        if bool(np.array(mx.any(odd, stream=dev))):  # squares beyond float32 (see _norms): scaled by each row's max
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
        if bool(np.array(mx.any(odd, stream=dev))):  # a norm down there may be a float32 subnormal: scale first
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
        # MLX's CPU matmul ran a contiguous right operand about twice as fast as a transposed
        # view: the smaller side is transposed into one, and the product transposed back if needed
        dev = self._device
        if an.size <= bn.size:
            return mx.transpose(mx.matmul(bn, mx.contiguous(an.T, stream=dev), stream=dev), stream=dev)
        return mx.matmul(an, mx.contiguous(bn.T, stream=dev), stream=dev)

    def concatenate(self, arrays: Sequence[mx.array], axis: int = 0) -> mx.array:
        return mx.concatenate(list(arrays), axis=axis, stream=self._device)

    def stack(self, arrays: Sequence[mx.array], axis: int = 0) -> mx.array:
        return mx.stack(list(arrays), axis=axis, stream=self._device)

    def slice_last_dim(self, array: mx.array, dim: int) -> mx.array:
        return array[..., : check_prefix(dim, array.shape[-1])]

    def take_rows(self, array: mx.array, indices: npt.NDArray[np.int64]) -> mx.array:
        return mx.take(array, mx.array(np.ascontiguousarray(indices, dtype=np.int64)), axis=0, stream=self._device)

    def dequantize(
        self,
        codes: mx.array,
        kind: Quantization,
        *,
        width: int,
        scale: mx.array | None = None,
        offset: mx.array | None = None,
    ) -> mx.array:
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
            signs = bits.reshape(*codes.shape[:-1], 8 * codes.shape[-1])[..., :width].astype(mx.float32, stream=dev)
            return mx.subtract(mx.multiply(signs, 2, stream=dev), 1, stream=dev)
        assert scale is not None and offset is not None
        return mx.add(mx.multiply(codes.astype(mx.float32, stream=dev), scale, stream=dev), offset, stream=dev)

    def topk(
        self,
        queries: mx.array,
        corpus: mx.array,
        k: int,
        metric: Metric,
        *,
        corpus_norms: mx.array | None = None,
        row_mask: npt.NDArray[np.bool_] | None = None,
        max_block_bytes: int = DEFAULT_BLOCK_BYTES,
        decode: Callable[[mx.array], mx.array] | None = None,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        metric = check_metric(metric)
        k = check_k(k)
        dev = self._device
        q = _as_2d(queries).astype(mx.float32, stream=dev)
        x = corpus.astype(mx.float32, stream=dev) if decode is None else corpus

        def rows_of(codes: mx.array) -> mx.array:
            return codes if decode is None else decode(codes)

        width = int(rows_of(x[:1]).shape[1])
        check_topk_inputs(int(q.shape[1]), width, metric, corpus_norms, decode)
        if metric == "l2" and decode is None:
            return self._l2_topk(q, x, k, corpus_norms, row_mask, max_block_bytes)
        side = None
        if metric == "cosine" and decode is None:
            if corpus_norms is None:
                corpus_norms = self.row_norms(x)
            side = _outside_cosine_range(corpus_norms.astype(mx.float32, stream=dev), dev)
            if side.size:  # rows the GEMM cannot normalise: scored exactly, then merged
                if row_mask is not None and row_mask.shape != (x.shape[0],):
                    raise DimensionError(f"row_mask has shape {row_mask.shape}, the corpus {x.shape[0]} rows")
                keep = np.ones(x.shape[0], dtype=bool) if row_mask is None else np.array(row_mask, dtype=bool)
                side = side[keep[side]]
                keep[side] = False
                row_mask = keep
        raw_q = q
        # The same ranking scores as the NumPy backend (see there); the driver rescores l2 winners.
        column_scale = column_shift = None
        if metric != "dot":
            norms = self.row_norms(x) if corpus_norms is None else corpus_norms.astype(mx.float32, stream=dev)
            # rows below COSINE_RANGE are scored on the side (or, decoded, left unscaled): 1/|x| would overflow
            safe = mx.where(norms >= COSINE_RANGE[0], norms, mx.ones_like(norms), stream=dev)
            column_scale = mx.reciprocal(safe, stream=dev) if metric == "cosine" else None
            column_shift = 0.5 * norms * norms if metric == "l2" else None
        if row_mask is not None:  # masked rows rank at -inf: shifted down by +inf
            if row_mask.shape != (x.shape[0],):
                raise DimensionError(f"row_mask has shape {row_mask.shape}, the corpus {x.shape[0]} rows")
            penalty = mx.array(np.where(row_mask, 0.0, np.inf).astype(np.float32))
            column_shift = penalty if column_shift is None else mx.add(column_shift, penalty, stream=dev)
        if metric == "cosine":
            q = self.normalize(q)

        # The product is taken as rows @ (queries.T, made contiguous once per query chunk): MLX's
        # CPU matmul ran this layout about twice as fast as queries @ rows.T, whose right operand
        # is a transposed view. Blocks are (rows, queries), as NumPy's and torch's are.
        transposed: dict[tuple[int, int], mx.array] = {}

        def score_block(qs: slice, rs: slice) -> mx.array:
            key = (qs.start, qs.stop)
            if key not in transposed:
                transposed.clear()
                transposed[key] = mx.contiguous(q[qs].T, stream=dev)
            block = mx.matmul(rows_of(x[rs]), transposed[key], stream=dev)
            if column_scale is not None:
                block = mx.multiply(block, mx.expand_dims(column_scale[rs], 1, stream=dev), stream=dev)
            if column_shift is not None:
                block = mx.subtract(block, mx.expand_dims(column_shift[rs], 1, stream=dev), stream=dev)
            return block

        def candidates(block: mx.array, m: int, threshold: npt.NDArray[np.float32]) -> Candidates:
            if self._select_on_device:
                return _device_candidates(block, m, threshold, dev)
            return host_candidates(_host_f32(block), m, threshold)

        def l2_distances(chunk: slice, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
            rows = rows_of(x[mx.array(idx)])
            diff = mx.subtract(rows, mx.expand_dims(q[chunk], 1, stream=dev), stream=dev)
            return _host_f32(mx.sqrt(mx.sum(diff * diff, axis=2, stream=dev), stream=dev))

        found = run_topk(
            q.shape[0],
            x.shape[0],
            width,
            min(k, x.shape[0]),
            metric,
            max_block_bytes,
            score_block=score_block,
            candidates=candidates,
            to_host=lambda block: np.ascontiguousarray(_host_f32(block).T),
            l2_distances=l2_distances,
            settle_ties=decode is None,
            row_mask=row_mask,
            nth_best=partial(_nth_best, device=dev) if self._select_on_device else None,
            block_rows=rows_per_block(int(q.shape[0]), gpu=dev.type == mx.gpu),
        )
        if side is None or not side.size:
            return found
        return merge_side(self, _host_f32(raw_q), x, side, k, max_block_bytes, found)

    def _l2_topk(
        self,
        q: mx.array,
        x: mx.array,
        k: int,
        corpus_norms: mx.array | None,
        row_mask: npt.NDArray[np.bool_] | None,
        max_block_bytes: int,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Exact l2 (:mod:`embedtools.certified`), screened by this backend's float32 kernel."""
        dev = self._device
        n, width = int(x.shape[0]), int(x.shape[1])
        norms = self.row_norms(x) if corpus_norms is None else corpus_norms.astype(mx.float32, stream=dev)
        penalty = None
        if row_mask is not None:
            if row_mask.shape != (n,):
                raise DimensionError(f"row_mask has shape {row_mask.shape}, the corpus {n} rows")
            penalty = mx.array(np.where(row_mask, 0.0, np.inf).astype(np.float32))
        last: list[tuple[Frame, mx.array]] = []

        def transform(frame: Frame) -> Callable[[mx.array], mx.array]:
            centre = None if frame.centre is None else mx.array(frame.centre)

            def rows_of(block: mx.array) -> mx.array:
                out = mx.multiply(block, frame.scale, stream=dev) if frame.scale != 1.0 else block
                return mx.subtract(out, centre, stream=dev) if centre is not None else out

            return rows_of

        def frame_norms(frame: Frame) -> mx.array:
            if frame is IDENTITY:
                return norms
            if not last or last[0][0] is not frame:
                step = max(max_block_bytes // (4 * max(width, 1)), 1)
                rows_of = transform(frame)
                parts = [self.row_norms(rows_of(x[i : i + step])) for i in range(0, n, step)]
                last[:] = [(frame, mx.concatenate(parts, axis=0, stream=dev))]
            return last[0][1]

        def screen(fq_host: npt.NDArray[np.float32], m: int, frame: Frame) -> Screened:
            fnorms = frame_norms(frame)
            shift = mx.multiply(mx.multiply(fnorms, fnorms, stream=dev), 0.5, stream=dev)
            if penalty is not None:
                shift = mx.add(shift, penalty, stream=dev)
            rows_of = transform(frame)
            plain = frame is IDENTITY
            fq = mx.array(np.ascontiguousarray(fq_host))
            transposed: dict[tuple[int, int], mx.array] = {}

            def score_block(qs: slice, rs: slice) -> mx.array:
                key = (qs.start, qs.stop)
                if key not in transposed:
                    transposed.clear()
                    transposed[key] = mx.contiguous(fq[qs].T, stream=dev)
                block = mx.matmul(x[rs] if plain else rows_of(x[rs]), transposed[key], stream=dev)
                return mx.subtract(block, mx.expand_dims(shift[rs], 1, stream=dev), stream=dev)

            def candidates(block: mx.array, m: int, threshold: npt.NDArray[np.float32]) -> Candidates:
                if self._select_on_device:
                    return _device_candidates(block, m, threshold, dev)
                return host_candidates(_host_f32(block), m, threshold)

            vals, idx = run_topk(
                int(fq.shape[0]),
                n,
                width,
                m,
                "dot",
                max_block_bytes,
                score_block=score_block,
                candidates=candidates,
                to_host=lambda block: np.ascontiguousarray(_host_f32(block).T),
                l2_distances=_unused_l2,
                settle_ties=False,
                row_mask=row_mask,
                nth_best=partial(_nth_best, device=dev) if self._select_on_device else None,
                block_rows=rows_per_block(int(fq.shape[0]), gpu=dev.type == mx.gpu),
            )
            return Screened(vals, idx, float(np.array(mx.max(fnorms, stream=dev))) if n else 0.0)

        return l2_topk(
            self,
            _host_f32(q),
            x,
            k,
            n_rows=n,
            norm_max=float(np.array(mx.max(norms, stream=dev))) if n else 0.0,
            row_mask=row_mask,
            max_block_bytes=max_block_bytes,
            screen=screen,
        )


def _unused_l2(chunk: slice, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    raise AssertionError("a screen ranks by dot-like scores; l2 is rescored by embedtools.certified")  # pragma: no cover


def _outside_cosine_range(norms: mx.array, dev: mx.Device) -> npt.NDArray[np.int64]:
    """Rows whose (nonzero) norm is outside :data:`COSINE_RANGE`: one compare on the device, and
    an index list only where there are any."""
    low, high = COSINE_RANGE
    odd = mx.logical_and(norms > 0, mx.logical_or(norms < low, norms > high, stream=dev), stream=dev)
    if not bool(np.array(mx.any(odd, stream=dev))):
        return np.empty(0, dtype=np.int64)
    return np.flatnonzero(np.array(odd)).astype(np.int64)


def _nth_best(block: mx.array, n: int, *, device: mx.Device) -> npt.NDArray[np.float32]:
    """Each query's n-th best score of a ``(rows, queries)`` block, found on the device."""
    kth = block.shape[0] - n
    return _host_f32(mx.partition(block, kth=kth, axis=0, stream=device)[kth])


def _device_candidates(block: mx.array, m: int, threshold: npt.NDArray[np.float32], dev: mx.Device) -> Candidates:
    """Scores of a ``(rows, queries)`` block that may enter each query's running top ``m``, selected
    on the device so that only they cross to the host."""
    n, queries = block.shape
    if not np.isneginf(threshold).any():
        # MLX has no nonzero: count the scores above each threshold on the device, and take
        # only the top (most such count) per query instead of the top m
        above = mx.sum(mx.greater(block, mx.array(threshold), stream=dev), axis=0, stream=dev)
        m = min(m, int(np.array(mx.max(above, stream=dev))))
        if m == 0:
            nothing = np.empty(0, dtype=np.int64)
            return nothing, np.empty(0, dtype=np.float32), nothing
    if m >= n:
        vals, cols = _host_f32(block), np.broadcast_to(np.arange(n, dtype=np.int64)[:, None], (n, queries))
    else:
        # MLX's topk returns no indices: argpartition for the m largest, on the device
        part = mx.argpartition(block, kth=n - m, axis=0, stream=dev)[n - m :]
        top = mx.take_along_axis(block, part, axis=0, stream=dev)
        mx.eval(top, part)
        vals, cols = _host_f32(top), np.asarray(part).astype(np.int64)  # uint32, converted once
    rows = np.repeat(np.arange(queries, dtype=np.int64), cols.shape[0])
    return rows, np.ascontiguousarray(vals.T).reshape(-1), np.ascontiguousarray(cols.T).reshape(-1)


def _host_f32(a: mx.array) -> npt.NDArray[np.float32]:
    mx.eval(a)
    return np.array(a, dtype=np.float32)
