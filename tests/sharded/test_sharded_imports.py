"""``import embedtools`` leaves Dask alone; ``embedtools.ShardedStore`` loads it, and without it
says which extra to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return out.stdout.strip()


def test_import_embedtools_does_not_import_dask_but_the_lazy_name_does() -> None:
    assert run("import embedtools, sys; print('distributed' in sys.modules, 'dask' in sys.modules)") == "False False"
    code = "import embedtools, sys; s = embedtools.ShardedStore; print(s.__module__, 'distributed' in sys.modules)"
    assert run(code) == "embedtools.sharded.store True"


def test_without_dask_the_error_names_the_extra() -> None:
    code = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'dask', 'distributed'}:
            raise ModuleNotFoundError(name)
        return None
sys.meta_path.insert(0, Hide())
import embedtools as et
try:
    et.ShardedStore
except et.BackendUnavailableError as exc:
    print(isinstance(exc, ImportError), exc)
"""
    assert run(code) == "True embedtools.sharded needs Dask distributed, which is not installed: pip install 'embedtools[dask]'"
