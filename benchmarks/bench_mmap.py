"""Issue 7's mapped-table figure: a search over a store file whose pages are dropped from the page
cache first (``posix_fadvise(DONTNEED)``), mapped (``load(mmap=True)``) against read whole
(``load()``), each in a fresh process: time, bytes read from storage, peak RSS (which counts the
mapped file's pages while they are cached: the kernel may drop them at will) and the private memory
the process holds afterwards (what cannot be dropped).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python -m benchmarks.bench_mmap [--rows 1000000]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import embedtools as et
from benchmarks.common import print_header, clustered, problem_arguments

CHILD = """
import json, os, sys, time
import embedtools as et
from benchmarks.common import clustered, queries_near
path, mode, nq, dim = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
def read_bytes():
    for line in open("/proc/self/io"):
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
queries = queries_near(clustered(5000, dim, seed=0), nq, seed=1)
fd = os.open(path, os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # cold: the file's pages leave the page cache
os.close(fd)
before_rss, before_anon, before_read = status("VmRSS"), status("RssAnon"), read_bytes()
started = time.perf_counter()
store = et.EmbeddingStore(et.make_backend("numpy"), et.ByteBudget(64 << 30), et.Sha256Hasher())
store.load(path, mmap=(mode == "mapped"))
loaded = time.perf_counter() - started
store.search(queries, k=10)
total = time.perf_counter() - started
print(json.dumps({"load": loaded, "total": total, "read": read_bytes() - before_read,
                  "peak": status("VmHWM") - before_rss, "anon": status("RssAnon") - before_anon,
                  "charged": store.memory_info().used_bytes}))
"""


def main() -> None:
    parser = problem_arguments(__doc__)
    args = parser.parse_args()
    print_header("benchmarks.bench_mmap")
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as folder:
        path = Path(folder) / "big.safetensors"
        store = et.EmbeddingStore(et.make_backend("numpy"), et.ByteBudget(64 << 30), et.Sha256Hasher())
        store.add(clustered(args.rows, args.dim, seed=0))
        store.save(path)
        del store
        size = path.stat().st_size
        print(f"store file: {args.rows:,} x {args.dim} float32, {size / 2**20:.0f} MiB; {args.queries} cosine queries, top-10; cold page cache")
        results = {}
        for mode in ("mapped", "whole"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode, str(args.queries), str(args.dim)],
                                 capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1], env=os.environ)
            results[mode] = r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{mode:<7} load {r['load']:6.2f} s, load + search {r['total']:6.2f} s, read from storage "
                  f"{r['read'] / 2**20:7.0f} MiB, peak RSS +{r['peak'] / 2**20:6.0f} MiB (mapped file pages count), "
                  f"private memory held after +{r['anon'] / 2**20:6.0f} MiB, budget charged {r['charged'] / 2**20:6.0f} MiB")
        m, w = results["mapped"], results["whole"]
        print(f"mapped / whole: time {m['total'] / w['total']:.2f}x, private memory {m['anon'] / max(w['anon'], 1):.3f}x, "
              f"charged {m['charged'] / w['charged']:.3f}x")


if __name__ == "__main__":
    main()
