"""Smoke tests of issue 16's benchmark sections at tiny sizes: they run, and what they check holds.

The figures themselves are machine-dependent and never asserted; what is asserted is what the
sections would report wrongly if the code under them were wrong: certified results equal to float32
exact search on every query, every scaling point measured (or skipped when over the limit), the plot
written, and the GPU check script's Python steps passing on the CPU.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_certified, bench_scaling
from benchmarks.common import last_level_cache

ROOT = Path(__file__).resolve().parents[1]


def test_certified_section_reports_exact_ids_on_every_query(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    bench_certified.section_certified(3000, 64, 6, 1, "cpu", ("bfloat16", "int8"), min_ratio=0.0, gemm_side=256)
    out = capsys.readouterr().out
    assert re.search(r"bfloat16 \d+ GFLOP/s", out) and re.search(r"int8 \d+ GFLOP/s", out)
    for screen in ("bfloat16", "int8"):
        assert f"certified {screen}: " in out and "screen " + screen in out, out
    assert out.count("ids differ from float32 exact on 0 of 6 queries") == 2, out
    assert "target <= 1.0x" in out


def test_the_real_sets_torch_targets_report_recall_beside_each_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    from benchmarks.bench_search import real_on_torch, truth_cosine
    from benchmarks.common import clustered, queries_near

    corpus = clustered(3000, 384, seed=0, clusters=40)
    queries = queries_near(corpus, 8, seed=1)
    real_on_torch(corpus, queries, truth_cosine(corpus, queries), 1)
    out = capsys.readouterr().out
    assert "torch store (integer product torch._int_mm for int8" in out, out
    for name in ("funnel [(128, 50)] after fit_rotation(128)", "int8 rescore=2", "int8 certified"):
        line = next(line for line in out.splitlines() if name in line)
        assert re.search(r"= \d+\.\d\dx exact", line) and "recall@10" in line, line
    certified = next(line for line in out.splitlines() if "int8 certified" in line)
    assert "recall@10 1.0000" in certified, certified  # exact ids: recall against the float64 truth is 1


def test_certified_sets_agree_with_float32_exact(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    bench_certified.section_certified_sets(3000, 64, 6, 1, real=False)
    out = capsys.readouterr().out
    counts = [int(n) for n in re.findall(r"mismatches\s+(\d+)", out)]
    assert len(counts) == 2 * 2 * 3, out  # two sets x two backends x (bf16, funnel, rotated funnel)
    assert counts == [0] * len(counts), out
    assert "certified funnel after fit_rotation" in out


def test_scaling_measures_each_point_skips_over_the_limit_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_png = tmp_path / "scaling.png"
    methods = ("store f32 (numpy)", "numpy naive")
    results = bench_scaling.section_scaling(True, 1, out_png, memory_limit_gb=0.05, axes={"rows": (1000, 10**7), "queries": (3,), "dims": (16,)},
                                            centre=(1000, 16, 3), methods=methods)  # fmt: skip
    printed = capsys.readouterr().out
    measured = results["rows"][bench_scaling.Point(1000, 16, 3)]
    for method in methods:
        r = measured[method]
        assert isinstance(r, dict), r
        assert float(r["seconds"]) > 0 and float(r["extra_bytes"]) >= 0
    assert all(isinstance(v, str) and v.startswith("skipped") for v in results["rows"][bench_scaling.Point(10**7, 16, 3)].values())
    assert "skipped" in printed and "varying dims" in printed
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_check_runs_its_python_steps_on_the_cpu() -> None:
    pytest.importorskip("torch")
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"], capture_output=True, text=True,
                          env=env, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "gpu_check: every step passed" in done.stdout
    assert "float32 GEMM floor" in done.stdout or "not applicable" in done.stdout


def test_gpu_check_refuses_a_python_without_the_dependencies(tmp_path: Path) -> None:
    bare = tmp_path / "python"
    bare.write_text("#!/bin/sh\nexec python3 -I -S \"$@\"\n", encoding="utf-8")  # no site-packages: no numpy
    bare.chmod(0o755)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": str(bare)}, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "lacks numpy" in done.stdout


def test_last_level_cache_reads_the_largest_cache_linux_reports() -> None:
    """The int8 why-line compares the table with this size: it must be the largest level's, in bytes."""
    sizes = Path("/sys/devices/system/cpu/cpu0/cache")
    reported = sorted(sizes.glob("index*/size")) if sizes.is_dir() else []
    found = last_level_cache()
    if not reported:
        assert found is None
        return
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    largest = max(int(p.read_text().strip()[:-1]) * units[p.read_text().strip()[-1]] for p in reported)
    assert found == largest and found >= 1 << 10
