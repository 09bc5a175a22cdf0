"""Truncation and quantisation studies: typed table, markdown, plot, CLI; the store is left as it was."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import embedtools as et
from embedtools import ByteBudget, EmbeddingStore, InvalidArgumentError, Sha256Hasher
from tests.helpers import matryoshka_like

ROOT = Path(__file__).resolve().parents[1]


def make_store() -> tuple[EmbeddingStore, np.ndarray]:
    store = EmbeddingStore(et.make_backend("numpy"), ByteBudget(1 << 30), Sha256Hasher())
    corpus = matryoshka_like(1500, 64, seed=3)
    store.add(corpus)
    return store, corpus[:40] + 0.02


def test_study_measures_every_setting_and_leaves_the_store_unchanged() -> None:
    store, queries = make_store()
    before = store.memory_info()
    table = et.study(store, queries, k=5)
    assert store.memory_info().tables[64].quantized == {}  # indexes built for the study are gone
    # what stays is the charged caches searches keep: prefix norms and unit prefixes at 32 and 16
    assert store.memory_info().used_bytes == before.used_bytes + 1500 * 4 * 2 + 1500 * (32 + 16) * 4
    kinds = [r.kind for r in table.rows]
    assert kinds == ["prefix"] * 3 + ["funnel"] * 2 + ["float16", "bfloat16", "int8", "binary"]
    assert [r.dimension for r in table.rows[:3]] == [64, 32, 16]
    full = table.rows[0]
    assert full.recall == 1.0 and full.bytes_per_row == 256
    assert all(0.0 <= r.recall <= 1.0 and r.ms_per_query > 0 for r in table.rows)
    assert table.rows[1].recall >= table.rows[2].recall  # more dimensions keep more on Matryoshka-like data
    funnel_32 = table.rows[3]
    assert funnel_32.recall >= table.rows[1].recall  # rescoring a shortlist only helps
    by_kind = {r.kind: r for r in table.rows}
    assert by_kind["binary"].bytes_per_row == 8 and by_kind["float16"].bytes_per_row == by_kind["bfloat16"].bytes_per_row == 128
    markdown = table.to_markdown()
    assert markdown.splitlines()[0] == "recall@5 against exact 64-d cosine search"
    assert markdown.count("\n| ") == len(table.rows) + 2  # header, rule, one line per row


def test_study_keeps_indexes_the_table_already_had() -> None:
    store, queries = make_store()
    store.quantize(64, "int8")
    et.study(store, queries, k=5, dimensions=[64, 16], quantizations=["int8"])
    assert set(store.table(64).quantized) == {"int8"}


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    store, queries = make_store()
    path = et.study(store, queries, k=5, dimensions=[64, 32]).plot(tmp_path / "s.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"dimensions": [128]}, InvalidArgumentError), ({"dimension": 32}, et.DimensionError), ({"repeat": 0}, InvalidArgumentError)],
)
def test_bad_study_arguments(kwargs: dict[str, object], error: type[Exception]) -> None:
    store, queries = make_store()
    with pytest.raises(error):
        et.study(store, queries, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        et.study(EmbeddingStore(et.make_backend("numpy"), ByteBudget(1 << 20), Sha256Hasher()), queries)


def test_cli_study_writes_table_and_plot(tmp_path: Path) -> None:
    corpus = matryoshka_like(800, 32, seed=2)
    np.save(tmp_path / "v.npy", corpus)
    np.save(tmp_path / "q.npy", corpus[:20] + 0.01)
    out = subprocess.run(
        [sys.executable, "-m", "embedtools", "study", str(tmp_path / "v.npy"), str(tmp_path / "q.npy"), "--out", str(tmp_path), "--k", "5"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "study.md").read_text().startswith("recall@5 against exact 32-d")
    assert (tmp_path / "study.png").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "embedtools", "study", str(tmp_path / "missing.npy"), str(tmp_path / "q.npy")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("embedtools: error:") and "Traceback" not in bad.stderr
