"""Issue 7's filter figures: a filter keeping 1% and one keeping 90% of 200,000 x 384 rows, against
the unfiltered search in the same run (interleaved best of N), 100 cosine queries, top-10.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python -m benchmarks.bench_filters
"""

from __future__ import annotations

import sys

import numpy as np

import embedtools as et
from benchmarks.common import print_header, clustered, interleaved_best, problem_arguments, queries_near


def main() -> None:
    parser = problem_arguments(__doc__)
    args = parser.parse_args()
    print_header("benchmarks.bench_filters")
    table = clustered(args.rows, args.dim, seed=0)
    queries = queries_near(table, args.queries, seed=1)
    rng = np.random.default_rng(2)
    buckets = rng.integers(0, 100, args.rows)  # bucket 0 is 1% of the rows; buckets >= 10 are 90%
    store = et.EmbeddingStore(et.make_backend("numpy"), et.ByteBudget(8 << 30), et.Sha256Hasher())
    store.add(table, metadata=[{"bucket": int(b)} for b in buckets])
    one = et.Meta("bucket").eq(0)
    ninety = et.Meta("bucket").between(10, None)
    for where in (one, ninety):
        store.search(queries, k=10, where=where)  # parses the metadata column once, as any first filter does
    best = interleaved_best(
        {
            "unfiltered": lambda: store.search(queries, k=10),
            "keeps 1%": lambda: store.search(queries, k=10, where=one),
            "keeps 90%": lambda: store.search(queries, k=10, where=ninety),
        },
        args.repeat,
    )
    base = best["unfiltered"]
    print(f"{args.rows:,} x {args.dim}, {args.queries} cosine queries, top-10, interleaved best of {args.repeat}")
    print(f"unfiltered            {base * 1e3:8.1f} ms")
    print(f"filter keeping 1%     {best['keeps 1%'] * 1e3:8.1f} ms   {base / best['keeps 1%']:.1f}x faster (target >= 5x)")
    print(f"filter keeping 90%    {best['keeps 90%'] * 1e3:8.1f} ms   {best['keeps 90%'] / base:.2f}x the time (target <= 1.2x)")


if __name__ == "__main__":
    main()
