"""The ways a torch backend can make a CPU score block, which of them it times, and its integer product.

One product, three kernels: MKL's (oneDNN's, for bfloat16) matmul either way round and oneDNN's
inner product. Which runs fastest depends on the CPU, its BLAS and the dtype, so
:class:`~embedtools.backends.torch.TorchBackend` times them once per dtype and class of query
counts (``block_product``) and runs the fastest; this module only lists them.
Imported with the torch backend, never by ``import embedtools``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import cast

import torch

from embedtools.backends._shared import SPEEDUP_SHAPE, fastest

__all__ = ["BLOCK_PRODUCTS", "INT_MM", "PLAIN_PRODUCT", "QUERY_CLASSES", "TIMED_PRODUCT_WORK", "fastest_block_product", "int8_scores", "onednn_linear"]

#: int8 x int8 -> int32 (oneDNN on a CPU); private to torch, so looked up rather than imported, and
#: ``None`` in a torch without it (then no integer product).
INT_MM = cast("Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None", getattr(torch, "_int_mm", None))


def onednn_linear(rows: torch.Tensor, operand: torch.Tensor) -> torch.Tensor:
    # oneDNN's inner product (the op torch.compile lowers linear layers to); private to
    # torch, so looked up at call time: a torch without it raises, and fastest() leaves it out.
    # Strided rows (the sampled floor's every 32nd row) are copied first: oneDNN ran many times
    # slower on them than the copy and a contiguous block's product together (a scratch profile).
    try:
        linear = cast("Callable[..., torch.Tensor]", torch.ops.mkldnn._linear_pointwise)
    except AttributeError:  # an op namespace lacking it raises this, which fastest() would not catch
        raise NotImplementedError("this torch has no oneDNN linear op") from None
    return linear(operand.T, rows.contiguous(), None, "none", [], "").T


#: Ways to make a CPU score block ``(rows, queries)`` from a block of rows and the queries' operand
#: (the transpose of contiguous queries), of one dtype (float32, or a low-precision screen's
#: bfloat16/float16), each the same product: the first is the plain one. Which is fastest depends on
#: the CPU, its BLAS and the dtype (``bench_search --only exact`` times each float32 way on the
#: store's blocks): for float32, oneDNN's on a 2-core AMD EPYC with AVX-512, where MKL takes a slower
#: path; MKL's (queries, rows) product beat its (rows, queries) one on a 2-core Intel Xeon. For
#: bfloat16 on an Intel Xeon with AMX, (rows, queries) ran the screen's blocks in half the time of
#: (queries, rows), the reverse of the float32 order there (``bench_search --only certified`` times
#: each way of the screen's product). A low-precision way rounds each score once, to its dtype, after float32
#: accumulation (oneDNN's kernels, the certified bounds' model): the certified tests hold every way.
BLOCK_PRODUCTS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "matmul (rows, queries)": lambda rows, operand: rows @ operand,
    "matmul (queries, rows)": lambda rows, operand: (operand.T @ rows.T).T,
    "oneDNN linear": onednn_linear,
}
#: The way that needs no timing and runs everywhere (a GPU's, a small block's, a few queries').
PLAIN_PRODUCT = next(iter(BLOCK_PRODUCTS))


#: Fewest multiply-adds (rows x width x queries) in a CPU block that takes the timed way
#: (``TorchBackend.block_product``); a smaller one takes the plain product: oneDNN builds a kernel
#: for each new shape it meets (``bench_backends`` times that first call), about a millisecond that
#: only a large block's product repays. One query over 200,000 x 384 rows is past it.
TIMED_PRODUCT_WORK = 1 << 26
#: Classes of query counts (from each key up) and the number of queries each class's block
#: products are timed with on one block in cache (``TorchBackend.block_product``). A few queries'
#: product reads each row for a few multiply-adds: it runs at the speed of memory, which a block in
#: cache does not show, so those take the plain product. One query's and a batch's are timed.
QUERY_CLASSES: dict[int, int | None] = {1: 1, 2: None, 16: SPEEDUP_SHAPE[2]}


def fastest_block_product(dtype: torch.dtype, queries: int) -> str:
    """The name of the fastest of :data:`BLOCK_PRODUCTS` for ``dtype`` blocks of ``queries``
    queries, timed on one block of :data:`SPEEDUP_SHAPE`'s rows and width on the CPU."""
    rows, width, _ = SPEEDUP_SHAPE
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lhs = torch.randn(rows, width, generator=generator).to(dtype)
        operand = torch.randn(queries, width, generator=generator).to(dtype).T  # as query_operand makes it
        ways = {name: partial(product, lhs, operand) for name, product in BLOCK_PRODUCTS.items()}
        return fastest(ways, lambda _: None, repeats=5)


def int8_scores(codes: torch.Tensor, operand: torch.Tensor) -> torch.Tensor:
    """``(queries, rows)`` float32 scores ``α·(steps·codes) + β`` of an int8 operand (the steps,
    then α's and β's float32 bytes: ``TorchBackend.low_precision("int8")``'s): the int32 product,
    converted in place, scaled, offset."""
    dim = operand.shape[1] - 8
    terms = operand[:, dim:].contiguous().view(torch.float32)
    steps = operand[:, :dim]
    if dim == 1:  # torch 2.13's CPU _int_mm sums a width of 1 wrongly (tests/test_int8_screen.py): an outer product
        product = steps.to(torch.int32) * codes.T.to(torch.int32)
    else:
        assert INT_MM is not None
        product = INT_MM(steps, codes.T)
    # converted in place (int32 and float32 are the same size, read and written element by element):
    # the block's memory stays one score block, and the pass ran faster than into a new tensor
    scores = product.view(torch.float32)
    scores.copy_(product)
    return scores.mul_(terms[:, :1]).add_(terms[:, 1:])
