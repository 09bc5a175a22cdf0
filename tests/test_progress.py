"""Progress bars: drawn when asked (or on a terminal), silent otherwise, never changing results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import embedtools as et
from embedtools import ArrayBackend, ByteBudget, EmbeddingStore, InvalidArgumentError, Sha256Hasher
from embedtools.testing import FakeBackend
from tests.helpers import clustered


def make_store(progress: bool | None, backend: ArrayBackend[Any] | None = None) -> EmbeddingStore:
    store = EmbeddingStore(backend or et.make_backend("numpy"), ByteBudget(1 << 30), Sha256Hasher(), progress=progress)
    store.add(clustered(2000, 16))
    store.add(clustered(100, 8, seed=1))
    return store


def test_bars_are_drawn_when_forced_and_results_do_not_change(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queries = clustered(1200, 16, seed=2)
    quiet = make_store(False).search(queries, k=5)
    capsys.readouterr()
    loud = make_store(True)
    result = loud.search(queries, k=5)
    assert "search" in capsys.readouterr().err
    np.testing.assert_array_equal(result.indices, quiet.indices)
    # a query batch cut into steps goes through BLAS in other shapes: the same scores up to rounding
    np.testing.assert_allclose(result.scores, quiet.scores, rtol=1e-6)
    loud.save(tmp_path / "s")
    assert "save s" in capsys.readouterr().err
    EmbeddingStore(et.make_backend("numpy"), ByteBudget(1 << 30), Sha256Hasher(), progress=True).load(tmp_path / "s")
    assert "load s" in capsys.readouterr().err


def test_auto_is_silent_off_a_terminal_and_does_not_split_work(capsys: pytest.CaptureFixture[str]) -> None:
    backend = FakeBackend()
    store = make_store(None, backend)
    backend.calls.clear()
    result = store.search(clustered(1200, 16, seed=2), k=5)
    assert backend.count("topk") == 1  # one step: pytest's stderr is not a terminal
    assert result.indices.shape == (1200, 5)  # ... of all 1200 queries
    assert capsys.readouterr().err == ""


def test_progress_setting_through_the_container() -> None:
    for value, expected in (("auto", None), (True, True), (False, False), (None, None)):
        c = et.Container()
        c.config.progress.from_value(value)
        assert c.store().progress is expected
    c = et.Container()
    c.config.progress.from_value("yes")
    with pytest.raises(InvalidArgumentError):
        c.store()


def test_long_adds_and_studies_draw_bars(capsys: pytest.CaptureFixture[str]) -> None:
    store = EmbeddingStore(et.make_backend("numpy"), ByteBudget(1 << 30), Sha256Hasher(), progress=True)
    store.add(clustered(100_000, 4))
    assert "add 100000 x 4" in capsys.readouterr().err
    store.add(clustered(10, 4, seed=1))  # a short add draws nothing
    assert capsys.readouterr().err == ""
    et.study(store, clustered(20, 4, seed=2), k=3, dimensions=[4, 2], quantizations=["int8"], progress=True)
    assert "study" in capsys.readouterr().err
