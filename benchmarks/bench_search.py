"""Issue 6's figures: exact search against its floors and its peers, the funnel, one query, big batches.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python -m benchmarks.bench_search
    .venv/bin/python -m benchmarks.bench_search            # as the machine sets OpenBLAS up
    ... --big                                             # adds 1,000,000 x 384 with 1,000 queries
    ... --big-only                                        # just that section
    ... --only funnel,real                                # some sections
    ... --only certified,certified-sets                   # issue 16's certified screening (benchmarks/bench_certified.py)
    ... --only certified --rows 1000000 --dim 1024 --queries 1000 --device cuda:0 --screens bfloat16,float16
    ... --scaling [--quick] [--out PNG]                   # time and memory over rows, queries, dims (bench_scaling.py)

Every figure is printed beside its reference from the same run, as a ratio:

* floors: the sgemm rate (a 2048³ product) turned into the GEMM time the search needs
  (2·q·n·d flop), and the read bandwidth (one pass over the table) turned into one read's time,
  each timed in turns with what it is the floor of, so drifting load moves both alike;
* exact cosine top-10 over 200,000 x 384 clustered rows, 100 queries: the store (NumPy backend)
  against NumPy naive, torch naive, faiss ``IndexFlatIP``, usearch exact and sentence-transformers
  ``semantic_search`` (each skipped with a note if not installed: ``pip install -e '.[bench]'``),
  with recall@10 against a float64 reference;
* one query against one read of the table;
* Matryoshka funnel (64-d shortlist of 200, rescored at 384-d) against exact 384-d search, on a
  Matryoshka-like set (PCA-rotated clusters: variance falls along the dimensions), with recall@10;
* the same exact search on the torch backend, and issue 16's float32 targets as ratios to torch naive;
* real embeddings (36,500 MiniLM rows, 1,000 queries): the rotated funnel and int8 ``rescore=2`` against
  exact search, with the bare products and the int8 codes' widening that say where each one's time goes (and
  whether the table fits in the CPU's last-level cache), and shortlist sweeps from 10 to 1,000, each
  time against the next longer shortlist's;
* ``--big``: 1,000,000 x 384, 1,000 queries, peak RSS beyond the table in a fresh process for the
  store and for NumPy naive, and their times.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

import embedtools as et
import embedtools.search.kernel as search_module
from benchmarks import bench_certified, bench_scaling
from benchmarks.common import best_of, clustered, interleaved_best, last_level_cache, matryoshka_like, print_header, problem_arguments, queries_near
from embedtools.backends.numpy import NumpyBackend
from embedtools.quantize import CODECS, QUANTIZATIONS, check_quantization
from embedtools.search import BLOCK_ROWS, rows_per_block

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
K = 10
NUMPY_NAIVE = "numpy naive (matmul + argpartition)"
TORCH_NAIVE = "torch naive (matmul + topk)"


def recall(found: I64, truth: I64) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found.tolist(), truth.tolist(), strict=True)]))


def truth_cosine(table: F32, queries: F32) -> I64:
    x = table.astype(np.float64)
    q = queries.astype(np.float64)
    s = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (x / np.linalg.norm(x, axis=1, keepdims=True)).T
    out: I64 = np.argsort(-s, axis=1, kind="stable")[:, :K]
    return out


def numpy_store(table: F32) -> et.EmbeddingStore:
    store = et.EmbeddingStore(et.make_backend("numpy"), et.ByteBudget(16 << 30), et.Sha256Hasher())
    store.add(table)
    return store


def peers(table: F32, queries: F32) -> dict[str, Callable[[], I64]]:
    """Each peer's exact cosine top-10, built outside the timing; absent peers are left out."""
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    out: dict[str, Callable[[], I64]] = {}

    def numpy_naive() -> I64:
        qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        s = qn @ unit.T
        part = np.argpartition(-s, K - 1, axis=1)[:, :K]
        idx: I64 = np.take_along_axis(part, np.argsort(-np.take_along_axis(s, part, axis=1), axis=1), axis=1)
        return idx

    out[NUMPY_NAIVE] = numpy_naive
    if importlib.util.find_spec("torch"):
        import torch

        xt, qt = torch.from_numpy(unit), torch.from_numpy(queries)

        def torch_naive() -> I64:
            with torch.no_grad():
                s = torch.nn.functional.normalize(qt, dim=1) @ xt.T
                idx: I64 = torch.topk(s, K, dim=1).indices.numpy()
            return idx

        out[TORCH_NAIVE] = torch_naive
    if importlib.util.find_spec("faiss"):
        import faiss

        index = faiss.IndexFlatIP(table.shape[1])
        index.add(unit)

        def faiss_flat() -> I64:
            qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
            idx: I64 = index.search(qn, K)[1]
            return idx

        out["faiss IndexFlatIP"] = faiss_flat
    if importlib.util.find_spec("usearch"):
        from usearch.index import search as usearch_search

        def usearch_exact() -> I64:
            idx: I64 = np.asarray(usearch_search(table, queries, K, "cos", exact=True).keys, dtype=np.int64)
            return idx

        out["usearch exact"] = usearch_exact
    if importlib.util.find_spec("sentence_transformers") and importlib.util.find_spec("torch"):
        import torch
        from sentence_transformers.util import semantic_search

        xt_raw, qt_raw = torch.from_numpy(table), torch.from_numpy(queries)

        def st_semantic_search() -> I64:
            hits = semantic_search(qt_raw, xt_raw, top_k=K)
            return np.array([[h["corpus_id"] for h in row] for row in hits], dtype=np.int64)

        out["sentence-transformers semantic_search"] = st_semantic_search
    return out


def section_exact(rows: int, dim: int, n_queries: int, repeat: int) -> None:
    """Every method timed in turns with the sgemm that sets the floor (``interleaved_best``), so a
    shift in the shared machine's load moves the floor and the methods alike. Every method scores
    the same unit rows (as an embedding model writes them, and as the naive peers were always given
    them): the stores held the raw clustered rows, and scaled each block by ``1/|x|``, until issue 16's
    runs on an AMX Xeon."""
    raw = clustered(rows, dim, seed=0)
    queries = queries_near(raw, n_queries, seed=1)
    table = np.ascontiguousarray(raw / np.linalg.norm(raw, axis=1, keepdims=True), dtype=np.float32)
    truth = truth_cosine(table, queries)
    store = numpy_store(table)
    square = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    fast: dict[str, Callable[[], I64]] = {}
    slow: dict[str, Callable[[], I64]] = {}
    for name, fn in peers(table, queries).items():
        fn()
        (slow if "usearch" in name or "faiss" in name else fast)[name] = fn
    ours = "embedtools store (numpy)"
    qn = np.ascontiguousarray(queries / np.linalg.norm(queries, axis=1, keepdims=True))
    starts = range(0, rows, BLOCK_ROWS)

    def blocks_streamed() -> None:  # the store's GEMMs alone: each block read from memory
        for start in starts:
            table[start : start + BLOCK_ROWS] @ qn.T

    def blocks_cached() -> None:  # as many GEMMs of the same shape on one block that stays in cache
        for _ in starts:
            table[:BLOCK_ROWS] @ qn.T

    kernel_backend = et.make_backend("numpy")
    kernel_rows = kernel_backend.from_numpy(table)
    kernel_norms = kernel_backend.row_norms(kernel_rows)

    def float32_kernel() -> None:  # the blocked kernel alone: the store's exact search before settling near-ties
        kernel_backend.topk(kernel_backend.from_numpy(queries), kernel_rows, K, "cosine", corpus_norms=kernel_norms)

    ours_torch = "embedtools store (torch)"
    torch_products: dict[str, Callable[[], object]] = {}
    torch_chosen = ""
    torch_store: et.EmbeddingStore | None = None
    torch_backend: Any = None
    if importlib.util.find_spec("torch"):
        torch_backend = et.make_backend("torch", "cpu")
        torch_store = et.EmbeddingStore(torch_backend, et.ByteBudget(16 << 30), et.Sha256Hasher())
        torch_store.add(table)
        fast[ours_torch] = lambda: torch_store.search(queries, k=K).indices
        fast[ours_torch]()  # warm-up
        torch_products, torch_chosen = torch_block_products(torch_backend, table, qn)
    timed = interleaved_best(
        {
            "sgemm": lambda: square @ square,
            "product": lambda: queries @ unit.T,
            "streamed": blocks_streamed,
            "cached": blocks_cached,
            "kernel": float32_kernel,
            ours: lambda: store.search(queries, k=K),
            **fast,
            **torch_products,
        },
        repeat,
    )
    if slow:  # seconds each: fewer turns, each beside the store again
        slow_timed = interleaved_best({ours: lambda: store.search(queries, k=K), **slow}, max(2, repeat // 2))
        timed.update({name: slow_timed[name] * timed[ours] / slow_timed[ours] for name in slow})  # as ratios to the store
    rate = 2 * 2048**3 / timed["sgemm"]
    floor = 2 * n_queries * rows * dim / rate
    print(f"sgemm rate (2048^3, best of {repeat}, interleaved with the searches): {rate / 1e9:.0f} GFLOP/s")
    print(f"\n== exact cosine top-{K}: {rows:,} x {dim}, {n_queries} queries (best of {repeat}, interleaved) ==")
    print(f"GEMM floor at the measured sgemm rate: {floor * 1e3:.1f} ms; this product alone (queries @ table.T): "
          f"{timed['product'] * 1e3:.1f} ms = {timed['product'] / floor:.2f}x the floor")
    print(f"the store's block GEMMs alone ({BLOCK_ROWS} rows each): {timed['streamed'] * 1e3:.1f} ms streamed from memory "
          f"({timed['streamed'] / floor:.2f}x floor), {timed['cached'] * 1e3:.1f} ms on one cached block "
          f"({timed['cached'] / floor:.2f}x); selection and merging add {(timed[ours] - timed['streamed']) * 1e3:.1f} ms")
    print(f"the float32 kernel alone (backend.topk, no near-tie settling): {timed['kernel'] * 1e3:.1f} ms; the store's exact "
          f"search, settled (search/settle.py): {timed[ours] * 1e3:.1f} ms = {timed[ours] / timed['kernel']:.2f}x the kernel")
    if torch_products:
        ways = ", ".join(f"{name.removeprefix('torch float32 blocks: ')} {timed[name] * 1e3:.1f} ms" for name in torch_products)
        print(f"torch's float32 block products ({BLOCK_ROWS} rows each, streamed): {ways}; its backend runs {torch_chosen!r} "
              "(the fastest where it timed them once, on a smaller block)")
    found = {ours: store.search(queries, k=K).indices} | {name: fn() for name, fn in {**fast, **slow}.items()}
    for name in (ours, *fast, *slow):
        t = timed[name]
        line = f"{name:<40}{t * 1e3:9.1f} ms  {t / floor:5.2f}x floor  recall@10 {recall(found[name], truth):.4f}"
        print(line if name == ours else f"{line}   store is {t / timed[ours]:.2f}x faster")
    if slow:
        print(f"({', '.join(slow)}: timed in turns with the store {max(2, repeat // 2)} times; shown at their ratio to it)")
    torch_naive = timed.get(TORCH_NAIVE)
    if torch_naive is not None and ours_torch in timed:  # issue 16's float32 targets
        print(f"issue 16's float32 exact targets (vs {TORCH_NAIVE}, same run): torch backend "
              f"{torch_naive / timed[ours_torch]:.2f}x faster (target >= 1.2x), NumPy backend "
              f"{torch_naive / timed[ours]:.2f}x faster (target >= 1.0x)")
    naive = timed.get(NUMPY_NAIVE)
    if naive is not None:  # issue 6's two NumPy targets as budgets in floors, beside what OpenBLAS's GEMMs alone take
        budget = min(1.5, naive / 2 / floor)
        gemms, selection = timed["streamed"] / floor, (timed[ours] - timed["streamed"]) / floor
        left = f"{budget - gemms:.2f}x left for selection" if budget > gemms else "nothing left for selection"
        print(f"issue 6's NumPy targets as budgets: 1.50x floor, and 2x faster than NumPy naive = {naive / 2 / floor:.2f}x floor; "
              f"the block GEMMs alone take {gemms:.2f}x, {left}; selection took {selection:.2f}x")

    one = queries[:1]
    ones = np.ones(table.shape[1], dtype=np.float32)
    reads = interleaved_best({"matvec": lambda: table @ ones, "sum": lambda: table.sum(axis=0), "one query": lambda: store.search(one, k=K)}, repeat * 3)
    bandwidth = table.nbytes / min(reads["matvec"], reads["sum"])
    one_floor = table.nbytes / bandwidth
    single = reads["one query"]
    print(f"\n== one query over the {table.nbytes / 2**20:.0f} MiB table (interleaved with the reads) ==")
    print(f"one read at the measured bandwidth ({bandwidth / 1e9:.1f} GB/s): {one_floor * 1e3:.2f} ms; "
          f"store.search: {single * 1e3:.2f} ms = {single / one_floor:.2f}x the read")
    if torch_store is not None:
        # in turns of its own, beside torch's own read of the table: OpenBLAS's threads spin on after
        # NumPy's reads and slowed the torch search run next to about twice its time alone
        import torch

        xt, ones_t = torch.from_numpy(table), torch.from_numpy(ones)
        torch_reads = interleaved_best({"torch matvec": lambda: torch.mv(xt, ones_t), "torch one query": functools.partial(torch_store.search, one, k=K)},
                                       repeat * 3)  # fmt: skip
        torch_single, torch_read = torch_reads["torch one query"], torch_reads["torch matvec"]
        way = torch_backend.float32_product(1)
        print(f"the torch store, in turns with torch's own matvec ({torch_read * 1e3:.2f} ms): {torch_single * 1e3:.2f} ms = "
              f"{torch_single / one_floor:.2f}x the read above, {torch_single / torch_read:.2f}x torch's matvec (its one-query product where timed: {way!r})")


def torch_block_products(backend: object, table: F32, queries: F32, dtype: str = "float32") -> tuple[dict[str, Callable[[], object]], str]:
    """Each of the torch backend's ways to make a score block of ``dtype`` (float32, or a screen's
    bfloat16/float16), over the table's blocks as its searches walk them, and the way that backend
    chose (``TorchBackend.block_product``)."""
    import torch

    from embedtools.backends.torch import TorchBackend
    from embedtools.backends.torch_products import BLOCK_PRODUCTS

    assert isinstance(backend, TorchBackend)
    kind = getattr(torch, dtype)
    rows, operand = torch.from_numpy(table).to(kind), torch.from_numpy(queries).to(kind).T
    starts = range(0, table.shape[0], BLOCK_ROWS)

    def streamed(product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        with torch.no_grad():
            for start in starts:
                product(rows[start : start + BLOCK_ROWS], operand)

    ways: dict[str, Callable[[], object]] = {}
    for name, product in BLOCK_PRODUCTS.items():
        try:
            streamed(product)
        except (RuntimeError, NotImplementedError) as exc:  # an op this torch lacks: shown, not timed
            print(f"(torch's {name!r} {dtype} block product does not run here: {exc})")
            continue
        ways[f"torch {dtype} blocks: {name}"] = functools.partial(streamed, product)
    return ways, backend.block_product(queries.shape[0], dtype)


def section_large_k(rows: int, dim: int, n_queries: int, repeat: int) -> None:
    """Shortlists of hundreds or thousands (a reranker's input): the store against NumPy and torch
    naive at the same k, and against itself without the sampled floor (``SAMPLED_FLOOR_MIN`` raised
    past k for that call), interleaved; recall@k against float64."""
    table = clustered(rows, dim, seed=0)
    queries = queries_near(table, n_queries, seed=1)
    store = numpy_store(table)
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    exact = qn.astype(np.float64) @ unit.astype(np.float64).T
    torch_topk: Callable[[int], I64] | None = None
    if importlib.util.find_spec("torch"):
        import torch

        xt, qt = torch.from_numpy(unit), torch.from_numpy(qn)

        def torch_naive(k: int) -> I64:
            with torch.no_grad():
                idx: I64 = torch.topk(qt @ xt.T, k, dim=1).indices.numpy()
            return idx

        torch_topk = torch_naive
    print(f"\n== large k: exact cosine top-k over {rows:,} x {dim}, {n_queries} queries (best of {repeat}, interleaved) ==")
    for k in (100, 1000, 5000):

        def numpy_naive(k: int = k) -> I64:
            s = qn @ unit.T
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            idx: I64 = np.take_along_axis(part, np.argsort(-np.take_along_axis(s, part, axis=1), axis=1), axis=1)
            return idx

        def without_floor(k: int = k) -> I64:
            saved, search_module.SAMPLED_FLOOR_MIN = search_module.SAMPLED_FLOOR_MIN, 1 << 62
            try:
                return store.search(queries, k=k).indices
            finally:
                search_module.SAMPLED_FLOOR_MIN = saved

        def with_floor(k: int = k) -> I64:
            return store.search(queries, k=k).indices

        fns: dict[str, Callable[[], I64]] = {"store": with_floor, "no floor": without_floor, "numpy naive": numpy_naive}
        if torch_topk is not None:
            fns["torch naive"] = functools.partial(torch_topk, k)
        timed = interleaved_best(fns, repeat)
        truth = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        hit = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(fns["store"]().tolist(), truth.tolist(), strict=True)]))
        others = "  ".join(f"{name} {timed[name] * 1e3:.0f} ms ({timed[name] / timed['store']:.2f}x)" for name in fns if name != "store")
        print(f"k={k:<5} store {timed['store'] * 1e3:6.0f} ms  recall@k {hit:.4f}   vs  {others}")
    print("(ratios: the other's time over the store's; above 1 the store is faster. 'no floor' is the store with its "
          "sampled floor switched off)")


def section_funnel(rows: int, dim: int, n_queries: int, repeat: int) -> None:
    """Each shortlist timed in turns with exact search, so drifting load moves both alike."""
    table = matryoshka_like(rows, dim, seed=6)
    queries = queries_near(table, n_queries, seed=7)
    truth = truth_cosine(table, queries)
    store = numpy_store(table)
    shortlists = (200, 100, 50, 30)
    fns: dict[str, Callable[[], object]] = {"exact": lambda: store.search(queries, k=K)}
    for shortlist in shortlists:
        fns[str(shortlist)] = functools.partial(store.search, queries, k=K, funnel=[(64, shortlist)])
        fns[str(shortlist)]()  # builds the cached 64-d unit copy, as a first search would
    timed = interleaved_best(fns, repeat)
    exact = timed["exact"]
    print(f"\n== Matryoshka funnel on a Matryoshka-like set: {rows:,} x {dim}, {n_queries} queries "
          f"(exact {dim}-d: {exact * 1e3:.1f} ms; best of {repeat}, interleaved) ==")
    for shortlist in shortlists:
        t = timed[str(shortlist)]
        got = store.search(queries, k=K, funnel=[(64, shortlist)]).indices
        print(f"funnel 64-d shortlist {shortlist:>3} -> {dim}-d: {t * 1e3:6.1f} ms = {exact / t:.2f}x faster than exact; "
              f"recall@10 {recall(got, truth):.4f}")


def section_quantized(name: str, table: F32, queries: F32, repeat: int) -> None:
    truth = truth_cosine(table, queries)
    store = numpy_store(table)
    exact = best_of(lambda: store.search(queries, k=K), repeat)
    print(f"\n== quantised shortlists + exact rescoring, {name}: {table.shape[0]:,} x {table.shape[1]}, "
          f"{queries.shape[0]} queries (exact search {exact * 1e3:.1f} ms) ==")
    print(f"{'index':<10}{'bytes/row':>10}{'smaller':>9}{'rescore':>9}{'time':>11}{'vs exact':>10}{'recall@10':>11}")
    for kind in ("float16", "bfloat16", "int8", "binary"):
        store.quantize(table.shape[1], kind)
        index_bytes = store.memory_info().tables[table.shape[1]].quantized[kind]
        per_row = index_bytes / table.shape[0]
        for rescore in (4, 10, 40) if kind == "binary" else (1, 4, 10):
            t = best_of(lambda: store.search(queries, k=K, quantized=kind, rescore=rescore), repeat)  # noqa: B023
            got = store.search(queries, k=K, quantized=kind, rescore=rescore).indices
            print(f"{kind:<10}{per_row:>10.1f}{table.nbytes / index_bytes:>8.1f}x{rescore:>9}{t * 1e3:>8.1f} ms"
                  f"{exact / t:>9.2f}x{recall(got, truth):>11.4f}")
    # binary shortlist rescored against the int8 values: the float32 table is never read
    both = sum(store.memory_info().tables[table.shape[1]].quantized[kind] for kind in ("binary", "int8"))
    for rescore in (10, 40):
        def run(r: int = rescore) -> I64:
            return store.search(queries, k=K, quantized="binary", rescore=r, rescore_with="int8").indices

        t = best_of(run, repeat)
        print(f"{'bin+int8':<10}{both / table.shape[0]:>10.1f}{table.nbytes / both:>8.1f}x{rescore:>9}{t * 1e3:>8.1f} ms"
              f"{exact / t:>9.2f}x{recall(run(), truth):>11.4f}   (rescored with int8 values: no float32 read)")
    hamming_by_popcount(store, table, queries, repeat)
    for kind in QUANTIZATIONS:
        store.drop_quantized(table.shape[1], kind)


def hamming_by_popcount(store: et.EmbeddingStore, table: F32, queries: F32, repeat: int) -> None:
    """Why binary codes are ranked by a GEMM over decoded ±1 blocks: the same Hamming ranking by
    XOR + popcount (``np.bitwise_count`` over 64-bit words), blocked, timed beside it."""
    if not hasattr(np, "bitwise_count"):  # pragma: no cover - NumPy < 2.0
        return
    words = np.packbits(table > 0, axis=1)
    words = np.pad(words, ((0, 0), (0, -words.shape[1] % 8))).view(np.uint64)
    q_words = np.packbits(queries > 0, axis=1)
    q_words = np.pad(q_words, ((0, 0), (0, -q_words.shape[1] % 8))).view(np.uint64)
    shortlist = K * 4

    def popcount() -> I64:
        best = np.empty((queries.shape[0], 0), dtype=np.int64)
        dist = np.empty((queries.shape[0], 0), dtype=np.int64)
        for start in range(0, words.shape[0], 4096):
            block = np.bitwise_count(q_words[:, None, :] ^ words[None, start : start + 4096, :]).sum(axis=2, dtype=np.int64)
            dist = np.hstack([dist, block])
            best = np.hstack([best, np.arange(start, start + block.shape[1])[None, :].repeat(queries.shape[0], 0)])
            keep = np.argpartition(dist, min(shortlist, dist.shape[1] - 1), axis=1)[:, :shortlist]
            dist, best = np.take_along_axis(dist, keep, axis=1), np.take_along_axis(best, keep, axis=1)
        return best

    def gemm() -> I64:
        return store.search(queries, k=shortlist, quantized="binary", rescore=1).indices

    t_pop, t_gemm = best_of(popcount, repeat), best_of(gemm, repeat)
    print(f"binary shortlist of {shortlist} by XOR + popcount (np.bitwise_count): {t_pop * 1e3:.1f} ms; "
          f"by the store's GEMM on decoded blocks: {t_gemm * 1e3:.1f} ms ({t_pop / t_gemm:.2f}x)")


def section_real(repeat: int) -> None:
    """Issue 16's real-set targets on the NumPy store, each timed in turns with exact search: the rotated
    funnel ``[(128, 50)]`` (<= 0.5x exact), int8 with ``rescore=2`` (<= 1.0x), and shortlist sweeps
    from 10 to 1,000 where each time is read against the next longer shortlist's (none > 1.3x)."""
    try:
        from benchmarks.real_embeddings import load
    except ImportError as exc:  # pragma: no cover - the bench extra is not installed
        print(f"\n(real embeddings skipped: {exc}; pip install -e '.[bench]')")
        return
    corpus, queries = load()
    truth = truth_cosine(corpus, queries)
    store = numpy_store(corpus)
    d = corpus.shape[1]
    print(f"\n== real embeddings: all-MiniLM-L6-v2 over Python's and installed packages' documentation, "
          f"{corpus.shape[0]:,} x {d}, {queries.shape[0]} held-out texts as queries (best of {repeat}, interleaved) ==")
    for funnel in ([(64, 200)], [(128, 100)]):
        store.search(queries, k=K, funnel=funnel)  # builds the cached unit prefix, as a first search would
    store.fit_rotation(d, components=128)
    store.quantize(d, "int8")
    rotated = [(128, 50)]
    fns: dict[str, Callable[[], I64]] = {
        "exact": lambda: store.search(queries, k=K).indices,
        "funnel [(128, 50)] after fit_rotation(128)": lambda: store.search(queries, k=K, funnel=rotated).indices,
        "int8 rescore=2": lambda: store.search(queries, k=K, quantized="int8", rescore=2).indices,
    }
    # the bare products of both searches (the 128-d one on the plain prefix: the same shape and cost as
    # the rotated one), to show how much of each search is its GEMM and how much is the per-score rest
    unit = np.ascontiguousarray(corpus / np.linalg.norm(corpus, axis=1, keepdims=True))
    head, q_head = np.ascontiguousarray(unit[:, :128]), np.ascontiguousarray(queries[:, :128].T)
    q_full = np.ascontiguousarray(queries.T)
    # the int8 shortlist's widening of the codes alone, block by block as its search widens them
    # (search.int8_screen.int8_shortlist: no decode, the scale in the queries)
    codec = CODECS["int8"]
    calibration = codec.calibrate(corpus)
    assert calibration is not None
    codes = codec.encode(corpus, calibration, 0)
    decoded_rows = rows_per_block(queries.shape[0], gpu=False, decoded_width=d)
    widener = NumpyBackend()

    def widen_all() -> None:
        for start in range(0, codes.shape[0], decoded_rows):
            widener.float32(codes[start : start + decoded_rows])

    products: dict[str, Callable[[], object]] = {"384-d product": lambda: blocked_product(unit, q_full),
                                                 "128-d product": lambda: blocked_product(head, q_head),
                                                 "int8 widening": widen_all}  # fmt: skip
    for fn in [*fns.values(), *products.values()]:
        fn()  # warm-up: caches of the rotated norms and the int8 blocks
    timed = interleaved_best({**fns, **products}, repeat)
    exact = timed["exact"]
    for name, target in (("funnel [(128, 50)] after fit_rotation(128)", 0.5), ("int8 rescore=2", 1.0)):
        print(f"{name:<44}{timed[name] * 1e3:8.1f} ms = {timed[name] / exact:.2f}x exact ({exact * 1e3:.1f} ms; "
              f"target <= {target}x); recall@10 {recall(fns[name](), truth):.4f}")
    p384, p128, funnel_t = timed["384-d product"], timed["128-d product"], timed["funnel [(128, 50)] after fit_rotation(128)"]
    rest = exact - p384
    print(f"  why: the bare products take {p384 * 1e3:.1f} ms (384-d, exact's) and {p128 * 1e3:.1f} ms (128-d, the funnel's first "
          f"stage); exact search spends {rest * 1e3:.1f} ms beyond its product (comparing, selecting and merging every "
          f"score: as many scores in the funnel's first stage), so a funnel that only shrank the product would take "
          f"{(p128 + rest) / exact:.2f}x exact; this one spends {(funnel_t - p128 - rest) * 1e3:.1f} ms more (its shortlist "
          f"of 50 rescored at {d}-d, a longer running top)")
    cache = last_level_cache()
    fits = "no cache size known" if cache is None else (
        f"the float32 table ({unit.nbytes / 2**20:.0f} MiB) {'fits' if unit.nbytes <= cache else 'does not fit'} in this CPU's "
        f"{cache / 2**20:.0f} MiB last-level cache")
    print(f"  why (int8): NumPy has no integer GEMM, so its shortlist runs exact's float32 GEMM over as many scores, on "
          f"the codes widened block by block (the scale folded into the queries: {timed['int8 widening'] * 1e3:.1f} ms alone), "
          f"plus the rescoring of {K * 2} rows per query; its codes are a quarter of the table's bytes, which pays only "
          f"where reading the table is the cost: {fits}")
    real_on_torch(corpus, queries, truth, repeat)
    sweeps: dict[str, Callable[[int], I64]] = {
        "exact, k": lambda n: store.search(queries, k=n).indices,
        "int8 shortlist (k=10, rescore=n/10)": lambda n: store.search(queries, k=K, quantized="int8", rescore=n // K).indices,
        "rotated funnel [(128, n)], k=10": lambda n: store.search(queries, k=K, funnel=[(128, n)]).indices,
    }
    for name, search in sweeps.items():
        sizes = SWEEP if name == "exact, k" else [n for n in SWEEP if name.startswith("rotated") or n % K == 0]
        sweep_timed = interleaved_best({str(n): functools.partial(search, n) for n in sizes}, repeat)
        worst = 0.0
        cells = []
        for n, longer in zip(sizes, sizes[1:], strict=False):
            ratio = sweep_timed[str(n)] / sweep_timed[str(longer)]
            worst = max(worst, ratio)
            cells.append(f"{n}: {sweep_timed[str(n)] * 1e3:.1f} ms ({ratio:.2f}x {longer}{' !' if ratio > 1.3 else ''})")
        cells.append(f"{sizes[-1]}: {sweep_timed[str(sizes[-1])] * 1e3:.1f} ms")
        print(f"sweep {name}: worst {worst:.2f}x the next longer (target: none > 1.3x)")
        print("  " + "; ".join(cells))
    section_quantized("real MiniLM embeddings", corpus, queries, repeat)


def real_on_torch(corpus: F32, queries: F32, truth: I64, repeat: int) -> None:
    """The real-set targets on the torch store, in turns of their own (OpenBLAS's threads spin on
    after a NumPy search and slow a torch one run next): its int8 screens run torch's integer
    product where it measured faster than float32 (``gemm_speedup("int8")``), NumPy has none."""
    if "torch" not in et.available_backends():
        print("(torch store skipped: torch is not installed)")
        return
    backend = et.make_backend("torch", "cpu")
    store = et.EmbeddingStore(backend, et.ByteBudget(16 << 30), et.Sha256Hasher(), auto_screen=False)
    store.add(corpus)
    store.quantize(corpus.shape[1], "int8")
    store.fit_rotation(corpus.shape[1], components=128)
    speedup = backend.gemm_speedup("int8")
    fns: dict[str, Callable[[], I64]] = {
        "exact": lambda: store.search(queries, k=K).indices,
        "funnel [(128, 50)] after fit_rotation(128)": lambda: store.search(queries, k=K, funnel=[(128, 50)]).indices,
        "int8 rescore=2": lambda: store.search(queries, k=K, quantized="int8", rescore=2).indices,
        "int8 certified": lambda: store.search(queries, k=K, quantized="int8", rescore="certified").indices,
    }
    store.quantize(corpus.shape[1], "bfloat16")
    fns["bfloat16 certified"] = lambda: store.search(queries, k=K, quantized="bfloat16", rescore="certified").indices
    for fn in fns.values():
        fn()  # warm-up: the rotated unit prefix, the int8 rows' errors
    timed = interleaved_best(fns, repeat)
    exact = timed["exact"]
    used = "ran" if speedup >= 1.0 else "not used: slower than float32 here"
    print(f"torch store (integer product torch._int_mm for int8 {used}; measured {speedup:.2f}x float32 at the rule's shape): "
          f"exact {exact * 1e3:.1f} ms")
    for name, target in (("funnel [(128, 50)] after fit_rotation(128)", " (target <= 0.5x)"), ("int8 rescore=2", " (target <= 1.0x)"),
                         ("int8 certified", ""), ("bfloat16 certified", f" (bfloat16 {backend.gemm_speedup('bfloat16'):.2f}x float32 here)")):  # fmt: skip
        print(f"  {name:<42}{timed[name] * 1e3:8.1f} ms = {timed[name] / exact:.2f}x exact{target}; "
              f"recall@10 {recall(fns[name](), truth):.4f}")


def blocked_product(rows: F32, operand: F32, block: int = 4096) -> F32:
    """``rows @ operand`` a block of rows at a time into one reused buffer: the GEMM's own time, without
    the page faults of a table-sized result (the store's kernel never makes one either)."""
    out = np.empty((min(block, rows.shape[0]), operand.shape[1]), dtype=np.float32)
    for start in range(0, rows.shape[0], block):
        part = rows[start : start + block]
        np.matmul(part, operand, out=out[: part.shape[0]])
    return out


#: Shortlist sizes (or k) the real-set sweeps time, 10 to 1,000, dense around the old slow corner (40-99).
SWEEP = [10, 20, 30, 40, 50, 60, 80, 98, 99, 100, 120, 150, 200, 300, 500, 700, 1000]


BIG = """
import json, sys, time
import numpy as np
from benchmarks.common import clustered, queries_near
mode, rows, dim, nq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
table = clustered(rows, dim, seed=0)
queries = queries_near(table, nq, seed=1)
if mode == "store":
    import embedtools as et
    store = et.EmbeddingStore(et.make_backend("numpy"), et.ByteBudget(16 << 30), et.Sha256Hasher())
    store.add(table)
    del table
    run = lambda: store.search(queries, k=10)
else:
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    del table
    def run():
        s = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T
        part = np.argpartition(-s, 9, axis=1)[:, :10]
        return np.take_along_axis(part, np.argsort(-np.take_along_axis(s, part, axis=1), axis=1), axis=1)
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)
# the peak so far includes building the table; reset it (Linux: clear_refs 5) and measure from here
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
before = status("VmRSS")
started = time.perf_counter()
run()
elapsed = time.perf_counter() - started
print(json.dumps({"seconds": elapsed, "extra_bytes": status("VmHWM") - before}))
"""


def section_big(rows: int, dim: int, n_queries: int) -> None:
    print(f"\n== {rows:,} x {dim}, {n_queries} queries, fresh processes: peak RSS beyond the table ==")
    results = {}
    for mode in ("store", "naive"):
        out = subprocess.run([sys.executable, "-c", BIG, mode, str(rows), str(dim), str(n_queries)],
                             capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode:<6} {r['seconds']:7.2f} s  {r['extra_bytes'] / 2**20:8.0f} MiB beyond the table")
    print(f"store: {results['store']['extra_bytes'] / 2**20:.0f} MiB of the 256 MiB allowance; "
          f"{results['naive']['seconds'] / results['store']['seconds']:.2f}x faster than naive")


SECTIONS = ("exact", "large-k", "funnel", "quantized", "real", "certified", "certified-sets")


def main() -> None:
    parser = problem_arguments(__doc__)
    parser.add_argument("--big", action="store_true")
    parser.add_argument("--no-real", action="store_true", help="skip the real-embeddings sections")
    parser.add_argument("--big-only", action="store_true", help="only the 1,000,000-row section")
    parser.add_argument("--only", default="", help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--device", default="cpu", help="torch device of the certified section (cuda:0 on a GPU)")
    parser.add_argument("--screens", default="bfloat16,int8", help="certified section: comma-separated screens (bfloat16,float16,int8)")
    parser.add_argument("--gemm-side", type=int, default=bench_certified.GEMM_SIDE, help="certified section: square GEMM side")
    bench_scaling.arguments(parser)
    args = parser.parse_args()
    print_header("benchmarks.bench_search")
    if args.scaling:
        bench_scaling.section_scaling(args.quick, max(2, args.repeat // 2) if args.quick else args.repeat, args.out,
                                      args.memory_limit_gb)  # fmt: skip
        return
    if args.big_only:
        section_big(1_000_000, args.dim, 1000)
        return
    only = set(args.only.split(",")) if args.only else set(SECTIONS)
    if unknown := only - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if "exact" in only:
        section_exact(args.rows, args.dim, args.queries, args.repeat)
    if "certified" in only:
        screens = [check_quantization(s) for s in args.screens.split(",")]
        bench_certified.section_certified(args.rows, args.dim, args.queries, args.repeat, args.device, screens,
                                          gemm_side=args.gemm_side)  # fmt: skip
    if "certified-sets" in only:
        bench_certified.section_certified_sets(args.rows, args.dim, args.queries, args.repeat, real=not args.no_real)
    if "large-k" in only:
        section_large_k(args.rows, args.dim, args.queries, args.repeat)
    if "funnel" in only:
        section_funnel(args.rows, args.dim, args.queries, args.repeat)
    if "quantized" in only:
        mat = matryoshka_like(args.rows, args.dim, seed=6)
        section_quantized("Matryoshka-like", mat, queries_near(mat, args.queries, seed=7), args.repeat)
        table = clustered(args.rows, args.dim, seed=0)
        section_quantized("clustered", table, queries_near(table, args.queries, seed=1), args.repeat)
    if "real" in only and not args.no_real:
        section_real(args.repeat)
    if args.big:
        section_big(1_000_000, args.dim, 1000)


if __name__ == "__main__":
    main()
