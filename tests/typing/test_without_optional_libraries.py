"""Where torch and MLX are absent the package still imports (tests/test_imports.py) and still
type-checks: every mypy error is confined to the two modules that import those libraries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OPTIONAL_MODULES = {"embedtools/backends/torch.py", "embedtools/backends/torch_products.py", "embedtools/backends/mlx.py"}


APP = """
from typing import assert_type
import numpy as np
import numpy.typing as npt
import embedtools as et

c = et.Container()
c.config.from_dict({"backend": "numpy"})
store = assert_type(c.store(), et.EmbeddingStore)
store.add(np.ones((2, 3), np.float32), ids=["a", "b"])
result = store.search(np.ones(3, np.float32), k=1)
assert_type(result.scores, npt.NDArray[np.float32])
assert_type(et.config_hash({"m": 1}), str)
"""


def test_mypy_without_torch_and_mlx(tmp_path: Path) -> None:
    base = getattr(sys, "_base_executable", sys.executable)
    probe = "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('torch', 'mlx')))"
    if subprocess.run([base, "-c", probe], check=False).returncode != 0:
        pytest.skip(f"{base} itself has torch or mlx installed, so they cannot be hidden from mypy")
    # The base interpreter (no torch, no mlx) plus the project's other dependencies, linked in.
    shadow = tmp_path / "site"
    shadow.mkdir()
    import dependency_injector
    import numpy
    import safetensors
    import typing_extensions

    for module in (numpy, dependency_injector, safetensors):
        (shadow / module.__name__).symlink_to(Path(module.__file__ or "").parent)
    (shadow / "typing_extensions.py").symlink_to(typing_extensions.__file__ or "")
    app = tmp_path / "app.py"
    app.write_text(APP)
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", "mypy.ini", "--cache-dir", str(tmp_path / "cache"),
         "--python-executable", base, "embedtools", str(app)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(shadow)}, timeout=600,
    )
    errors = [line for line in out.stdout.splitlines() if ": error:" in line]
    files = {line.split(":", 1)[0] for line in errors}
    assert files & OPTIONAL_MODULES, "torch/mlx were visible to mypy: the check proved nothing\n" + out.stdout
    assert files <= OPTIONAL_MODULES, out.stdout  # the application on the NumPy path checks cleanly
