"""PyTorch backend: CPU, CUDA (``cuda``, ``cuda:N``) and Apple's MPS, on torch's own kernels.

Imported only when a Torch backend is built (``make_backend("torch")``), never by ``import embedtools``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.utils.dlpack

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

__all__ = ["TorchBackend", "torch_devices"]

_DTYPES: dict[str, torch.dtype] = dtype_table(lambda name: getattr(torch, name))


def _torch_dtype(dtype: str) -> torch.dtype:
    return lookup_dtype(_DTYPES, dtype)


def torch_devices() -> tuple[str, ...]:
    """The devices torch can use here, best first: ``cuda:0``…, then ``mps``, then ``cpu``."""
    cuda = tuple(f"cuda:{i}" for i in range(torch.cuda.device_count())) if torch.cuda.is_available() else ()
    mps = ("mps",) if torch.backends.mps.is_available() else ()
    return cuda + mps + ("cpu",)


def _resolve_device(device: str | None) -> torch.device:
    """The asked-for device, checked now (not at first use); ``None`` is the best one here."""
    there = torch_devices()
    if device is None:
        return torch.device(there[0])
    name = device.strip().lower()
    if name == "cuda" and torch.cuda.is_available():
        name = f"cuda:{torch.cuda.current_device()}"
    if name not in there:
        raise BackendUnavailableError(f"torch device {device!r} is not available here; usable: {', '.join(there)}")
    return torch.device(name)


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1) if t.dim() == 1 else t


class TorchBackend:
    """Arrays are ``torch.Tensor`` on one device, chosen at construction (never on first use)."""

    def __init__(self, device: str | None = None) -> None:
        self._device = _resolve_device(device)
        # Top-k selects a block's candidates on a CUDA/MPS device there; on the CPU, NumPy selects
        # them from the block's memory (torch's compare, nonzero and gathers took ~0.76 ms a block
        # here, NumPy's ~0.27 ms). Tests set it on a CPU backend to run the device's selection.
        self._select_on_device = self._device.type != "cpu"

    @property
    def name(self) -> str:
        return "torch"

    @property
    def device(self) -> str:
        return str(self._device)

    def __repr__(self) -> str:
        return f"TorchBackend(device={self.device!r})"

    def asarray(self, data: object, dtype: DTypeName = "float32") -> torch.Tensor:
        target = _torch_dtype(dtype)
        if isinstance(data, torch.Tensor):
            return data.detach().to(device=self._device, dtype=target, copy=True)
        host = np.array(data, dtype=np.dtype(dtype))
        return torch.from_numpy(host).to(self._device)

    def from_numpy(self, array: npt.NDArray[Any], dtype: DTypeName = "float32") -> torch.Tensor:
        host = np.ascontiguousarray(array, dtype=np.dtype(_np_name(dtype)))
        if not host.flags.writeable:
            host = host.copy()  # torch cannot wrap read-only memory
        return torch.from_numpy(host).to(self._device)

    def to_numpy(self, array: torch.Tensor) -> npt.NDArray[Any]:
        return array.detach().cpu().numpy()

    def convert(self, array: object) -> torch.Tensor:
        if isinstance(array, torch.Tensor):
            return array.to(self._device)
        if isinstance(array, np.ndarray):
            return self.from_numpy(array, dtype=str(array.dtype))  # type: ignore[arg-type]
        if hasattr(array, "__dlpack__"):
            return torch.utils.dlpack.from_dlpack(array).to(self._device)  # MLX on CPU: zero-copy
        return torch.as_tensor(np.asarray(array), device=self._device)

    def free_bytes(self) -> int | None:
        kind = str(self._device).split(":")[0]
        if kind == "cuda":
            free, _total = torch.cuda.mem_get_info(self._device)
            return int(free)
        if kind == "mps":
            return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
        return None

    def to_list(self, array: torch.Tensor) -> list[Any]:
        out: object = array.tolist()  # a scalar for 0-d tensors, whatever the stubs say
        return out if isinstance(out, list) else [out]

    def shape(self, array: torch.Tensor) -> tuple[int, ...]:
        return tuple(int(s) for s in array.shape)

    def dtype(self, array: torch.Tensor) -> str:
        return str(array.dtype).removeprefix("torch.")

    def nbytes(self, array: torch.Tensor) -> int:
        return int(array.element_size() * array.nelement())

    def zeros(self, shape: tuple[int, ...], dtype: DTypeName = "float32") -> torch.Tensor:
        return torch.zeros(shape, dtype=_torch_dtype(dtype), device=self._device)

    def ones(self, shape: tuple[int, ...], dtype: DTypeName = "float32") -> torch.Tensor:
        return torch.ones(shape, dtype=_torch_dtype(dtype), device=self._device)

    def random_normal(
        self,
        shape: tuple[int, ...],
        *,
        seed: int | None = None,
        mean: float = 0.0,
        std: float = 1.0,
        dtype: DTypeName = "float32",
    ) -> torch.Tensor:
        target = _torch_dtype(dtype)
        if not target.is_floating_point:
            raise InvalidArgumentError(f"random_normal needs a float dtype, got {dtype!r}")
        generator = torch.Generator(device=self._device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        samples = torch.randn(shape, generator=generator, device=self._device, dtype=target)
        return samples * std + mean

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)

    def row_norms(self, a: torch.Tensor) -> torch.Tensor:
        x = a.to(torch.float32)
        norms: torch.Tensor = torch.linalg.vector_norm(x, dim=-1)
        low, high = (bound**0.5 for bound in SQUARES_RANGE)
        odd = ~((norms >= low) & (norms <= high))
        if bool(odd.any()):  # squares beyond float32 (see _norms): scaled by each row's max, on the device
            biggest = x.abs().amax(dim=-1)
            unit = x / torch.where(biggest > 0, biggest, torch.ones_like(biggest)).unsqueeze(-1)
            norms = torch.where(odd, biggest * torch.linalg.vector_norm(unit, dim=-1), norms)
        return norms

    def normalize(self, a: torch.Tensor) -> torch.Tensor:
        x = a.to(torch.float32)
        norms = self.row_norms(x)
        divisor = torch.where(norms > 0, norms, torch.ones_like(norms))
        out = x / divisor.unsqueeze(-1)
        low, high = COSINE_RANGE
        odd = (norms > 0) & ((norms < low) | (norms > high))
        if bool(odd.any()):  # a norm down there may be a float32 subnormal, too coarse to divide by: scale first
            biggest = x.abs().amax(dim=-1, keepdim=True)
            scaled = x / torch.where(biggest > 0, biggest, torch.ones_like(biggest))
            length = torch.linalg.vector_norm(scaled, dim=-1, keepdim=True)
            out = torch.where(odd.unsqueeze(-1), scaled / torch.where(length > 0, length, torch.ones_like(length)), out)
        return out

    def cosine_similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a2, b2 = _as_2d(a), _as_2d(b)
        if a2.shape[1] != b2.shape[1]:
            raise DimensionError(f"cannot compare width {a2.shape[1]} with width {b2.shape[1]}")
        return self.normalize(a2) @ self.normalize(b2).T

    def concatenate(self, arrays: Sequence[torch.Tensor], axis: int = 0) -> torch.Tensor:
        return torch.cat(list(arrays), dim=axis)

    def stack(self, arrays: Sequence[torch.Tensor], axis: int = 0) -> torch.Tensor:
        return torch.stack(list(arrays), dim=axis)

    def slice_last_dim(self, array: torch.Tensor, dim: int) -> torch.Tensor:
        return array[..., : check_prefix(dim, array.shape[-1])]

    def take_rows(self, array: torch.Tensor, indices: npt.NDArray[np.int64]) -> torch.Tensor:
        return array[torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64)).to(array.device)]

    @torch.no_grad()
    def dequantize(
        self,
        codes: torch.Tensor,
        kind: Quantization,
        *,
        width: int,
        scale: torch.Tensor | None = None,
        offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kind = check_codes(kind, int(codes.shape[-1]), width, scale, offset)
        if kind == "float16":
            return codes.to(torch.float32)
        if kind == "bfloat16":
            return codes.view(torch.bfloat16).to(torch.float32)  # the raw words are torch's own bfloat16
        if kind == "binary":
            shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=codes.device)
            bits = (codes.to(torch.uint8).unsqueeze(-1) >> shifts) & 1
            signs = bits.reshape(*codes.shape[:-1], 8 * codes.shape[-1])[..., :width].to(torch.float32)
            return signs.mul_(2).sub_(1)
        assert scale is not None and offset is not None
        return codes.to(torch.float32).mul_(scale).add_(offset)

    @torch.no_grad()
    def topk(
        self,
        queries: torch.Tensor,
        corpus: torch.Tensor,
        k: int,
        metric: Metric,
        *,
        corpus_norms: torch.Tensor | None = None,
        row_mask: npt.NDArray[np.bool_] | None = None,
        max_block_bytes: int = DEFAULT_BLOCK_BYTES,
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        metric = check_metric(metric)
        k = check_k(k)
        q = _as_2d(queries).to(device=self._device, dtype=torch.float32)
        x = corpus.to(torch.float32) if decode is None else corpus

        def rows_of(codes: torch.Tensor) -> torch.Tensor:
            return codes if decode is None else decode(codes)

        width = int(rows_of(x[:1]).shape[1])
        check_topk_inputs(int(q.shape[1]), width, metric, corpus_norms, decode)
        if metric == "l2" and decode is None:
            return self._l2_topk(q, x, k, corpus_norms, row_mask, max_block_bytes)
        side = None
        if metric == "cosine" and decode is None:
            if corpus_norms is None:
                corpus_norms = self.row_norms(x)
            side = _outside_cosine_range(corpus_norms.to(torch.float32))
            if side.size:  # rows the GEMM cannot normalise: scored exactly, then merged
                if row_mask is not None and row_mask.shape != (x.shape[0],):
                    raise DimensionError(f"row_mask has shape {row_mask.shape}, the corpus {x.shape[0]} rows")
                kept = np.ones(x.shape[0], dtype=bool) if row_mask is None else np.array(row_mask, dtype=bool)
                side = side[kept[side]]
                kept[side] = False
                row_mask = kept
        raw_q = q
        # The same ranking scores as the NumPy backend: cosine scales columns by 1/|x|, l2 ranks by
        # q·x - |x|²/2 and the driver rescores the winners as true distances; dot needs no norms.
        column_scale = column_shift = None
        if metric != "dot":
            norms = self.row_norms(x) if corpus_norms is None else corpus_norms.to(torch.float32)
            # rows below COSINE_RANGE are scored on the side (or, decoded, left unscaled): 1/|x| would overflow
            column_scale = 1.0 / torch.where(norms >= COSINE_RANGE[0], norms, torch.ones_like(norms)) if metric == "cosine" else None
            column_shift = 0.5 * norms * norms if metric == "l2" else None
        if row_mask is not None:  # masked rows rank at -inf: shifted down by +inf
            if row_mask.shape != (x.shape[0],):
                raise DimensionError(f"row_mask has shape {row_mask.shape}, the corpus {x.shape[0]} rows")
            keep = torch.from_numpy(np.ascontiguousarray(row_mask, dtype=bool)).to(self._device)
            penalty = torch.where(keep, 0.0, float("inf")).to(torch.float32)
            column_shift = penalty if column_shift is None else column_shift + penalty
        if metric == "cosine":
            q = self.normalize(q)

        # Blocks are laid out (rows, queries): MKL's GEMM and torch.topk along dim 0 ran ~1.3x
        # faster that way on a 2-core AVX-512 CPU than the (queries, rows) layout.
        def score_block(qs: slice, rs: slice) -> torch.Tensor:
            block = rows_of(x[rs]) @ q[qs].T
            if column_scale is not None:
                block.mul_(column_scale[rs].unsqueeze(1))
            if column_shift is not None:
                block.sub_(column_shift[rs].unsqueeze(1))
            return block

        def l2_distances(chunk: slice, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
            rows = rows_of(x[torch.from_numpy(idx).to(self._device)])
            return _host_f32(torch.linalg.vector_norm(rows - q[chunk].unsqueeze(1), dim=2))

        found = run_topk(
            q.shape[0],
            x.shape[0],
            width,
            min(k, x.shape[0]),
            metric,
            max_block_bytes,
            score_block=score_block,
            candidates=_candidates if self._select_on_device else _cpu_candidates,
            to_host=lambda block: _host_f32(block.T),
            l2_distances=l2_distances,
            settle_ties=decode is None,
            row_mask=row_mask,
            nth_best=_nth_best if self._select_on_device else None,
            block_rows=rows_per_block(int(q.shape[0]), gpu=self._device.type != "cpu"),
        )
        if side is None or not side.size:
            return found
        return merge_side(self, _host_f32(raw_q), x, side, k, max_block_bytes, found)

    def _l2_topk(
        self,
        q: torch.Tensor,
        x: torch.Tensor,
        k: int,
        corpus_norms: torch.Tensor | None,
        row_mask: npt.NDArray[np.bool_] | None,
        max_block_bytes: int,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Exact l2 (:mod:`embedtools.certified`), screened by this backend's float32 kernel."""
        n, width = int(x.shape[0]), int(x.shape[1])
        norms = self.row_norms(x) if corpus_norms is None else corpus_norms.to(torch.float32)
        penalty = None
        if row_mask is not None:
            if row_mask.shape != (n,):
                raise DimensionError(f"row_mask has shape {row_mask.shape}, the corpus {n} rows")
            keep = torch.from_numpy(np.ascontiguousarray(row_mask, dtype=bool)).to(self._device)
            penalty = torch.where(keep, 0.0, float("inf")).to(torch.float32)
        last: list[tuple[Frame, torch.Tensor]] = []
        device = self._device

        def transform(frame: Frame) -> Callable[[torch.Tensor], torch.Tensor]:
            centre = None if frame.centre is None else torch.from_numpy(frame.centre).to(device)

            def rows_of(block: torch.Tensor) -> torch.Tensor:
                out = block * frame.scale if frame.scale != 1.0 else block
                return out - centre if centre is not None else out

            return rows_of

        def frame_norms(frame: Frame) -> torch.Tensor:
            if frame is IDENTITY:
                return norms
            if not last or last[0][0] is not frame:
                step = max(max_block_bytes // (4 * max(width, 1)), 1)
                rows_of = transform(frame)
                last[:] = [(frame, torch.cat([self.row_norms(rows_of(x[i : i + step])) for i in range(0, n, step)]))]
            return last[0][1]

        def screen(fq_host: npt.NDArray[np.float32], m: int, frame: Frame) -> Screened:
            fnorms = frame_norms(frame)
            shift = 0.5 * fnorms * fnorms
            if penalty is not None:
                shift = shift + penalty
            rows_of = transform(frame)
            plain = frame is IDENTITY
            fq = torch.from_numpy(np.ascontiguousarray(fq_host)).to(device)

            def score_block(qs: slice, rs: slice) -> torch.Tensor:
                block = (x[rs] if plain else rows_of(x[rs])) @ fq[qs].T
                return block.sub_(shift[rs].unsqueeze(1))

            vals, idx = run_topk(
                int(fq.shape[0]),
                n,
                width,
                m,
                "dot",
                max_block_bytes,
                score_block=score_block,
                candidates=_candidates if self._select_on_device else _cpu_candidates,
                to_host=lambda block: _host_f32(block.T),
                l2_distances=_unused_l2,
                settle_ties=False,
                row_mask=row_mask,
                nth_best=_nth_best if self._select_on_device else None,
                block_rows=rows_per_block(int(fq.shape[0]), gpu=device.type != "cpu"),
            )
            return Screened(vals, idx, float(fnorms.max()) if n else 0.0)

        return l2_topk(
            self,
            _host_f32(q),
            x,
            k,
            n_rows=n,
            norm_max=float(norms.max()) if n else 0.0,
            row_mask=row_mask,
            max_block_bytes=max_block_bytes,
            screen=screen,
        )


def _unused_l2(chunk: slice, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    raise AssertionError("a screen ranks by dot-like scores; l2 is rescored by embedtools.certified")  # pragma: no cover


def _outside_cosine_range(norms: torch.Tensor) -> npt.NDArray[np.int64]:
    """Rows whose (nonzero) norm is outside :data:`COSINE_RANGE`: one compare on the device, and
    an index list only where there are any."""
    low, high = COSINE_RANGE
    odd = (norms > 0) & ((norms < low) | (norms > high))
    if not bool(odd.any()):
        return np.empty(0, dtype=np.int64)
    return _host_i64(torch.nonzero(odd).reshape(-1))


def _np_name(dtype: str) -> str:
    _torch_dtype(dtype)  # refuses names torch does not know, with the same error as elsewhere
    return dtype


def _host_f32(t: torch.Tensor) -> npt.NDArray[np.float32]:
    out: npt.NDArray[np.float32] = t.detach().to("cpu", torch.float32).numpy()
    return out


def _host_i64(t: torch.Tensor) -> npt.NDArray[np.int64]:
    out: npt.NDArray[np.int64] = t.detach().to("cpu", torch.int64).numpy()
    return out


def _nth_best(block: torch.Tensor, n: int) -> npt.NDArray[np.float32]:
    """Each query's n-th best score of a ``(rows, queries)`` block, found on the device."""
    return _host_f32(torch.topk(block, n, dim=0).values[n - 1])


def _cpu_candidates(block: torch.Tensor, m: int, threshold: npt.NDArray[np.float32]) -> Candidates:
    """A CPU block's candidates, selected by NumPy from the tensor's own memory (no copy)."""
    return host_candidates(block.detach().numpy(), m, threshold)


def _candidates(block: torch.Tensor, m: int, threshold: npt.NDArray[np.float32]) -> Candidates:
    """Scores that may enter the running top ``m`` of a ``(rows, queries)`` block, found on the device.

    Until every query has ``m`` candidates: the block's top ``m`` by ``torch.topk``. After that, one
    compare against each query's threshold rejects nearly the whole block without a selection.
    """
    n, queries = block.shape
    if np.isneginf(threshold).any():
        if m >= n:
            vals, idx = block, torch.arange(n, device=block.device).unsqueeze(1).expand(n, queries)
        else:
            vals, idx = torch.topk(block, m, dim=0, largest=True, sorted=False)
        rows = np.repeat(np.arange(queries, dtype=np.int64), idx.shape[0])
        return rows, _host_f32(vals.T).reshape(-1), _host_i64(idx.T).reshape(-1)
    limit = torch.from_numpy(threshold).to(block.device)
    cols, query_rows = torch.nonzero(block > limit, as_tuple=True)
    return _host_i64(query_rows), _host_f32(block[cols, query_rows]), _host_i64(cols)
