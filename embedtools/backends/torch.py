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
        norms: torch.Tensor = torch.linalg.vector_norm(a.to(torch.float32), dim=-1)
        return norms

    def normalize(self, a: torch.Tensor) -> torch.Tensor:
        x = a.to(torch.float32)
        norms = self.row_norms(x)
        divisor = torch.where(norms > 0, norms, torch.ones_like(norms))
        return x / divisor.unsqueeze(-1)

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
        # The same ranking scores as the NumPy backend: cosine scales columns by 1/|x|, l2 ranks by
        # q·x - |x|²/2 and the driver rescores the winners as true distances; dot needs no norms.
        column_scale = column_shift = None
        if metric != "dot":
            norms = self.row_norms(x) if corpus_norms is None else corpus_norms.to(torch.float32)
            column_scale = 1.0 / torch.where(norms > 0, norms, torch.ones_like(norms)) if metric == "cosine" else None
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

        return run_topk(
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
