"""``embedtools`` / ``python -m embedtools``: ``demo`` (the main job) and ``info``.

Bad input ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from embedtools.errors import EmbedtoolsError

__all__ = ["main"]


def _clustered(rows: int, dim: int, clusters: int, seed: int) -> np.ndarray[tuple[int, int], np.dtype[np.float32]]:
    """Synthetic embeddings in Gaussian clusters, like a real corpus's topics."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    return (centres[rng.integers(0, clusters, rows)] + 0.5 * rng.standard_normal((rows, dim))).astype(np.float32)


def demo(rows: int, dim: int, backend: str) -> None:
    """Build a store from the container, add, search (full and Matryoshka prefix), save, load, hash."""
    from embedtools.container import Container
    from embedtools.hashing import config_hash

    container = Container()
    container.config.from_dict({"backend": backend, "max_memory_gb": 1.0})
    store = container.store()
    print(f"store: {store.backend.name} backend on {store.backend.device}, budget {store.memory_info().limit_bytes / 2**30:.1f} GiB")

    vectors = _clustered(rows, dim, clusters=50, seed=0)
    labels = [f"topic-{i % 50}" for i in range(rows)]
    started = time.perf_counter()
    store.add(vectors, ids=[f"doc-{i}" for i in range(rows)], labels=labels, metadata=[{"n": i} for i in range(rows)])
    print(f"added {rows} x {dim} float32 rows in {1e3 * (time.perf_counter() - started):.1f} ms; "
          f"{store.memory_info().store_bytes / 2**20:.1f} MiB charged")

    queries = vectors[:5] + 0.05 * np.random.default_rng(1).standard_normal((5, dim)).astype(np.float32)
    started = time.perf_counter()
    result = store.search(queries, k=3)
    print(f"searched 5 queries, top-3 cosine in {1e3 * (time.perf_counter() - started):.1f} ms:")
    for q, (ids, scores) in enumerate(zip(result.ids, result.scores, strict=True)):
        pairs = ", ".join(f"{i} ({s:.3f})" for i, s in zip(ids, scores, strict=True))
        print(f"  query {q}: {pairs}")
    funnel = store.search(queries, k=3, funnel=[(dim // 4, 100)])
    print(f"Matryoshka funnel ({dim // 4}-d prefix shortlist of 100, rescored at {dim}-d): "
          f"top-3 overlap with exact {_overlap(result.ids, funnel.ids):.0%}")
    store.quantize(dim, "binary")
    binary = store.search(queries, k=3, quantized="binary", rescore=10)
    table_memory = store.memory_info().tables[dim]
    print(f"binary index ({table_memory.quantized['binary'] / 2**20:.2f} MiB, 1/32 of the float32 table), "
          f"shortlist 30 rescored exactly: top-3 overlap with exact {_overlap(result.ids, binary.ids):.0%}")

    experiment = {"model": "synthetic-clusters", "dim": dim, "rows": rows}
    store.config = experiment
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"store-{store.config_hash}.safetensors"
        store.save(path)
        print(f"saved to {path.name} ({path.stat().st_size / 2**20:.1f} MiB)")
        loaded = container.store().load(path)
        same = np.array_equal(loaded.table(dim).to_numpy(), vectors) and loaded.table(dim).ids == store.table(dim).ids
        again = loaded.search(queries, k=3)
        print(f"loaded {len(loaded)} rows; vectors and ids identical: {same}; "
              f"search identical: {np.array_equal(again.indices, result.indices)}")
    print(f"config_hash({experiment}) = {config_hash(experiment)}")
    print(f"seed-compatible: config_hash({{'model': 'bert', 'dim': 768, 'batch_size': 32}}) = "
          f"{config_hash({'model': 'bert', 'dim': 768, 'batch_size': 32})}")


def _overlap(a: list[list[str]], b: list[list[str]]) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b, strict=True)]))


def info(backend: str, device: str | None) -> None:
    from embedtools import __version__
    from embedtools.backends import describe

    print(f"embedtools {__version__}, Python {sys.version.split()[0]}")
    print(describe(backend, device))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="embedtools", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="build, search, save, load and hash a store end to end")
    demo_parser.add_argument("--rows", type=int, default=20_000)
    demo_parser.add_argument("--dim", type=int, default=384)
    demo_parser.add_argument("--backend", default="auto")
    info_parser = commands.add_parser("info", help="backends and devices usable here, what auto picks and why")
    info_parser.add_argument("--backend", default="auto")
    info_parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            demo(args.rows, args.dim, args.backend)
        else:
            info(args.backend, args.device)
    except EmbedtoolsError as exc:
        print(f"embedtools: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main_entry() -> None:
    """Console-script entry point."""
    raise SystemExit(main())
