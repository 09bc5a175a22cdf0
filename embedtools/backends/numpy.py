"""NumPy backend: the reference implementation, and the default on every machine."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from embedtools.backends._dtypes import dtype_table, lookup_dtype
from embedtools.backends._norms import COSINE_RANGE, SQUARES_RANGE
from embedtools.certified import IDENTITY, Frame, Screened, l2_topk, merge_side
from embedtools.errors import DimensionError, InvalidArgumentError
from embedtools.protocols import DEFAULT_BLOCK_BYTES, DTypeName, Metric, Quantization
from embedtools.quantize import check_codes
from embedtools.search import check_k, check_metric, check_topk_inputs, host_candidates, rows_per_block, run_topk
from embedtools.validation import check_prefix

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["NumpyBackend"]

F32 = np.float32

_DTYPES: dict[str, np.dtype[Any]] = dtype_table(np.dtype)


def _np_dtype(dtype: str) -> np.dtype[Any]:
    return lookup_dtype(_DTYPES, dtype)


class NumpyBackend:
    """Arrays are ``numpy.ndarray`` on the host; matmul goes to the BLAS numpy was built with."""

    def __init__(self) -> None:
        self._halves: npt.NDArray[np.float32] | None = None

    def _half_table(self) -> npt.NDArray[np.float32]:
        """float32 value of every float16 bit pattern (256 KiB, built on first use): a lookup
        decodes a block of float16 codes ~1.5x faster than NumPy's own float16 cast here."""
        if self._halves is None:
            self._halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(F32)
        return self._halves

    @property
    def name(self) -> str:
        return "numpy"

    @property
    def device(self) -> str:
        return "cpu"

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
            return array
        if hasattr(array, "__dlpack__"):
            try:
                shared: npt.NDArray[Any] = np.from_dlpack(array)  # torch on CPU, MLX: zero-copy
                return shared
            except (BufferError, RuntimeError, TypeError, ValueError):
                pass  # a device tensor (CUDA/MPS) or a dtype numpy lacks: copy through the host
        cpu = getattr(array, "cpu", None)
        host = cpu().detach() if callable(cpu) else array
        return np.asarray(host)

    def free_bytes(self) -> int | None:
        return None

    def to_list(self, array: npt.NDArray[Any]) -> list[Any]:
        out = np.asarray(array).tolist()
        return out if isinstance(out, list) else [out]

    def shape(self, array: npt.NDArray[Any]) -> tuple[int, ...]:
        return tuple(int(s) for s in array.shape)

    def dtype(self, array: npt.NDArray[Any]) -> str:
        return str(array.dtype)

    def nbytes(self, array: npt.NDArray[Any]) -> int:
        return int(array.nbytes)

    def zeros(self, shape: tuple[int, ...], dtype: DTypeName = "float32") -> npt.NDArray[Any]:
        return np.zeros(shape, dtype=_np_dtype(dtype))

    def ones(self, shape: tuple[int, ...], dtype: DTypeName = "float32") -> npt.NDArray[Any]:
        return np.ones(shape, dtype=_np_dtype(dtype))

    def random_normal(
        self,
        shape: tuple[int, ...],
        *,
        seed: int | None = None,
        mean: float = 0.0,
        std: float = 1.0,
        dtype: DTypeName = "float32",
    ) -> npt.NDArray[Any]:
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

    def slice_last_dim(self, array: npt.NDArray[Any], dim: int) -> npt.NDArray[Any]:
        return array[..., : check_prefix(dim, array.shape[-1])]

    def take_rows(self, array: npt.NDArray[Any], indices: npt.NDArray[np.int64]) -> npt.NDArray[Any]:
        out: npt.NDArray[Any] = np.take(np.asarray(array), np.asarray(indices, dtype=np.int64), axis=0)
        return out

    def dequantize(
        self,
        codes: npt.NDArray[Any],
        kind: Quantization,
        *,
        width: int,
        scale: npt.NDArray[Any] | None = None,
        offset: npt.NDArray[Any] | None = None,
    ) -> npt.NDArray[np.float32]:
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

    def topk(
        self,
        queries: npt.NDArray[Any],
        corpus: npt.NDArray[Any],
        k: int,
        metric: Metric,
        *,
        corpus_norms: npt.NDArray[Any] | None = None,
        row_mask: npt.NDArray[np.bool_] | None = None,
        max_block_bytes: int = DEFAULT_BLOCK_BYTES,
        decode: Callable[[npt.NDArray[Any]], npt.NDArray[Any]] | None = None,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        metric = check_metric(metric)
        k = check_k(k)
        q = np.atleast_2d(np.asarray(queries, dtype=F32))
        x = np.asarray(corpus, dtype=F32) if decode is None else np.asarray(corpus)

        def rows_of(codes: npt.NDArray[Any]) -> npt.NDArray[Any]:
            return codes if decode is None else decode(codes)

        width = rows_of(x[:1]).shape[1]
        check_topk_inputs(q.shape[1], width, metric, corpus_norms, decode)
        if metric == "l2" and decode is None:
            return self._l2_topk(q, x, k, corpus_norms, row_mask, max_block_bytes)
        side = None
        if metric == "cosine" and decode is None:
            if corpus_norms is None:
                corpus_norms = self.row_norms(x)
            side = _outside_cosine_range(np.asarray(corpus_norms, dtype=F32))
            if side.size:  # rows the GEMM cannot normalise: scored exactly, then merged
                keep = np.ones(x.shape[0], dtype=bool) if row_mask is None else _row_mask(row_mask, x.shape[0]).copy()
                side = side[keep[side]]
                keep[side] = False
                row_mask = keep
        # Per-column terms that turn q·x into the metric's ranking score (larger is better):
        # cosine scales by 1/|x| (queries normalised); l2 ranks by q·x - |x|²/2, since
        # ||q - x||² = |q|² - 2 (q·x - |x|²/2). ``dot`` needs no norms at all.
        column_scale = column_shift = None
        if metric != "dot":
            norms = self.row_norms(x) if corpus_norms is None else np.asarray(corpus_norms, dtype=F32)
            # rows below COSINE_RANGE are scored on the side (or, decoded, left unscaled): 1/|x| would overflow
            column_scale = 1.0 / np.where(norms >= COSINE_RANGE[0], norms, F32(1.0)) if metric == "cosine" else None
            column_shift = 0.5 * norms * norms if metric == "l2" else None
        if row_mask is not None:  # masked rows rank at -inf: shifted down by +inf
            penalty = np.where(_row_mask(row_mask, x.shape[0]), F32(0), F32(np.inf))
            column_shift = penalty if column_shift is None else column_shift + penalty
        raw_q = q
        if metric == "cosine":
            q = self.normalize(q)

        # Blocks are (rows, queries): OpenBLAS ran this GEMM shape ~7% faster than (queries, rows).
        def score_block(qs: slice, rs: slice) -> npt.NDArray[np.float32]:
            block: npt.NDArray[np.float32] = rows_of(x[rs]) @ q[qs].T
            if column_scale is not None:
                block *= column_scale[rs, None]
            if column_shift is not None:
                block -= column_shift[rs, None]
            return block

        def l2_distances(chunk: slice, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
            diff = rows_of(x[idx]) - q[chunk, None, :]
            out: npt.NDArray[np.float32] = np.sqrt(np.einsum("qkd,qkd->qk", diff, diff), dtype=F32)
            return out

        found = run_topk(
            q.shape[0],
            x.shape[0],
            width,
            min(k, x.shape[0]),
            metric,
            max_block_bytes,
            score_block=score_block,
            candidates=host_candidates,
            to_host=lambda block: np.ascontiguousarray(block.T),
            l2_distances=l2_distances,
            settle_ties=decode is None,
            row_mask=row_mask,
            block_rows=rows_per_block(q.shape[0], gpu=False),
        )
        if side is None or not side.size:
            return found
        return merge_side(self, raw_q, x, side, k, max_block_bytes, found)

    def _l2_topk(
        self,
        q: npt.NDArray[np.float32],
        x: npt.NDArray[np.float32],
        k: int,
        corpus_norms: npt.NDArray[Any] | None,
        row_mask: npt.NDArray[np.bool_] | None,
        max_block_bytes: int,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Exact l2 (:mod:`embedtools.certified`), screened by this backend's float32 kernel."""
        n, width = x.shape
        norms = self.row_norms(x) if corpus_norms is None else np.asarray(corpus_norms, dtype=F32)
        mask = None if row_mask is None else _row_mask(row_mask, n)
        penalty = None if mask is None else np.where(mask, F32(0), F32(np.inf))
        last: list[tuple[Frame, npt.NDArray[np.float32]]] = []

        def transform(frame: Frame) -> Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]:
            def rows_of(block: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
                out = block * F32(frame.scale) if frame.scale != 1.0 else block
                return out - frame.centre if frame.centre is not None else out

            return rows_of

        def frame_norms(frame: Frame) -> npt.NDArray[np.float32]:
            if frame is IDENTITY:
                return norms
            if not last or last[0][0] is not frame:
                step = max(max_block_bytes // (4 * max(width, 1)), 1)
                rows_of = transform(frame)
                last[:] = [(frame, np.concatenate([self.row_norms(rows_of(x[i : i + step])) for i in range(0, n, step)]))]
            return last[0][1]

        def screen(fq: npt.NDArray[np.float32], m: int, frame: Frame) -> Screened:
            fnorms = frame_norms(frame)
            shift = 0.5 * fnorms * fnorms
            if penalty is not None:
                shift = shift + penalty
            rows_of = transform(frame)
            plain = frame is IDENTITY

            def score_block(qs: slice, rs: slice) -> npt.NDArray[np.float32]:
                block: npt.NDArray[np.float32] = (x[rs] if plain else rows_of(x[rs])) @ fq[qs].T
                block -= shift[rs, None]
                return block

            vals, idx = run_topk(
                fq.shape[0],
                n,
                width,
                m,
                "dot",
                max_block_bytes,
                score_block=score_block,
                candidates=host_candidates,
                to_host=lambda block: np.ascontiguousarray(block.T),
                l2_distances=_unused_l2,
                settle_ties=False,
                row_mask=mask,
                block_rows=rows_per_block(fq.shape[0], gpu=False),
            )
            return Screened(vals, idx, float(fnorms.max(initial=0.0)))

        return l2_topk(
            self, q, x, k, n_rows=n, norm_max=float(norms.max(initial=0.0)), row_mask=mask, max_block_bytes=max_block_bytes, screen=screen
        )


def _unused_l2(chunk: slice, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    raise AssertionError("a screen ranks by dot-like scores; l2 is rescored by embedtools.certified")  # pragma: no cover


def _outside_cosine_range(norms: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    """Rows whose (nonzero) norm is outside :data:`COSINE_RANGE`, found in one pass over the norms."""
    low, high = COSINE_RANGE
    if bool(((norms >= low) & (norms <= high) | (norms == 0)).all()):
        return np.empty(0, dtype=np.int64)
    return np.flatnonzero((norms > 0) & ((norms < low) | (norms > high))).astype(np.int64)


def _safe_divisor(norms: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Norms with zeros replaced by one, so zero vectors divide to zero instead of NaN."""
    return np.where(norms > 0, norms, F32(1.0))


def _row_mask(row_mask: npt.NDArray[np.bool_], n: int) -> npt.NDArray[np.bool_]:
    mask = np.asarray(row_mask, dtype=bool)
    if mask.shape != (n,):
        raise DimensionError(f"row_mask has shape {mask.shape}, the corpus {n} rows")
    return mask
