"""Issue 17's figures: exact search on one process against a ShardedStore on 1 and 2 Dask workers
(LocalCluster, 1 thread each), the merge's time and the bytes each search moves, the load of a
saved store by the workers (bytes through the client), and a projection to large clusters.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE nice .venv/bin/python -m benchmarks.bench_sharded [--rows 1000000]

Rows are unit float32 vectors (clustered, normalised); the sharded stores are loaded by their
workers from the single store's file, so no row passes through the client. Timings are the best
of ``--repeat`` interleaved runs; the search ratio is sharded time over single-process time.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

import embedtools as et
from benchmarks.common import blas_kernel, clustered, cpu_model, interleaved_best, problem_arguments, queries_near

#: What one candidate costs on the wire: a float32 score and an int32 local row.
CANDIDATE_BYTES = 8


def unit_rows(rows: int, dim: int, seed: int) -> npt.NDArray[np.float32]:
    """Clustered rows normalised to unit length, built in chunks to bound the peak memory."""
    out = np.empty((rows, dim), dtype=np.float32)
    step = 100_000
    for start in range(0, rows, step):
        chunk = clustered(min(step, rows - start), dim, seed=seed + start)
        out[start : start + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def cluster(workers: int) -> tuple[Any, Any]:
    import distributed

    dask: Any = distributed
    local = dask.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                              silence_logs=logging.CRITICAL)  # fmt: skip
    client = dask.Client(local)
    client.wait_for_workers(workers, timeout=120)
    return local, client


def projection(rate: float, merge_per_candidate: float, latency: float, dim: int, k: int) -> None:
    """Time and traffic of one search as shards and queries grow, from the rates measured here."""
    print("\nPROJECTION (a model, not a measurement): per-shard scan rate and merge cost as measured above,")
    print("one shard per worker (CPU, 1 thread), the call latency measured above, a 10 Gb/s client link.")
    print(f"  time = rows/shards * queries / {rate:.3g} rows*queries/s + shards*queries*k * {merge_per_candidate:.3g} s + {latency * 1e3:.1f} ms")
    print("  bytes = shards * queries * (4*dim + 8*k) + queries * k * (4 + id bytes)")
    link = 10e9 / 8
    print(f"  {'shards':>7} {'rows':>14} {'queries':>8} {'scan s':>10} {'merge s':>9} {'traffic MB':>11} {'wire s':>8}")
    for shards, rows, queries in ((2, 1_000_000, 1000), (16, 100_000_000, 1000), (64, 1_000_000_000, 1000),
                                  (512, 1_000_000_000, 1000), (512, 1_000_000_000, 10_000)):  # fmt: skip
        scan = rows / shards * queries / rate
        merge = shards * queries * k * merge_per_candidate
        traffic = shards * queries * (4 * dim + CANDIDATE_BYTES * k) + queries * k * (4 + 8)
        print(f"  {shards:>7} {rows:>14,} {queries:>8} {scan:>10.3g} {merge:>9.3g} {traffic / 1e6:>11.1f} {traffic / link:>8.3g}")
    print("  (512 shards = 64 workers x 8 GPUs; a GPU shard scans faster than this CPU rate, so its scan")
    print("   column shrinks by that factor while merge and traffic stay as shown.)")


def main() -> None:
    parser = problem_arguments(__doc__)
    parser.set_defaults(rows=1_000_000, queries=1000, repeat=2)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    from embedtools.sharded import ShardedStore

    logging.getLogger("distributed").setLevel(logging.ERROR)

    print(f"CPU: {cpu_model()}")
    print(f"python {sys.version.split()[0]}; BLAS (client): {blas_kernel()}")
    print(f"problem: {args.rows:,} x {args.dim} float32 unit rows, {args.queries} queries, k={args.k}, best of {args.repeat}")
    rows = unit_rows(args.rows, args.dim, seed=0)
    queries = queries_near(rows[:200_000], args.queries, seed=1)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    config: et.Config = {"backend": "numpy", "max_memory_gb": 64.0}
    single = et.make_container(config).store()
    single.add(rows)
    del rows
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as folder:
        path = Path(folder) / "one.embedtools"
        single.save(path)
        clusters = {n: cluster(n) for n in (1, 2)}
        try:
            client = clusters[2][1]
            print(f"BLAS (workers): {set(client.run(blas_kernel).values())}")
            stores: dict[int, ShardedStore] = {}
            for n, (_, c) in clusters.items():
                started = time.perf_counter()
                stores[n] = ShardedStore.load(c, path, config, shards=n, mmap=False)
                print(f"{n} worker(s): loaded from one file in {time.perf_counter() - started:.2f} s "
                      f"(read by the workers; {stores[n].bytes_through_client:,} bytes through the client)")  # fmt: skip
            want = single.search(queries, args.k)
            for store in stores.values():
                got = store.search(queries, args.k)
                assert got.ids == want.ids or np.allclose(got.scores, want.scores, atol=1e-5), "sharded search differs"
            timed = interleaved_best({"single process": lambda: single.search(queries, args.k),
                                      "1 worker": lambda: stores[1].search(queries, args.k),
                                      "2 workers": lambda: stores[2].search(queries, args.k)}, args.repeat)  # fmt: skip
            last: dict[int, Any] = {}
            print(f"\n{'exact search (cosine)':<24} {'seconds':>9} {'x single':>9} {'merge ms':>9} {'bytes moved':>12} {'bound':>12}")
            for name, seconds in timed.items():
                if name == "single process":
                    print(f"{name:<24} {seconds:>9.3f} {1.0:>9.2f}")
                    continue
                store = stores[int(name[0])]
                store.search(queries, args.k)
                stats = store.last_search
                assert stats is not None
                last[int(name[0])] = stats
                ids_bytes = sum(len(i.encode()) for row in want.ids for i in row)
                bound = stats.shards * args.queries * args.k * 16 + queries.nbytes * stats.shards + ids_bytes
                print(f"{name:<24} {seconds:>9.3f} {seconds / timed['single process']:>9.2f} {stats.merge_seconds * 1e3:>9.2f} "
                      f"{stats.bytes_moved:>12,} {bound:>12,}")  # fmt: skip
                print(f"{'':<24} queries {stats.query_bytes:,} + candidates {stats.candidate_bytes:,} + winners' ids {stats.id_bytes:,}")
            ratio = timed["2 workers"] / timed["single process"]
            print(f"target: 2 workers <= 1.25x single: {ratio:.2f}x {'met' if ratio <= 1.25 else 'NOT met'}")

            saved = Path(folder) / "sharded"
            stores[2].save(saved)
            started = time.perf_counter()
            mapped = ShardedStore.load(client, saved, config, mmap=True)
            load_seconds = time.perf_counter() - started
            info = mapped.memory_info()
            print(f"\nsaved 2-shard folder loaded mapped on 2 workers in {load_seconds:.2f} s: {mapped.bytes_through_client:,} bytes "
                  f"through the client (the rows: {args.rows * args.dim * 4:,} bytes); mapped: "
                  f"{all(t.mapped for m in info.shards for t in m.tables.values())}")  # fmt: skip
            assert mapped.search(queries, args.k).ids == stores[2].search(queries, args.k).ids

            tiny = ShardedStore(client, config, shards=2)
            tiny.add(queries[:10])
            latency = min(best_latency(tiny, queries[:1], args.k) for _ in range(5))
            rate = args.rows * args.queries / max(timed["1 worker"] - latency, 1e-9)
            merge_per_candidate = last[2].merge_seconds / (2 * args.queries * args.k)
            projection(rate, merge_per_candidate, latency, args.dim, args.k)
        finally:
            for local, c in clusters.values():
                c.close()
                local.close()


def best_latency(store: Any, query: npt.NDArray[np.float32], k: int) -> float:
    started = time.perf_counter()
    store.search(query, k)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
