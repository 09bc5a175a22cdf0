"""Core figures of issue 4, each printed beside its reference measured in the same run.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python -m benchmarks.bench_core

* import time: ``python -c "import embedtools"`` minus a bare ``python -c pass`` (best of N each),
  against the 0.3 s budget, and against ``import numpy`` (what the package cannot avoid);
* exact batched search, 200,000 x 384 float32 clustered rows, 100 cosine queries, top-10: the
  store's ``search`` against NumPy's naive form on a pre-normalised table (``Qn @ Xn.T`` +
  ``argpartition`` + sort of the 10), and against the seed's per-query loop (re-normalising the
  table each query), timed on a few queries and scaled to 100;
* the BLAS kernel that ran (threadpoolctl), since OpenBLAS settings change the figures.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import numpy.typing as npt

import embedtools as et
from benchmarks.common import print_header, best_of, clustered, problem_arguments, queries_near

F32 = npt.NDArray[np.float32]


def import_seconds(code: str, repeat: int) -> float:
    return best_of(lambda: subprocess.run([sys.executable, "-c", code], check=True), repeat)


def naive_numpy(queries: F32, unit_table: F32, k: int) -> npt.NDArray[np.int64]:
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = qn @ unit_table.T
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
    out: npt.NDArray[np.int64] = np.take_along_axis(part, order, axis=1)
    return out


def seed_loop(queries: F32, table: F32, k: int) -> list[npt.NDArray[np.int64]]:
    """embedding_tools 0.1.2's compute_similarity, one query at a time (its batch search was broken)."""
    out = []
    for q in queries:
        qn = q / np.linalg.norm(q)
        tn = table / np.linalg.norm(table, axis=1, keepdims=True)
        sims = (qn[None, :] @ tn.T).reshape(-1)
        out.append(np.argsort(sims)[::-1][:k].copy())
    return out


def main() -> None:
    parser = problem_arguments(__doc__)
    args = parser.parse_args()

    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, embedtools {et.__version__}")
    print_header("benchmarks.bench_core")

    bare = import_seconds("pass", args.repeat)
    numpy_only = import_seconds("import numpy", args.repeat)
    ours = import_seconds("import embedtools", args.repeat)
    added = ours - bare
    print("\n== import time (best of %d, wall) ==" % args.repeat)
    print(f"bare interpreter {bare * 1e3:7.1f} ms | import numpy {numpy_only * 1e3:7.1f} ms | import embedtools {ours * 1e3:7.1f} ms")
    print(f"embedtools adds {added * 1e3:.1f} ms over a bare interpreter; budget 300 ms -> {added / 0.3:.2f} of budget "
          f"({'met' if added < 0.3 else 'MISSED'}); {(ours - numpy_only) * 1e3:.1f} ms beyond numpy itself")

    table = clustered(args.rows, args.dim, seed=0)
    queries = queries_near(table, args.queries, seed=1)
    container = et.Container()
    container.config.from_dict({"backend": "numpy", "max_memory_gb": 4.0})
    store = container.store()
    store.add(table)
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    k = 10

    store_s = best_of(lambda: store.search(queries, k=k), args.repeat)
    naive_s = best_of(lambda: naive_numpy(queries, unit, k), args.repeat)
    few = queries[:5]
    seed_s = best_of(lambda: seed_loop(few, table, k), 2) * (args.queries / len(few))
    ours_idx = store.search(queries, k=k).indices
    same = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ours_idx.tolist(), naive_numpy(queries, unit, k).tolist(), strict=True)]))
    print(f"\n== exact search: {args.rows:,} x {args.dim} float32, {args.queries} cosine queries, top-{k} (best of {args.repeat}) ==")
    print(f"store.search          {store_s * 1e3:8.1f} ms")
    print(f"numpy naive (Xn pre-normalised) {naive_s * 1e3:8.1f} ms   store/naive = {store_s / naive_s:.2f}x time")
    print(f"seed per-query loop   {seed_s * 1e3:8.1f} ms (5 queries timed, scaled)   seed/store = {seed_s / store_s:.1f}x faster")
    print(f"top-{k} agreement with naive: {same:.4f}")


if __name__ == "__main__":
    main()
