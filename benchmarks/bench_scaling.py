"""How search cost grows (issue 16): time and peak extra memory from 10k to 2M rows, 1 to 4,096 queries
and 64 to 1,024 dimensions, one axis at a time around 200,000 x 384 x 100, for the store's float32 exact
search (NumPy and torch backends) and its certified bfloat16 search (torch) beside torch and NumPy naive
``matmul + top-k``; printed as a table and drawn as a PNG.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python -m benchmarks.bench_search --scaling --quick
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python -m benchmarks.bench_search --scaling --out scaling.png

Each (point, method) runs in a fresh process, so no method inherits another's memory or caches; a
point's data is built once, saved to a temporary file and loaded by each method's process. Peak
extra memory is the resident set's high-water mark during the searches minus the resident set once the
inputs, the store and its indexes are built: the process resets its high-water mark first (Linux
``/proc/self/clear_refs`` ``5``) and reads ``VmHWM`` after. Where that reset is refused the figure is
``ru_maxrss`` minus the resident set before the searches, which also counts building the inputs, and
is marked ``*`` (an upper bound). Time is the best of ``repeat`` calls after one warm-up call; the methods
of a point run back to back. Points whose estimated footprint exceeds ``--memory-limit-gb`` are skipped
and listed as skipped.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import clustered, queries_near

K = 10
CENTRE = (200_000, 384, 100)
METHODS = ("store f32 (numpy)", "store f32 (torch)", "store certified bf16 (torch)", "torch naive", "numpy naive")
REFERENCE = "torch naive"
FULL: dict[str, tuple[int, ...]] = {"rows": (10_000, 50_000, 200_000, 500_000, 1_000_000, 2_000_000), "queries": (1, 10, 100, 1_000, 4_096),
        "dims": (64, 128, 256, 384, 768, 1_024)}  # fmt: skip
QUICK: dict[str, tuple[int, ...]] = {"rows": (10_000, 200_000, 500_000), "queries": (1, 100, 1_000), "dims": (64, 384, 1_024)}
DEFAULT_OUT = Path(__file__).with_name("scaling.png")
ROOT = Path(__file__).resolve().parents[1]  # children run ``-m benchmarks.bench_scaling`` from here


@dataclass(frozen=True)
class Point:
    rows: int
    dim: int
    queries: int

    def footprint(self) -> int:
        """Bytes a point may need at its peak: building the clustered table (about three copies), the
        naive forms' normalised copy, and the full ``queries x rows`` score matrix twice (float32);
        the saved inputs sit in a temporary folder (page cache or disk) beside that."""
        return 4 * (4 * self.rows * self.dim + 2 * self.queries * self.rows)


def grid(axes: dict[str, tuple[int, ...]], centre: tuple[int, int, int] = CENTRE) -> dict[str, list[Point]]:
    rows, dim, queries = centre
    return {
        "rows": [Point(n, dim, queries) for n in axes["rows"]],
        "queries": [Point(rows, dim, q) for q in axes["queries"]],
        "dims": [Point(rows, d, queries) for d in axes["dims"]],
    }


def _hwm_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss() -> int:
    current = _status("VmRSS")
    return current if current is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _method(method: str, inputs: Path) -> Callable[[], Any]:
    """Load the point's inputs, build the store (or normalised copy) for one method; the returned call
    is what is measured."""
    with np.load(inputs) as saved:
        table, queries = saved["table"], saved["queries"]
    dim = table.shape[1]
    if method.startswith("store"):
        import embedtools as et

        backend = "numpy" if "numpy" in method else "torch"
        store = et.EmbeddingStore(et.make_backend(backend), et.ByteBudget(64 << 30), et.Sha256Hasher())
        store.add(table)
        del table
        if "certified" in method:
            store.quantize(dim, "bfloat16")
            return lambda: store.search(queries, k=K, quantized="bfloat16", rescore="certified")
        return lambda: store.search(queries, k=K)
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    del table
    if method == "torch naive":
        import torch

        xt, qt = torch.from_numpy(unit), torch.from_numpy(queries)

        def torch_naive() -> Any:
            with torch.no_grad():
                return torch.topk(torch.nn.functional.normalize(qt, dim=1) @ xt.T, K, dim=1).indices

        return torch_naive

    def numpy_naive() -> Any:
        s = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T
        part = np.argpartition(-s, K - 1, axis=1)[:, :K]
        return np.take_along_axis(part, np.argsort(-np.take_along_axis(s, part, axis=1), axis=1), axis=1)

    return numpy_naive


def measure(method: str, inputs: Path, repeat: int) -> dict[str, float | bool]:
    """One point in this process: best-of time and peak resident bytes beyond the built inputs."""
    run = _method(method, inputs)
    before = _rss()
    exact_peak = _hwm_reset()
    best = float("inf")
    for i in range(repeat + 1):
        started = time.perf_counter()
        run()
        if i:  # the first call is the warm-up (it may build caches, which count as extra memory)
            best = min(best, time.perf_counter() - started)
    peak = _status("VmHWM") if exact_peak else None
    if peak is None:
        exact_peak, peak = False, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": best, "extra_bytes": max(0, peak - before), "exact_peak": exact_peak}


def run_point(method: str, inputs: Path, repeat: int, timeout: float) -> dict[str, float | bool] | str:
    command = [sys.executable, "-m", "benchmarks.bench_scaling", "--point", method, str(inputs), str(repeat)]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    if out.returncode != 0:
        return f"failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}"
    result: dict[str, float | bool] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


Results = dict[str, dict[Point, dict[str, dict[str, float | bool] | str]]]


def section_scaling(quick: bool, repeat: int, out: Path, memory_limit_gb: float, timeout: float = 600, *,
                    axes: dict[str, tuple[int, ...]] | None = None, centre: tuple[int, int, int] = CENTRE,
                    methods: tuple[str, ...] = METHODS) -> Results:  # fmt: skip
    """Measure the grid (``axes``/``centre``/``methods`` replace the quick or full one, for small runs),
    print it, plot it."""
    points = grid(axes or (QUICK if quick else FULL), centre)
    limit = int(memory_limit_gb * 2**30)
    print(f"\n== scaling ({'quick' if quick else 'full'} grid around {centre[0]:,} x {centre[1]} x {centre[2]} queries, "
          f"top-{K}): time (best of {repeat} after a warm-up) and peak extra memory, each in a fresh process ==")
    print(f"memory limit {memory_limit_gb:g} GiB of estimated footprint; ratios are {REFERENCE}'s time over the method's "
          "(> 1: faster than torch naive)")
    results: Results = {}
    done: dict[Point, dict[str, dict[str, float | bool] | str]] = {}
    for axis, axis_points in points.items():
        results[axis] = {}
        for point in axis_points:
            if point not in done:
                if point.footprint() > limit:
                    done[point] = dict.fromkeys(methods, f"skipped: ~{point.footprint() / 2**30:.1f} GiB > limit")
                else:
                    done[point] = _measure_point(point, methods, repeat, timeout)
            results[axis][point] = done[point]
        _print_axis(axis, results[axis], methods)
    _plot(results, out, centre, methods)
    print(f"plot written to {out}")
    return results


def _measure_point(point: Point, methods: tuple[str, ...], repeat: int, timeout: float) -> dict[str, dict[str, float | bool] | str]:
    """The point's data is built once here and saved; each method's process loads it (a page-cache read).
    The rows are unit rows, as an embedding model writes them: every method scores the same ones."""
    raw = clustered(point.rows, point.dim, seed=0)
    queries = queries_near(raw, point.queries, seed=1)
    table = np.ascontiguousarray(raw / np.linalg.norm(raw, axis=1, keepdims=True), dtype=np.float32)
    del raw
    with tempfile.TemporaryDirectory(prefix="embedtools-scaling-") as folder:
        inputs = Path(folder) / "inputs.npz"
        np.savez(inputs, table=table, queries=queries)
        del table, queries
        return {m: run_point(m, inputs, repeat, timeout) for m in methods}


def _print_axis(axis: str, by_point: dict[Point, dict[str, dict[str, float | bool] | str]], methods: tuple[str, ...]) -> None:
    print(f"\n-- varying {axis} --")
    print(f"{'rows x dim x queries':<24}" + "".join(f"{m:>30}" for m in methods))
    for point, per_method in by_point.items():
        ref = per_method.get(REFERENCE)
        ref_s = ref["seconds"] if isinstance(ref, dict) else None
        cells = []
        for m in methods:
            r = per_method[m]
            if isinstance(r, str):
                cells.append(f"{r[:29]:>30}")
                continue
            ratio = f" {float(ref_s) / float(r['seconds']):4.2f}x" if ref_s is not None and m != REFERENCE else ""
            mark = "" if r["exact_peak"] else "*"
            cells.append(f"{float(r['seconds']) * 1e3:>9.1f} ms{ratio:>6} {float(r['extra_bytes']) / 2**20:>7.0f} MiB{mark}")
        print(f"{point.rows:>9,} x {point.dim:>4} x {point.queries:>4}  " + "".join(f"{c:>30}" for c in cells))


def _plot(results: Results, out: Path, centre: tuple[int, int, int], methods: tuple[str, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid_axes = plt.subplots(2, 3, figsize=(15, 8))
    for col, (axis, by_point) in enumerate(results.items()):
        for m in methods:
            xs, times, mems = [], [], []
            for point, per_method in by_point.items():
                r = per_method[m]
                if isinstance(r, dict):
                    xs.append({"rows": point.rows, "queries": point.queries, "dims": point.dim}[axis])
                    times.append(float(r["seconds"]) * 1e3)
                    mems.append(max(float(r["extra_bytes"]), 1.0) / 2**20)
            grid_axes[0][col].plot(xs, times, marker="o", label=m)
            grid_axes[1][col].plot(xs, mems, marker="o", label=m)
        for row, label in ((0, "time (ms)"), (1, "peak extra memory (MiB)")):
            ax = grid_axes[row][col]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(axis)
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
    grid_axes[0][0].legend(fontsize=8)
    fig.suptitle(f"exact top-{K} cosine search: one axis varied around {centre[0]:,} x {centre[1]} x {centre[2]} queries")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def arguments(parser: argparse.ArgumentParser) -> None:
    """The scaling options, added to ``bench_search``'s parser."""
    parser.add_argument("--scaling", action="store_true", help="time and peak memory over rows, queries and dims")
    parser.add_argument("--quick", action="store_true", help="with --scaling: the reduced grid (a few minutes)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="with --scaling: where the PNG goes")
    parser.add_argument("--memory-limit-gb", type=float, default=16.0, help="with --scaling: skip points estimated above")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one scaling point in this process (used by section_scaling)")
    parser.add_argument("--point", nargs=3, metavar=("METHOD", "INPUTS", "REPEAT"), required=True)
    method, inputs, repeat = parser.parse_args().point
    print(json.dumps(measure(method, Path(inputs), int(repeat))))
