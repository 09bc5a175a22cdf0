"""PyTorch backend: CPU, CUDA (``cuda``, ``cuda:N``) and Apple's MPS, on torch's own kernels.

Imported only when a Torch backend is built (``make_backend("torch")``), never by ``import embedtools``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import torch
import torch.utils.dlpack

from embedtools.backends._dtypes import dtype_table, lookup_dtype
from embedtools.backends._norms import COSINE_RANGE, SQUARES_RANGE
from embedtools.backends._shared import SPEEDUP_SHAPE, SharedOps, measured_speedup
from embedtools.backends.torch_products import BLOCK_PRODUCTS, INT_MM, PLAIN_PRODUCT, QUERY_CLASSES, TIMED_PRODUCT_WORK, fastest_block_product, int8_scores
from embedtools.errors import BackendUnavailableError, DimensionError, InvalidArgumentError
from embedtools.protocols import Capabilities, DTypeName, HostFloat, LowPrecisionGemm, Quantization
from embedtools.quantize import check_codes
from embedtools.search.exact import BlockedTopk
from embedtools.search.select import Candidates, HostBlock

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["TorchBackend", "torch_devices"]

_DTYPES: dict[str, torch.dtype] = dtype_table(lambda name: getattr(torch, name))


class _VectorNorm(Protocol):
    def __call__(self, x: torch.Tensor, ord: float = 2, dim: int | None = None, keepdim: bool = False) -> torch.Tensor: ...


# Typed once here, where torch's stubs fall short: linalg.vector_norm wraps torch._C._linalg, which
# has no stub, and from_numpy's parameter is unannotated.
_vector_norm = cast(_VectorNorm, torch.linalg.vector_norm)  # pyright: ignore[reportUnknownMemberType]
_from_numpy = cast("Callable[[npt.NDArray[Any]], torch.Tensor]", torch.from_numpy)  # pyright: ignore[reportUnknownMemberType]


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


class TorchBackend(SharedOps[torch.Tensor], BlockedTopk[torch.Tensor]):
    """Arrays are ``torch.Tensor`` on one device, chosen at construction (never on first use)."""

    name = "torch"

    def __init__(self, device: str | None = None, *, select_on_device: bool | None = None) -> None:
        """``select_on_device``: where the top-k selects a block's candidates; by default on a
        CUDA/MPS device, and on the CPU with NumPy from the block's own memory (torch's compare,
        nonzero and gathers cost more per block there). ``True`` on a CPU runs the device's path."""
        self._device = _resolve_device(device)
        self.device: str = str(self._device)
        gpu = self._device.type != "cpu"
        self.capabilities: Capabilities = Capabilities(select_on_device=gpu if select_on_device is None else select_on_device, gpu=gpu)
        self._speedups: dict[str, float] = {}
        self._block_products: dict[tuple[str, int], str] = {}

    def __repr__(self) -> str:
        return f"TorchBackend(device={self.device!r})"

    def asarray(self, data: object, dtype: DTypeName = "float32") -> torch.Tensor:
        target = _torch_dtype(dtype)
        if isinstance(data, torch.Tensor):
            return data.detach().to(device=self._device, dtype=target, copy=True)
        host = np.array(data, dtype=np.dtype(dtype))
        return _from_numpy(host).to(self._device)

    def from_numpy(self, array: npt.NDArray[Any], dtype: DTypeName = "float32") -> torch.Tensor:
        host = np.ascontiguousarray(array, dtype=np.dtype(_np_name(dtype)))
        if not host.flags.writeable:
            host = host.copy()  # torch cannot wrap read-only memory
        return _from_numpy(host).to(self._device)

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

    def dtype(self, array: torch.Tensor) -> str:
        return str(array.dtype).removeprefix("torch.")

    def nbytes(self, array: torch.Tensor) -> int:
        return int(array.element_size() * array.nelement())

    def zeros(self, shape: tuple[int, ...], dtype: DTypeName = "float32") -> torch.Tensor:
        return torch.zeros(shape, dtype=_torch_dtype(dtype), device=self._device)

    def ones(self, shape: tuple[int, ...], dtype: DTypeName = "float32") -> torch.Tensor:
        return torch.ones(shape, dtype=_torch_dtype(dtype), device=self._device)

    def random_normal(self, shape: tuple[int, ...],
                      *, seed: int | None = None, mean: float = 0.0, std: float = 1.0,
                      dtype: DTypeName = "float32") -> torch.Tensor:  # fmt: skip
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
        norms = _vector_norm(x, dim=-1)
        low, high = (bound**0.5 for bound in SQUARES_RANGE)
        odd = ~((norms >= low) & (norms <= high))
        if bool(odd.any()):  # squares beyond float32 (see _norms): scaled by each row's max, on the device
            biggest = x.abs().amax(dim=-1)
            unit = x / torch.where(biggest > 0, biggest, torch.ones_like(biggest)).unsqueeze(-1)
            norms = torch.where(odd, biggest * _vector_norm(unit, dim=-1), norms)
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
            length = _vector_norm(scaled, dim=-1, keepdim=True)
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

    def take_rows(self, array: torch.Tensor, indices: npt.NDArray[np.int64]) -> torch.Tensor:
        # index_select on the flat indices, reshaped: on a CPU it gathered a funnel's shortlists
        # faster than indexing with the 2-D array did (`bench_search --only real`, the torch store's funnel)
        flat = _from_numpy(np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)).to(array.device)
        return array.index_select(0, flat).reshape(*indices.shape, *array.shape[1:])

    @torch.no_grad()
    def dequantize(self, codes: torch.Tensor, kind: Quantization,
                   *, width: int, scale: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
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

    def float32(self, array: torch.Tensor) -> torch.Tensor:
        return array.to(torch.float32)

    def query_operand(self, queries: npt.NDArray[np.float32]) -> torch.Tensor:
        # the transpose of contiguous (queries, d): a CPU block's product takes it back as is
        return self.from_numpy(queries).T

    @torch.no_grad()
    def block_scores(self, corpus: torch.Tensor, rows: slice,
                     operand: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
                     rows_of: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:  # fmt: skip
        lhs = corpus[rows] if rows_of is None else rows_of(corpus[rows])
        if lhs.dtype == torch.int8:  # the integer product (low_precision("int8")), made as (queries, rows)
            block = int8_scores(lhs, operand).T
        elif operand.dtype != torch.float32 and lhs.device.type == "cuda":
            # float32 out: cuBLAS accumulates and reduces (split-K too) in float32, no bf16/fp16 rounding
            block = torch.mm(lhs, operand, out_dtype=torch.float32)
        elif lhs.device.type == "cpu" and lhs.dtype == operand.dtype and lhs.dtype in _BLOCK_DTYPES:
            # float32, bfloat16 or float16 by the way timed fastest for the dtype (torch_products.py);
            # a low-precision block (oneDNN: float32 sums, one rounding to the type) then in float32
            queries = int(operand.shape[1])
            timed = int(lhs.shape[0]) * int(lhs.shape[1]) * queries >= TIMED_PRODUCT_WORK
            block = BLOCK_PRODUCTS[self.block_product(queries, self.dtype(lhs)) if timed else PLAIN_PRODUCT](lhs, operand)
            if block.dtype == torch.bfloat16 and scale is None and shift is None and not self.capabilities.select_on_device:
                return block  # selected on the host from its words (search.select.HostBlock): not widened here
            if block.dtype != torch.float32:
                block = block.to(torch.float32)
        else:
            block = lhs @ operand
            if block.dtype != torch.float32:  # a low-precision product (MPS): its one rounding, then float32
                block = block.to(torch.float32)
        if scale is not None:
            block.mul_(scale[rows].unsqueeze(1))
        if shift is not None:
            block.sub_(shift[rows].unsqueeze(1))
        return block

    @torch.no_grad()
    def host_matmul(self, a: npt.NDArray[HostFloat], b: npt.NDArray[HostFloat]) -> npt.NDArray[HostFloat]:
        # on the CPU whatever the device: small host operands, multiplied by torch's intra-op threads
        # (the ones its GEMMs use), so NumPy's BLAS threads never wake to spin beside them
        out: npt.NDArray[HostFloat] = (_host_tensor(a) @ _host_tensor(b)).numpy()
        return out

    def host_block(self, block: torch.Tensor) -> HostBlock:
        if block.dtype == torch.bfloat16:  # its words, viewed (NumPy has no bfloat16)
            words: npt.NDArray[np.int16] = block.view(torch.int16).cpu().numpy()
            return words
        return _host_f32(block)  # on the CPU, the tensor's own memory

    @torch.no_grad()
    def device_candidates(self, block: torch.Tensor, m: int, threshold: npt.NDArray[np.float32]) -> Candidates:
        """Until every query has ``m`` candidates, the block's top ``m`` by ``torch.topk``; after
        that, one compare against each query's threshold rejects nearly the whole block."""
        n, queries = block.shape
        if np.isneginf(threshold).any():
            if m >= n:
                vals, idx = block, torch.arange(n, device=block.device).unsqueeze(1).expand(n, queries)
            else:
                vals, idx = torch.topk(block, m, dim=0, largest=True, sorted=False)
            rows = np.repeat(np.arange(queries, dtype=np.int64), idx.shape[0])
            return rows, _host_f32(vals.T).reshape(-1), _host_i64(idx.T).reshape(-1)
        limit = _from_numpy(threshold).to(block.device)
        cols, query_rows = torch.nonzero(block > limit, as_tuple=True)
        return _host_i64(query_rows), _host_f32(block[cols, query_rows]), _host_i64(cols)

    @torch.no_grad()
    def nth_best(self, block: torch.Tensor, n: int) -> npt.NDArray[np.float32]:
        return _host_f32(torch.topk(block, n, dim=0).values[n - 1])

    def frame_rows(self, rows: torch.Tensor, scale: float, centre: torch.Tensor | None) -> torch.Tensor:
        out = rows * scale if scale != 1.0 else rows
        return out - centre if centre is not None else out

    def low_precision(self, kind: Quantization) -> LowPrecisionGemm[torch.Tensor] | None:
        """torch's own bf16/fp16 matmul: oneDNN on a CPU (AVX512-BF16/AMX where present; products
        exact in float32, float32 accumulation, the output rounded to the type once), cuBLAS on
        CUDA (float32 out, see ``block_scores``), MPS's on Apple GPUs. ``int8`` on a CPU only:
        ``torch._int_mm`` (oneDNN's u8s8s32 kernels, VNNI where present), exact in int32; CUDA's
        wants shapes in multiples of 8 and is left to the decoded path until a GPU run times it."""
        if kind == "int8":
            return LowPrecisionGemm(_same, self._int8_operand, None) if self._device.type == "cpu" and INT_MM is not None else None
        low = _LOW.get(kind)
        if low is None:
            return None
        as_rows = _bf16_rows if kind == "bfloat16" else _same

        def operand(queries: npt.NDArray[np.float32]) -> torch.Tensor:
            return self.from_numpy(queries).to(low).T

        def values(queries: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
            return _host_f32(self.from_numpy(queries).to(low))

        return LowPrecisionGemm(as_rows, operand, values)

    def _int8_operand(self, packed: npt.NDArray[np.float32]) -> torch.Tensor:
        """The host ``(q, d + 2)`` steps, scale and offset as one int8 tensor ``(q, d + 8)``: the
        steps, then the scale's and offset's float32 bytes (:func:`~embedtools.backends.torch_products.int8_scores` views them back)."""
        dim = packed.shape[1] - 2
        out = np.empty((packed.shape[0], dim + 8), dtype=np.int8)
        out[:, :dim] = packed[:, :dim]
        out[:, dim:] = np.ascontiguousarray(packed[:, dim:], dtype=np.float32).view(np.int8)
        return self.from_numpy(out, dtype="int8")

    def float32_product(self, queries: int = SPEEDUP_SHAPE[2]) -> str:
        """The way this backend makes a CPU float32 score block for ``queries`` queries (:meth:`block_product`)."""
        return self.block_product(queries, "float32")

    @torch.no_grad()
    def block_product(self, queries: int = SPEEDUP_SHAPE[2], dtype: str = "float32") -> str:
        """The name of the way (:data:`BLOCK_PRODUCTS`) this backend makes a CPU score block of
        ``dtype`` (``float32``, ``bfloat16``, ``float16``) for ``queries`` queries: per
        :data:`QUERY_CLASSES` class, the plain product or the fastest, timed once on a block of
        :data:`SPEEDUP_SHAPE`'s rows and width, as the fastest differs by CPU and dtype
        (``bench_search --only exact`` times a batch's); the plain product on a GPU. Scores differ
        between ways in their last bits only: exact search settles those (``search/settle.py``), and
        a low-precision way's one rounding to its type is the certified bound's."""
        timed_queries = QUERY_CLASSES[max(c for c in QUERY_CLASSES if c <= max(queries, 1))]
        if self._device.type != "cpu" or timed_queries is None:
            return PLAIN_PRODUCT
        if (dtype, timed_queries) not in self._block_products:
            self._block_products[(dtype, timed_queries)] = fastest_block_product(_LOW.get(dtype, torch.float32), timed_queries)
        return self._block_products[(dtype, timed_queries)]

    @torch.no_grad()
    def gemm_speedup(self, kind: Quantization) -> float:
        if kind not in self._speedups:
            low = _LOW.get(kind)
            if low is None and self.low_precision(kind) is None:
                return 0.0
            rows, width, queries = SPEEDUP_SHAPE
            generator = torch.Generator(device=self._device).manual_seed(0)
            a = torch.randn(rows, width, generator=generator, device=self._device)
            b = torch.randn(queries, width, generator=generator, device=self._device).T  # as query_operand makes it
            float32 = BLOCK_PRODUCTS[self.float32_product()]
            if low is None:  # int8, on a CPU: the screen's own operand and product
                a_low = torch.randint(-128, 128, (rows, width), generator=generator, dtype=torch.int8)
                packed = np.ones((queries, width + 2), dtype=np.float32)
                packed[:, :width] = torch.randint(-127, 128, (queries, width), generator=generator).numpy()
                b_low = self._int8_operand(packed)
            else:
                a_low, b_low = a.to(low), b.to(low)

            def wait(_: object) -> None:
                if self._device.type == "cuda":
                    torch.cuda.synchronize(self._device)
                elif self._device.type == "mps":
                    torch.mps.synchronize()

            def speedup(way: str) -> float:
                product = BLOCK_PRODUCTS[way]

                def run_low(n: int) -> torch.Tensor:
                    return int8_scores(a_low[:n], b_low) if low is None else product(a_low[:n], b_low)

                return measured_speedup(lambda n: float32(a[:n], b), run_low, wait)

            try:
                found = speedup(PLAIN_PRODUCT)
                # where the native product would run (at least float32's speed), by the way its blocks
                # would take: its ways are timed only then, as a slow one (float16 on most CPUs) is slow each way
                if low is not None and found >= 1.0 and (way := self.block_product(queries, kind)) != PLAIN_PRODUCT:
                    found = speedup(way)
                self._speedups[kind] = found
            except (RuntimeError, TypeError, NotImplementedError):  # a device or torch without this product: none
                self._speedups[kind] = 0.0
        return self._speedups[kind]


_LOW: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16}
#: The dtypes a CPU score block is made in by a timed way (``block_product``).
_BLOCK_DTYPES = (torch.float32, *_LOW.values())


def _bf16_rows(codes: torch.Tensor) -> torch.Tensor:
    return codes.view(torch.bfloat16)  # the index's int16 words are torch's own bfloat16


def _same(codes: torch.Tensor) -> torch.Tensor:
    return codes


def _np_name(dtype: str) -> str:
    _torch_dtype(dtype)  # refuses names torch does not know, with the same error as elsewhere
    return dtype


def _host_tensor(a: npt.NDArray[Any]) -> torch.Tensor:
    """A CPU tensor over ``a``'s memory; a read-only array (a memory-mapped table's) is copied,
    as torch may not share it."""
    return _from_numpy(a if a.flags.writeable else a.copy())


def _host_f32(t: torch.Tensor) -> npt.NDArray[np.float32]:
    out: npt.NDArray[np.float32] = t.detach().to("cpu", torch.float32).numpy()
    return out


def _host_i64(t: torch.Tensor) -> npt.NDArray[np.int64]:
    out: npt.NDArray[np.int64] = t.detach().to("cpu", torch.int64).numpy()
    return out
