"""Import cost promises: ``import embedtools`` loads neither torch nor mlx, nor dependency-injector,
although the lazy names (``Container``, ``Config``, ``make_container``, the backends) resolve."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return out.stdout.strip()


def loaded_after(code: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has imported after running ``code``."""
    probe = f"{code}; import sys, json; print(json.dumps([m for m in {modules!r} if m in sys.modules]))"
    loaded: list[str] = json.loads(run(probe))
    return loaded


def test_import_loads_no_heavy_library() -> None:
    assert loaded_after("import embedtools", ("torch", "mlx", "jax", "dependency_injector", "safetensors", "tqdm")) == []


def test_container_and_store_on_numpy_load_no_torch_or_mlx() -> None:
    code = (
        "import numpy as np, embedtools as et; "
        "s = et.Container().store(); s.add(np.ones((2, 3), np.float32)); s.search(np.ones(3, np.float32), k=1)"
    )
    assert loaded_after(code, ("torch", "mlx")) == []


HIDE = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'mlx'}:
            raise ModuleNotFoundError(name)
        return None
sys.meta_path.insert(0, Hide())
import numpy as np
import embedtools as et
print(et.available_backends())
store = et.Container().store()  # backend "auto" without torch or mlx: numpy
store.add(np.eye(3, dtype=np.float32))
assert store.backend.name == "numpy" and store.search(np.eye(3, dtype=np.float32), k=1).indices.tolist() == [[0], [1], [2]]
for name in ('torch', 'mlx'):
    try:
        et.make_backend(name)
    except et.BackendUnavailableError as exc:
        print(type(exc).__name__, isinstance(exc, ImportError), exc)
"""


def test_a_missing_optional_library_names_the_extra() -> None:
    lines = run(HIDE).splitlines()
    assert lines[0] == "('numpy',)"
    assert lines[1].startswith("BackendUnavailableError True") and "pip install 'embedtools[torch]'" in lines[1]
    assert lines[2].startswith("BackendUnavailableError True") and "pip install 'embedtools[mlx]'" in lines[2]


def test_unknown_backend_name() -> None:
    import embedtools as et

    with pytest.raises(et.InvalidArgumentError, match="unknown backend"):
        et.make_backend("jax")
    with pytest.raises(et.BackendUnavailableError, match="cpu only"):
        et.make_backend("numpy", "cuda")


def test_public_names_resolve() -> None:
    import embedtools as et

    for name in et.__all__:
        assert getattr(et, name) is not None
    with pytest.raises(AttributeError):
        getattr(et, "NoSuchThing")  # checkers refuse the attribute itself: tests/typing checks that


def test_lazy_names_load_only_their_module() -> None:
    code = "import embedtools as et; et.Config; et.make_container; et.NumpyBackend"
    assert loaded_after(code, ("torch", "mlx", "dask")) == []
