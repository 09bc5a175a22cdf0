"""Issue 5's figure: for each backend and device usable here, batched exact top-10 over 200,000 x 384
float32 rows with 100 cosine queries, as a ratio to that library's own naive form in the same run.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python -m benchmarks.bench_backends

Naive forms, each on a table normalised beforehand (so they skip work the store does per search):
NumPy ``Qn @ Xn.T`` + ``argpartition`` + sort of the k; torch ``torch.topk(Qn @ Xn.T, k)``; MLX
``argpartition`` + ``take_along_axis`` + sort of the k (MLX has no top-k with indices), evaluated; MLX's
naive form is also timed in the store's product layout (``table @ queries.T``, the right operand made
contiguous), which MLX's CPU matmul runs about twice as fast as ``queries @ table.T``.
The figure is the naive form's best-of-N time divided by the store's (> 1: the store is faster), the
two timed alternately so that drifting load on a shared machine hits both alike.

``--quantized`` adds, per backend and device, quantised search (int8 rescore 4, binary rescore 10)
against that backend's exact search: the codes live on the backend's device and are decoded there
block by block, so this is the figure to read on a GPU machine. ``--k 5000`` times large shortlists.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

import embedtools as et
from benchmarks.common import print_header, clustered, interleaved_best, problem_arguments, queries_near
from embedtools.backends import available_backends, devices
from embedtools.quantize import Quantization


def naive(name: str, device: str, table: np.ndarray, queries: np.ndarray, k: int, rows_left: bool = False) -> Callable[[], Any]:
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    if name == "numpy":

        def run_numpy() -> Any:
            qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
            s = qn @ unit.T
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            return np.take_along_axis(part, np.argsort(-np.take_along_axis(s, part, axis=1), axis=1), axis=1)

        return run_numpy
    if name == "torch":
        import torch

        xt = torch.from_numpy(unit).to(device)
        qt = torch.from_numpy(queries).to(device)

        def run_torch() -> Any:
            with torch.no_grad():
                qn = torch.nn.functional.normalize(qt, dim=1)
                out = torch.topk(qn @ xt.T, k, dim=1).indices.cpu()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return out

        return run_torch
    import mlx.core as mx

    dev = mx.Device(mx.gpu if device == "gpu" else mx.cpu)
    xm, qm = mx.array(unit), mx.array(queries)

    def run_mlx() -> Any:
        qn = qm / mx.linalg.norm(qm, axis=1, keepdims=True, stream=mx.cpu)
        if rows_left:  # the layout the store uses: table @ contiguous queries.T, transposed back
            s = mx.transpose(mx.matmul(xm, mx.contiguous(qn.T, stream=dev), stream=dev), stream=dev)
        else:
            s = mx.matmul(qn, xm.T, stream=dev)
        part = mx.argpartition(-s, kth=k - 1, axis=1, stream=dev)[:, :k]
        vals = mx.take_along_axis(s, part, axis=1, stream=dev)
        out = mx.take_along_axis(part, mx.argsort(-vals, axis=1, stream=dev), axis=1, stream=dev)
        mx.eval(out)
        return out

    return run_mlx


def main() -> None:
    parser = problem_arguments(__doc__)
    parser.add_argument("--only", default=None, help="one backend name")
    parser.add_argument("--quantized", action="store_true", help="also time quantised search on each backend")
    parser.add_argument("--k", type=int, default=10, help="top-k (1000 or 5000: a reranker's shortlist)")
    args = parser.parse_args()
    print_header("benchmarks.bench_backends")
    table = clustered(args.rows, args.dim, seed=0)
    queries = queries_near(table, args.queries, seed=1)
    k = args.k
    reference: np.ndarray | None = None
    print(f"{args.rows:,} x {args.dim} float32, {args.queries} cosine queries, top-{k}; best of {args.repeat}")
    print(f"{'backend':<14}{'store.search':>14}{'naive':>12}{'naive/store':>13}  ids == numpy")
    for name in available_backends():
        if args.only and name != args.only:
            continue
        for device in devices(name):
            backend = et.make_backend(name, device)
            store = et.EmbeddingStore(backend, et.ByteBudget(8 << 30), et.Sha256Hasher())
            store.add(table)
            repeat = args.repeat if not (name == "mlx" and device == "cpu") else max(2, args.repeat // 2)
            store.search(queries, k=k)  # warm-up (kernels, caches)
            fn = naive(name, device, table, queries, k)
            fn()
            timed = interleaved_best({"store": lambda: store.search(queries, k=k), "naive": fn}, repeat)  # noqa: B023
            ours, theirs = timed["store"], timed["naive"]
            ids = store.search(queries, k=k).indices
            if reference is None:
                reference = ids
            agree = float(np.mean(ids == reference))
            print(f"{name + '-' + device:<14}{ours * 1e3:>11.1f} ms{theirs * 1e3:>9.1f} ms{theirs / ours:>12.2f}x  {agree:.4f}")
            if name == "mlx":  # MLX's matmul is layout-sensitive: the naive form in the store's layout too
                fn = naive(name, device, table, queries, k, rows_left=True)
                timed = interleaved_best({"store": lambda: store.search(queries, k=k), "naive": fn}, repeat)  # noqa: B023
                print(f"  naive as table @ queries.T: {timed['naive'] * 1e3:.1f} ms vs store {timed['store'] * 1e3:.1f} ms "
                      f"= {timed['naive'] / timed['store']:.2f}x")
            if name == "torch" and device == "cpu":
                first_calls(args.dim)
            if args.quantized:
                quantized(store, queries, k, repeat)


def first_calls(dim: int) -> None:
    """Each of the torch backend's float32 block products on shapes it has not met (a small table's
    one block): the first call beside the next, which is why small blocks take the plain product."""
    import time

    import torch

    from embedtools.backends.torch_products import BLOCK_PRODUCTS, TIMED_PRODUCT_WORK

    cells = []
    for name, product in BLOCK_PRODUCTS.items():
        first: list[float] = []
        again: list[float] = []
        for rows in (777, 1001, 1999):  # sizes no other call here used
            block, operand = torch.randn(rows, dim), torch.randn(8, dim).T
            for times in (first, again):
                start = time.perf_counter()
                product(block, operand)
                times.append(time.perf_counter() - start)
        cells.append(f"{name} first {max(first) * 1e3:.2f} ms, then {max(again) * 1e3:.2f} ms")
    print(f"  torch float32 block products on new shapes (8 queries, up to 1,999 rows), slowest of three: {'; '.join(cells)}; "
          f"blocks under {TIMED_PRODUCT_WORK:,} multiply-adds take the plain one")


def quantized(store: et.EmbeddingStore, queries: np.ndarray, k: int, repeat: int) -> None:
    """Quantised search on this store's backend beside its exact search, interleaved."""
    d = queries.shape[1]
    exact = store.search(queries, k=k).indices
    settings: tuple[tuple[Quantization, int], ...] = (("int8", 4), ("binary", 10))
    for kind, rescore in settings:
        store.quantize(d, kind)
        store.search(queries, k=k, quantized=kind, rescore=rescore)  # warm-up
        timed = interleaved_best(
            {
                "exact": lambda: store.search(queries, k=k),
                "quantized": lambda: store.search(queries, k=k, quantized=kind, rescore=rescore),  # noqa: B023
            },
            repeat,
        )
        found = store.search(queries, k=k, quantized=kind, rescore=rescore).indices
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(found.tolist(), exact.tolist(), strict=True)])
        size = store.memory_info().tables[d].quantized[kind]
        print(
            f"  {kind:<7} rescore {rescore:<3} {timed['quantized'] * 1e3:>9.1f} ms vs exact {timed['exact'] * 1e3:.1f} ms "
            f"= {timed['exact'] / timed['quantized']:.2f}x; recall@{k} {recall:.4f}; index {size / 2**20:.1f} MiB"
        )
        store.drop_quantized(d, kind)


if __name__ == "__main__":
    main()
