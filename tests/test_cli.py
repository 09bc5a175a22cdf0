"""The CLI through its entry points, in subprocesses: the demo is the main job."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "embedtools", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_demo_runs_end_to_end() -> None:
    out = run("demo", "--rows", "3000", "--dim", "64")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "added 3000 x 64 float32 rows" in text
    assert "query 0: doc-0 (" in text
    assert "vectors and ids identical: True; search identical: True" in text
    assert "Matryoshka funnel (16-d prefix shortlist of 100, rescored at 64-d): top-3 overlap with exact" in text
    assert "certified bfloat16 screen (a proven error bound sizes each shortlist, rescored in float64): top-3 overlap with exact 100%" in text
    assert "binary index" in text
    assert "config_hash({'model': 'bert', 'dim': 768, 'batch_size': 32}) = 4864205289d401c2" in text
    assert out.stderr == ""


def test_info_lists_backends() -> None:
    out = run("info")
    assert out.returncode == 0
    assert "backend: numpy on cpu" in out.stdout and "why: " in out.stdout
    assert "numpy: devices cpu" in out.stdout
    out = run("info", "--backend", "torch", "--device", "cuda:5")
    assert out.returncode == 2 and "not available here" in out.stderr


def test_bad_input_is_one_line_and_exit_code_2() -> None:
    out = run("demo", "--rows", "0")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("embedtools: error:")
    assert "Traceback" not in out.stderr
    out = run("demo", "--backend", "jax")
    assert out.returncode == 2 and "unknown backend" in out.stderr


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("embedtools")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "demo" in out.stdout and "info" in out.stdout


FIXTURE = ROOT / "tests" / "fixtures" / "seed_store_0_1_2"


def test_convert_then_inspect(tmp_path: Path) -> None:
    target = tmp_path / "converted.safetensors"
    out = run("convert", str(FIXTURE), str(target))
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout and "sliced_from" in out.stdout
    out = run("inspect", str(target))
    assert out.returncode == 0, out.stderr
    assert "all checksums verified" in out.stdout and "table 8d: 6 rows, float32" in out.stdout
    out = run("inspect", str(FIXTURE))
    assert out.returncode == 0 and "seed format" in out.stdout


def test_inspect_a_corrupt_file_exits_1_with_one_line(tmp_path: Path) -> None:
    target = tmp_path / "s"
    assert run("convert", str(FIXTURE), str(target)).returncode == 0
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x40
    target.write_bytes(bytes(data))
    for path in (target, tmp_path / "missing", tmp_path):
        out = run("inspect", str(path))
        assert out.returncode == 1, out
        assert out.stderr.count("\n") == 1 and out.stderr.startswith("embedtools: error:") and "Traceback" not in out.stderr


def test_convert_refuses_bad_input_without_writing(tmp_path: Path) -> None:
    out = run("convert", str(tmp_path), str(tmp_path / "out"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    out = run("convert", str(FIXTURE), str(tmp_path / "out"), "--max-memory-gb", "0.0000001")
    assert out.returncode == 2 and "asks for" in out.stderr
    assert not (tmp_path / "out").exists()
