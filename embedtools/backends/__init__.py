"""Backend names → lazily built backends. Nothing here imports torch or MLX until asked to.

``make_backend("numpy" | "torch" | "mlx" | "auto", device)`` is the one factory the container
calls. ``auto`` picks NumPy for now: the Torch and MLX backends are the next issue's work, and until
they exist asking for them raises :class:`BackendUnavailableError` naming what is missing.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from embedtools.errors import BackendUnavailableError, InvalidArgumentError
from embedtools.protocols import ArrayBackend

__all__ = ["BACKEND_NAMES", "available_backends", "make_backend", "resolve_backend_name"]

BACKEND_NAMES: tuple[str, ...] = ("auto", "numpy", "torch", "mlx")

_EXTRAS = {"torch": "torch", "mlx": "mlx"}
_MODULES = {"torch": "torch", "mlx": "mlx.core"}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module with no spec
        return False


def available_backends() -> tuple[str, ...]:
    """Backends whose library is installed here (found without importing it)."""
    return ("numpy",) + tuple(name for name, module in _MODULES.items() if _installed(module))


def resolve_backend_name(name: object) -> str:
    """The concrete backend ``name`` stands for; ``auto`` is NumPy until issue 5's backends land."""
    if not isinstance(name, str) or name.lower() not in BACKEND_NAMES:
        raise InvalidArgumentError(f"unknown backend {name!r}; expected one of {', '.join(BACKEND_NAMES)}")
    lowered = name.lower()
    return "numpy" if lowered == "auto" else lowered


def make_backend(name: str = "auto", device: str | None = None) -> ArrayBackend[Any]:
    """Build the backend ``name`` on ``device`` (``None``: the backend's default)."""
    resolved = resolve_backend_name(name)
    if resolved == "numpy":
        if device not in (None, "cpu"):
            raise BackendUnavailableError(f"the numpy backend runs on the cpu only, not on {device!r}")
        from embedtools.backends.numpy import NumpyBackend

        return NumpyBackend()
    if not _installed(_MODULES[resolved]):
        raise BackendUnavailableError(
            f"backend {resolved!r} needs {_MODULES[resolved]}, which is not installed: "
            f"pip install 'embedtools[{_EXTRAS[resolved]}]'"
        )
    raise BackendUnavailableError(
        f"backend {resolved!r} is not implemented in this version of embedtools (numpy is); "
        "see the README's roadmap"
    )
