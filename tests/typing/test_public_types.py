"""What a strictly typed application sees: checked statically by ``mypy --strict tests`` (assert_type)
and, for ``reveal_type``, by running mypy on a snippet."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, assert_type

import numpy as np
import numpy.typing as npt
from mypy import api

import embedtools as et

ROOT = Path(__file__).resolve().parents[2]


def test_static_types_of_the_public_contract() -> None:
    c = et.Container()
    store = assert_type(c.store(), et.EmbeddingStore)
    assert_type(c.backend(), et.ArrayBackend[Any])
    assert_type(c.accountant(), et.MemoryAccountant)
    assert_type(c.hasher(), et.Hasher)
    store.add(np.ones((3, 4), np.float32))
    result = assert_type(store.search(np.ones(4, np.float32), k=2), et.SearchResult)
    assert_type(result.scores, npt.NDArray[np.float32])
    assert_type(result.indices, npt.NDArray[np.int64])
    assert_type(result.ids, list[list[str]])
    assert_type(store.table(4), et.Table)
    assert_type(store.table(4).to_numpy(), npt.NDArray[np.float32])
    assert_type(store.dimensions, tuple[int, ...])
    assert_type(et.config_hash({"m": 1}), str)
    assert result.scores.dtype == np.float32


def test_every_backend_satisfies_the_protocol_statically() -> None:
    import mlx.core as mx
    import torch

    numpy_backend: et.ArrayBackend[npt.NDArray[Any]] = et.NumpyBackend()
    torch_backend: et.ArrayBackend[torch.Tensor] = et.TorchBackend("cpu")
    mlx_backend: et.ArrayBackend[mx.array] = et.MlxBackend("cpu")
    assert {numpy_backend.name, torch_backend.name, mlx_backend.name} == {"numpy", "torch", "mlx"}


SNIPPET = """
import numpy as np
import embedtools as et
c = et.Container()
reveal_type(c.store())
reveal_type(c.store().search(np.ones(4, np.float32)).scores)
reveal_type(c.store().load("x"))
"""


def test_reveal_type_through_mypy(tmp_path: Path) -> None:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(textwrap.dedent(SNIPPET))
    stdout, stderr, status = api.run(
        ["--strict", "--config-file", str(ROOT / "mypy.ini"), "--cache-dir", str(ROOT / ".mypy_cache"), str(snippet)]
    )
    notes = [line.split('Revealed type is "', 1)[1].rstrip('"') for line in stdout.splitlines() if "Revealed type" in line]
    assert len(notes) == 3, stdout + stderr
    assert notes[0] == notes[2] == "embedtools.store.EmbeddingStore"
    # numpy spells float32 as floating[_32Bit] in revealed types
    assert notes[1].startswith("numpy.ndarray[") and ("dtype[numpy.float32]" in notes[1] or "_32Bit]]]" in notes[1]), notes[1]
    assert status == 0, stdout + stderr
