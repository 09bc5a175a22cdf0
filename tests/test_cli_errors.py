"""The CLI's top level: every failure is one ``embedtools: error:`` line on stderr, never a traceback."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from embedtools.cli import main

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "seed_store_0_1_2"


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("embedtools: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_inspect_of_a_deeply_nested_header_is_one_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A re-signed header (its digest is only a checksum) nested 100,000 deep."""
    from safetensors.numpy import save_file

    text = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "nested"
    save_file({"x": np.zeros(1, np.float32)}, str(path),
              metadata={"embedtools": text, "embedtools.sha256": hashlib.sha256(text.encode()).hexdigest()})
    assert main(["inspect", str(path)]) == 1
    one_line_error(capsys)


def test_convert_to_a_name_too_long_is_one_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(FIXTURE), str(tmp_path / ("n" * 256))]) == 1
    assert "too long" in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_convert_with_an_absurd_budget_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1e300 GiB overflows a byte count: exit 2 once that is a typed bad-argument error, 1 until then."""
    for budget in ("1e300", "inf", "nan"):
        assert main(["convert", str(FIXTURE), str(tmp_path / "out"), "--max-memory-gb", budget]) in (1, 2)
        one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_convert_onto_a_fifo_is_refused_on_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert main(["convert", str(FIXTURE), str(fifo)]) == 2
    assert "FIFO" in one_line_error(capsys)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and [p.name for p in tmp_path.iterdir()] == ["fifo"]


def test_convert_into_a_full_disk_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    assert main(["convert", str(FIXTURE), str(tmp_path / "out")]) == 1
    assert "No space left" in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_inspect_of_a_fifo_or_a_name_too_long_is_one_typed_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A FIFO blocked ``inspect`` for ever; a 300-byte name ended in an untyped ``OSError`` line."""
    fifo = tmp_path / "store.safetensors"
    os.mkfifo(fifo)
    assert main(["inspect", str(fifo)]) == 1
    assert "FIFO" in one_line_error(capsys)
    assert main(["inspect", str(tmp_path / ("x" * 300))]) == 1
    line = one_line_error(capsys)
    assert "OSError" not in line and "no store" in line
