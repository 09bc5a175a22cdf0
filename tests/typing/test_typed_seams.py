"""The typed seams refuse what would fail at run time: checked by running mypy (and pyright, where it
is installed) on snippets a downstream application could write."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mypy import api

ROOT = Path(__file__).resolve().parents[2]

BAD = {
    "fake_backend_missing_a_member": """
        import embedtools as et
        from embedtools.testing import overriding

        class Half:
            name = "half"

        with overriding(et.Container(), backend=Half()):
            pass
    """,
    "accountant_missing_report": """
        import embedtools as et
        from embedtools.testing import overriding

        class NoReport:
            def reserve(self, owner: str, nbytes: int) -> None: ...
            def release(self, owner: str, nbytes: int | None = None) -> None: ...

        with overriding(et.Container(), accountant=NoReport()):
            pass
    """,
    "misspelt_public_name": """
        import embedtools as et
        et.Lable("a")
    """,
    "unknown_config_key": """
        import embedtools as et
        config: et.Config = {"backnd": "numpy", "max_memroy_gb": 1}
        et.make_container(config)
    """,
    "config_value_outside_its_literal": """
        import embedtools as et
        config: et.Config = {"backend": "jax"}
        et.make_container(config)
    """,
}

# What each checker must name in its message, per snippet.
MUST_NAME = {
    "fake_backend_missing_a_member": "Half",
    "accountant_missing_report": "NoReport",
    "misspelt_public_name": "Lable",
    "unknown_config_key": "backnd",
    "config_value_outside_its_literal": "jax",
}

GOOD = """
    from typing import assert_type
    import embedtools as et
    from embedtools.container import Configuration
    from embedtools.testing import FakeBackend, RecordingAccountant, overriding

    c = et.make_container({"backend": "numpy", "max_memory_gb": "80%", "progress": False})
    with overriding(c, backend=FakeBackend(free_bytes=1 << 20), accountant=RecordingAccountant()) as same:
        assert_type(same, et.Container)
    config: et.Config = {"device": None, "hash_length": 8}
    assert_type(c.config, Configuration)
    c.config.from_dict(dict(config))
"""


def write(tmp_path: Path, name: str, code: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(code))
    return path


def mypy(path: Path) -> tuple[int, str]:
    stdout, stderr, status = api.run(
        ["--strict", "--config-file", str(ROOT / "mypy.ini"), "--cache-dir", str(ROOT / ".mypy_cache"), str(path)]
    )
    return status, stdout + stderr


def pyright_command() -> list[str] | None:
    beside = Path(sys.executable).parent / "pyright"
    found = str(beside) if beside.exists() else shutil.which("pyright")
    return None if found is None else [found]


def pyright(tmp_path: Path, path: Path) -> tuple[int, list[str]]:
    command = pyright_command()
    if command is None:
        pytest.skip("pyright is not installed (it comes with the dev extra)")
    config = {"strict": ["."], "extraPaths": [str(ROOT)], "pythonVersion": "3.11"}
    (tmp_path / "pyrightconfig.json").write_text(json.dumps(config))
    out = subprocess.run(
        [*command, "--outputjson", "--pythonpath", sys.executable, path.name],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYRIGHT_PYTHON_IGNORE_WARNINGS": "1", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"},
        check=False,
    )
    report = json.loads(out.stdout)
    return out.returncode, [d["message"] for d in report["generalDiagnostics"] if d["severity"] == "error"]


@pytest.mark.parametrize("name", sorted(BAD))
def test_mypy_rejects(tmp_path: Path, name: str) -> None:
    status, output = mypy(write(tmp_path, name, BAD[name]))
    assert status == 1 and MUST_NAME[name] in output, output


def test_mypy_names_the_missing_backend_members(tmp_path: Path) -> None:
    status, output = mypy(write(tmp_path, "missing", BAD["fake_backend_missing_a_member"]))
    assert 'incompatible type "Half"; expected "ArrayBackend[Any] | None"' in output, output


def test_mypy_accepts_the_typed_seams(tmp_path: Path) -> None:
    status, output = mypy(write(tmp_path, "good", GOOD))
    assert status == 0, output


@pytest.mark.parametrize("name", sorted(BAD))
def test_pyright_rejects(tmp_path: Path, name: str) -> None:
    status, errors = pyright(tmp_path, write(tmp_path, name, BAD[name]))
    assert status == 1 and any(MUST_NAME[name] in e for e in errors), errors


def test_pyright_accepts_the_typed_seams(tmp_path: Path) -> None:
    status, errors = pyright(tmp_path, write(tmp_path, "good", GOOD))
    assert status == 0 and errors == [], errors
