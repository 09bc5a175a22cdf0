"""``embedtools`` / ``python -m embedtools``: ``demo`` (the main job), ``info``, ``inspect``, ``convert``,
``study``.

Bad input ends with one line on stderr and exit code 2 (``inspect``: 1 for a bad file), never a
traceback; a failure to write (:class:`StoreWriteError`, a full disk, a name too long) and any
untyped error end with one line and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedtools.errors import EmbedtoolsError, InvalidEmbeddingError, StoreFormatError, StoreNotFoundError, StoreWriteError

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
    store.quantize(dim, "bfloat16")
    certified = store.search(queries, k=3, quantized="bfloat16", rescore="certified")
    print(f"certified bfloat16 screen (a proven error bound sizes each shortlist, rescored in float64): top-3 overlap "
          f"with exact {_overlap(result.ids, certified.ids):.0%}, rows rescored per query {int(certified.rescored.max()) if certified.rescored is not None else 0}")
    store.drop_quantized(dim, "bfloat16")
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


def inspect_file(path: Path) -> None:
    """Print what a store file (or a seed folder) holds, after the checks ``load`` runs on it."""
    from embedtools import atomic, fileformat, seed_format

    path, folder = atomic.locate(path)
    if folder:
        if not seed_format.is_seed_folder(path):
            raise StoreNotFoundError(f"{path} is a folder without metadata.json (not a seed store)")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            record = seed_format.read_seed_store(path)
        print(f"{path}: embedding_tools 0.1.2 folder (seed format)")
        for warning in caught:
            print(f"  note: {warning.message}")
        tables: list[tuple[int, int, list[str], int]] = [(t.dimension, len(t.ids), [], 0) for t in record.tables]
    else:
        try:
            record, header = fileformat.verify(path)
        except (StoreFormatError, StoreNotFoundError):
            raise
        except EmbedtoolsError as exc:  # duplicate ids, NaN vectors: what load refuses, a bad file here
            raise StoreFormatError(f"{path} does not load: {exc}") from None
        print(f"{path}: {header['library']}, format {header['format']} v{header['version']}, all checksums verified")
        print(f"  config {json.dumps(header['config'])} (hash {header['config_hash']})")
        tables = [(t["dimension"], t["rows"], t.get("quantized", []), t.get("rotation", 0)) for t in header["tables"]]
    for d, rows, quantized, rotation in tables:
        extras = [f"quantized: {', '.join(quantized)}"] if quantized else []
        extras += [f"PCA rotation, {rotation} axes"] if rotation else []
        print(f"  table {d}d: {rows} rows, float32" + (f" ({'; '.join(extras)})" if extras else ""))


def convert(source: Path, target: Path, max_memory_gb: float) -> None:
    """Read a seed folder (or an embedtools file) and write it as an embedtools file."""
    from embedtools.container import Container

    container = Container()
    container.config.from_dict({"backend": "numpy", "max_memory_gb": max_memory_gb})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = container.store().load(source)
    for warning in caught:
        print(f"note: {warning.message}")
    store.save(target)
    print(f"wrote {target}: " + ", ".join(f"{d}d x {len(store.table(d))} rows" for d in store.dimensions))


def run_study(vectors: Path, queries: Path, out: Path, k: int, dimensions: list[int] | None) -> None:
    """The truncation study from files: ``.npy`` arrays of vectors and of queries (or a store file)."""
    from embedtools.container import Container
    from embedtools.study import study

    container = Container()
    container.config.from_dict({"backend": "numpy", "max_memory_gb": 64.0})
    store = container.store()
    if vectors.suffix == ".npy":
        store.add(_load_npy(vectors))
    else:
        store.load(vectors)
    table = study(store, _load_npy(queries), k=k, dimensions=dimensions)
    if not out.is_dir():
        raise StoreNotFoundError(f"output folder {out} does not exist")
    (out / "study.md").write_text(table.to_markdown() + "\n", encoding="utf-8")
    print(table.to_markdown())
    try:
        print(f"\nwrote {out / 'study.md'} and {table.plot(out / 'study.png')}")
    except EmbedtoolsError as exc:  # matplotlib missing: the table still stands
        print(f"\nwrote {out / 'study.md'}; no plot: {exc}")


def _load_npy(path: Path) -> np.ndarray[Any, Any]:
    try:
        out: np.ndarray[Any, Any] = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise StoreNotFoundError(f"no file {path}") from None
    except (OSError, ValueError) as exc:
        raise InvalidEmbeddingError(f"{path} is not a readable .npy array: {exc}") from None
    return out


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
    inspect_parser = commands.add_parser("inspect", help="verify a store file and list its tables (exit 1 if bad)")
    inspect_parser.add_argument("file", type=Path)
    convert_parser = commands.add_parser("convert", help="an embedding_tools 0.1.2 folder to an embedtools file")
    convert_parser.add_argument("seed_dir", type=Path)
    convert_parser.add_argument("file", type=Path)
    convert_parser.add_argument("--max-memory-gb", type=float, default=8.0)
    study_parser = commands.add_parser("study", help="recall@k of prefixes, funnels and quantised indexes; table and plot")
    study_parser.add_argument("vectors", type=Path, help=".npy (rows, d) float array, or an embedtools store file")
    study_parser.add_argument("queries", type=Path, help=".npy (queries, d) float array")
    study_parser.add_argument("--out", type=Path, default=Path("."), help="folder for study.md and study.png")
    study_parser.add_argument("--k", type=int, default=10)
    study_parser.add_argument("--dimensions", type=int, nargs="*", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            demo(args.rows, args.dim, args.backend)
        elif args.command == "info":
            info(args.backend, args.device)
        elif args.command == "inspect":
            inspect_file(args.file)
        elif args.command == "study":
            run_study(args.vectors, args.queries, args.out, args.k, args.dimensions)
        else:
            convert(args.seed_dir, args.file, args.max_memory_gb)
    except (StoreFormatError, StoreNotFoundError) as exc:
        return _fail(exc, 1 if args.command == "inspect" else 2)
    except StoreWriteError as exc:  # the input was fine; the disk or the folder was not
        return _fail(exc, 1)
    except EmbedtoolsError as exc:
        return _fail(exc, 2)
    except Exception as exc:  # an untyped error is a bug, but still one line, not a traceback
        return _fail(exc, 1, f"{type(exc).__name__}: ")
    return 0


def _fail(exc: BaseException, code: int, prefix: str = "") -> int:
    """Print ``exc`` as one line on stderr (a message with newlines is joined) and return ``code``."""
    message = " ".join(str(exc).splitlines()) or type(exc).__name__
    print(f"embedtools: error: {prefix}{message}"[:2000], file=sys.stderr)
    return code


def main_entry() -> None:
    """Console-script entry point."""
    raise SystemExit(main())
