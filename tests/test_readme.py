"""The README's two commands are the ones CI and users run; keep them true."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(encoding="utf-8"))


def test_readme_opens_with_the_demo_and_the_check_commands() -> None:
    demo, check = readme_commands()[:2]
    assert demo.endswith("python -m embedtools demo")
    assert "mypy --strict embedtools tests" in check and "pytest" in check
    assert "pip install torch==2.13.0" in check


def test_ci_runs_exactly_the_readme_test_command() -> None:
    lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[-1] == readme_commands()[1]


def test_the_quick_start_runs(tmp_path: Path) -> None:
    import os

    code = re.findall(r"```python\n(.+?)\n```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)[0]
    (tmp_path / "cache").mkdir()
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict[str, object] = {}
        exec(compile(code, "README quick start", "exec"), namespace)  # noqa: S102 - our own README
    finally:
        os.chdir(old)
    assert namespace["r"].indices.shape == (3, 5)  # type: ignore[attr-defined]
    assert len(list((tmp_path / "cache").iterdir())) == 1
