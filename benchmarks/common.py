"""What every benchmark here shares: the data it searches and the BLAS kernel it reports."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt


def problem_arguments(description: str | None = None) -> argparse.ArgumentParser:
    """The arguments every benchmark shares: the problem's size and how often to time it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    return parser


def best_of(fn: Callable[[], Any], repeat: int) -> float:
    """The fastest of ``repeat`` timed calls: the least disturbed reading on a shared machine."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def interleaved_best(fns: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    """Best of ``repeat`` for each, taking turns so drifting load on a shared machine hits all alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def clustered(rows: int, dim: int, seed: int, clusters: int = 1000) -> npt.NDArray[np.float32]:
    """Gaussian clusters (sigma 0.5 around unit-variance centres), like topics in a real corpus."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    out: npt.NDArray[np.float32] = centres[rng.integers(0, clusters, rows)] + 0.5 * rng.standard_normal((rows, dim), dtype=np.float32)
    return out


#: The CPU features the figures depend on (AVX-512 and AMX change which kernels OpenBLAS and oneDNN run).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni")


def cpu_model() -> str:
    """The CPU model and which of :data:`CPU_FLAGS` it has, read from ``/proc/cpuinfo`` (Linux)."""
    import platform

    model, flags = platform.processor() or platform.machine(), set[str]()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine()):
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        return f"{model} (flags unknown)"
    have = [f for f in CPU_FLAGS if f in flags]
    lack = [f for f in CPU_FLAGS if f not in flags]
    return f"{model}, {os.cpu_count()} cpus; has {' '.join(have) or 'none'}; lacks {' '.join(lack) or 'none'}"


def last_level_cache() -> int | None:
    """Bytes of cpu0's largest cache as Linux reports it (sysfs); ``None`` where it does not. Whether
    a table fits in it decides whether a quarter-size int8 index can save memory traffic."""
    from pathlib import Path

    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    best = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if size and size[:-1].isdigit() and size[-1] in units:
            best = max(best or 0, int(size[:-1]) * units[size[-1]])
    return best


def blas_kernel() -> str:
    """The BLAS numpy runs, as threadpoolctl sees it (OpenBLAS settings change every figure)."""
    from threadpoolctl import threadpool_info

    parts = [
        f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} threads={i.get('num_threads')}"
        for i in threadpool_info()
        if i.get("user_api") == "blas"
    ]
    return "; ".join(parts) or "no BLAS found by threadpoolctl"


def print_header(module: str) -> None:
    """What every benchmark prints first: the command that reproduces it, the CPU, its flags, the BLAS
    kernel and the libraries' versions, so a figure can be read against the machine that printed it."""
    import importlib.util
    import shlex
    import sys

    unset = "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE " if not {"OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"} & set(os.environ) else ""
    print(f"command: {unset}python -m {module} {shlex.join(sys.argv[1:])}".rstrip())
    print(f"CPU: {cpu_model()}")
    versions = f"python {sys.version.split()[0]}, numpy {np.__version__}"
    if importlib.util.find_spec("torch"):
        import torch

        versions += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    print(f"{versions}; BLAS: {blas_kernel()}")


def queries_near(table: npt.NDArray[np.float32], n: int, seed: int) -> npt.NDArray[np.float32]:
    """Queries drawn like the corpus: random rows of it plus a little noise (sigma 0.1)."""
    rng = np.random.default_rng(seed)
    picked = table[rng.integers(0, table.shape[0], n)]
    out: npt.NDArray[np.float32] = picked + 0.1 * rng.standard_normal(picked.shape, dtype=np.float32)
    return out


def matryoshka_like(rows: int, dim: int, seed: int, clusters: int = 1000) -> npt.NDArray[np.float32]:
    """PCA-rotated clusters: clusters with a decaying variance spectrum in a random basis, rotated
    onto their principal axes, so variance falls along the dimensions as in a Matryoshka model."""
    rng = np.random.default_rng(seed)
    spectrum = np.exp(-np.arange(dim) / (dim / 8))
    centres = rng.standard_normal((clusters, dim)) * spectrum
    data = centres[rng.integers(0, clusters, rows)] + 0.3 * rng.standard_normal((rows, dim)) * spectrum
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    data = data @ basis.T  # hide the spectrum in a random basis...
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(data[: min(rows, 50_000)], rowvar=False))
    principal = eigenvectors[:, np.argsort(eigenvalues)[::-1]]
    out: npt.NDArray[np.float32] = (data @ principal).astype(np.float32)  # ...and recover it by PCA
    return out
