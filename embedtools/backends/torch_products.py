"""The ways a torch backend can make a CPU score block, and which of them it times.

One product, three kernels: MKL's (oneDNN's, for bfloat16) matmul either way round and oneDNN's
inner product. Which runs fastest depends on the CPU, its BLAS and the dtype, so
:class:`~embedtools.backends.torch.TorchBackend` times them once per dtype and class of query
counts (``block_product``) and runs the fastest; this module only lists them.
Imported with the torch backend, never by ``import embedtools``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch

from embedtools.backends._shared import SPEEDUP_SHAPE

__all__ = ["BLOCK_PRODUCTS", "PLAIN_PRODUCT", "QUERY_CLASSES", "TIMED_PRODUCT_WORK", "onednn_linear"]


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
#: (queries, rows), the reverse of the float32 order there (a scratch profile; ``bench_backends``
#: times each).  A low-precision way rounds each score once, to its dtype, after float32
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
