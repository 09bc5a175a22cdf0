"""Progress bars for long store operations: tqdm on a terminal, nothing elsewhere, never on import.

``progress=None`` (the default, ``"auto"`` in the container) shows a bar only when standard error
is a terminal, and only for work that has already taken half a second (tqdm's ``delay``), so quick
calls and non-interactive runs (CI, pipes, notebooks' logs) stay silent. ``True``/``False`` force it.
"""

from __future__ import annotations

import sys
from collections.abc import Generator
from contextlib import contextmanager
from typing import Protocol

from embedtools.errors import InvalidArgumentError

__all__ = ["Bar", "check_progress", "progress_bar", "shows"]


class Bar(Protocol):
    def update(self, n: float = 1) -> object: ...


class _Silent:
    def update(self, n: float = 1) -> None:
        return None


def check_progress(setting: object) -> bool | None:
    """``True``, ``False`` or ``None`` (auto); the container's ``"auto"`` means ``None``."""
    if setting is None or (isinstance(setting, str) and setting == "auto"):
        return None
    if isinstance(setting, bool):
        return setting
    raise InvalidArgumentError(f"progress must be True, False, None or 'auto', got {setting!r}")


def shows(setting: bool | None) -> bool:
    """Whether a bar would be drawn here (callers split work into steps only then)."""
    return sys.stderr.isatty() if setting is None else setting


@contextmanager
def progress_bar(setting: bool | None, total: int, desc: str, unit: str = "it") -> Generator[Bar]:
    """A bar of ``total`` steps, or a silent stand-in when progress is off here."""
    if not shows(setting) or total < 1:
        yield _Silent()
        return
    from tqdm import tqdm  # imported only when a bar is really shown

    with tqdm(total=total, desc=desc, unit=unit, delay=0.5 if setting is None else 0.0, leave=False) as bar:
        yield bar
