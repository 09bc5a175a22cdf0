"""Backend names → lazily built backends, and the one documented ``auto`` rule.

Nothing here imports torch or MLX until a backend is built or ``auto`` has to look for a GPU.
``auto`` picks, among libraries installed *and usable here*: MLX where it runs on a GPU (Apple
silicon), then PyTorch on CUDA, then PyTorch on MPS, then NumPy. A CPU-only PyTorch or MLX is never
chosen over NumPy unless asked for by name (the seed picked CPU torch, in three inconsistent orders).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedtools.errors import BackendUnavailableError, InvalidArgumentError
from embedtools.protocols import Backend

__all__ = [
    "BACKEND_NAMES",
    "BackendChoice",
    "Description",
    "available_backends",
    "choose_auto",
    "describe",
    "make_backend",
]

BACKEND_NAMES: tuple[str, ...] = ("auto", "numpy", "torch", "mlx")

_MODULES = {"torch": "torch", "mlx": "mlx.core"}


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it or its parent package.

    (``find_spec("mlx.core")`` would import ``mlx``; the submodule is looked up on disk instead.)
    """
    top, _, sub = module.partition(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if not sub:
        return True
    return any(
        any(Path(folder).glob(f"{sub}.*")) or Path(folder, sub).is_dir() for folder in spec.submodule_search_locations or ()
    )


def available_backends() -> tuple[str, ...]:
    """Backends whose library is installed here (found without importing it)."""
    return ("numpy",) + tuple(name for name, module in _MODULES.items() if _installed(module))


def _require(name: str) -> None:
    if not _installed(_MODULES[name]):
        raise BackendUnavailableError(
            f"backend {name!r} needs {_MODULES[name]}, which is not installed: pip install 'embedtools[{name}]'"
        )


def devices(name: str) -> tuple[str, ...]:
    """Devices the named backend can use here, best first (imports that backend's library)."""
    if name == "numpy":
        return ("cpu",)
    _require(name)
    if name == "torch":
        from embedtools.backends.torch import torch_devices

        return torch_devices()
    from embedtools.backends.mlx import mlx_devices

    return mlx_devices()


def _gpu_possible(name: str) -> bool:
    """Cheap look (no import) for whether the library could reach a GPU here; the import then decides.

    Keeps ``auto`` from importing torch (about a second) on machines that plainly have no GPU.
    """
    apple_silicon = platform.system() == "Darwin" and platform.machine() == "arm64"
    if name == "mlx":
        return apple_silicon or _version("mlx-cuda") is not None
    version = _version("torch") or ""
    if apple_silicon:
        return True
    drivers = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd")
    return "+cpu" not in version and (platform.system() == "Windows" or any(os.path.exists(p) for p in drivers))


@dataclass(frozen=True)
class BackendChoice:
    """A concrete backend and device, and why it was chosen."""

    name: str
    device: str | None
    reason: str


def choose_auto(device: str | None = None) -> BackendChoice:
    """Apply the ``auto`` rule (module docstring). A given ``device`` picks the library that has it."""
    installed = available_backends()
    if device is not None:
        kind = device.split(":")[0].lower()
        by_kind = {"cpu": "numpy", "cuda": "torch", "mps": "torch", "gpu": "mlx"}
        if kind not in by_kind:
            raise BackendUnavailableError(f"no backend has a device {device!r}; devices are cpu, cuda[:N], mps, gpu")
        return BackendChoice(by_kind[kind], device, f"device {device!r} was asked for")
    looked: list[str] = []
    if "mlx" in installed and not _gpu_possible("mlx"):
        looked.append("MLX has no GPU backend here (Metal needs Apple silicon; no mlx-cuda)")
    elif "mlx" in installed:
        if "gpu" in devices("mlx"):
            return BackendChoice("mlx", "gpu", "MLX is installed and runs on the GPU here")
        looked.append("MLX runs on the CPU only here")
    else:
        looked.append("MLX is not installed")
    if "torch" in installed and not _gpu_possible("torch"):
        looked.append("PyTorch is a CPU build or no GPU driver is present")
    elif "torch" in installed:
        usable = devices("torch")
        for kind in ("cuda", "mps"):
            found = [d for d in usable if d.startswith(kind)]
            if found:
                return BackendChoice("torch", found[0], f"PyTorch is installed and {found[0]} is usable ({'; '.join(looked)})")
        looked.append("PyTorch sees no CUDA or MPS device")
    else:
        looked.append("PyTorch is not installed")
    return BackendChoice("numpy", "cpu", f"no GPU library is usable: {'; '.join(looked)}; NumPy is the CPU default")


def resolve(name: object, device: object = None) -> BackendChoice:
    """The concrete backend that ``(name, device)`` stands for; ``auto`` applies the rule."""
    if not isinstance(name, str) or name.lower() not in BACKEND_NAMES:
        raise InvalidArgumentError(f"unknown backend {name!r}; expected one of {', '.join(BACKEND_NAMES)}")
    if device is not None and not isinstance(device, str):
        raise InvalidArgumentError(f"device must be a str or None, got {device!r}")
    lowered = name.lower()
    if lowered == "auto":
        return choose_auto(device)
    return BackendChoice(lowered, device, f"backend {lowered!r} was asked for")


def make_backend(name: str = "auto", device: str | None = None) -> Backend[Any]:
    """Build the backend ``name`` on ``device`` (``None``: its best device here), checked now."""
    choice = resolve(name, device)
    if choice.name == "numpy":
        if choice.device not in (None, "cpu"):
            raise BackendUnavailableError(f"the numpy backend runs on the cpu only, not on {choice.device!r}")
        from embedtools.backends.numpy import NumpyBackend

        return NumpyBackend()
    _require(choice.name)
    if choice.name == "torch":
        from embedtools.backends.torch import TorchBackend

        return TorchBackend(choice.device)
    from embedtools.backends.mlx import MlxBackend

    return MlxBackend(choice.device)


@dataclass(frozen=True)
class Description:
    """What ``embedtools info`` prints: what ``auto`` (or the given config) picks here, and why."""

    backend: str
    device: str
    reason: str
    installed: tuple[str, ...]
    devices: dict[str, tuple[str, ...]] = field(default_factory=dict[str, tuple[str, ...]])
    versions: dict[str, str | None] = field(default_factory=dict[str, str | None])
    #: How many times faster than float32 each low-precision GEMM ran on this backend's device
    #: (``0.0``: no native product), as the automatic screening rule measured it.
    screen_speedups: dict[str, float] = field(default_factory=dict[str, float])
    #: Whether the automatic rule would screen plain exact searches here, and by what.
    auto_screen: str = ""
    #: Which way the backend makes a float32 score block, per class of query counts, where it has
    #: several and times them (torch on a CPU, ``TorchBackend.float32_product``); empty elsewhere.
    float32_products: dict[str, str] = field(default_factory=dict[str, str])
    #: Which way the backend makes a bfloat16 or float16 screen's block for a batch (16+ queries), for
    #: each kind whose native product runs here (at least float32's speed); empty where none does.
    screen_products: dict[str, str] = field(default_factory=dict[str, str])

    def __str__(self) -> str:
        lines = [f"backend: {self.backend} on {self.device}", f"why: {self.reason}"]
        if self.screen_speedups:
            rates = ", ".join(f"{kind} {rate:.2f}x" for kind, rate in self.screen_speedups.items())
            lines.append(f"low-precision GEMM vs float32: {rates}")
        if self.auto_screen:
            lines.append(f"auto_screen: {self.auto_screen}")
        if self.float32_products:
            ways = ", ".join(f"{queries}: {way}" for queries, way in self.float32_products.items())
            lines.append(f"float32 block product: {ways}")
        if self.screen_products:
            lines.append("screen block product (16+ queries): " + ", ".join(f"{kind}: {way}" for kind, way in self.screen_products.items()))
        lines += [f"  {name}: devices {', '.join(found)}" for name, found in self.devices.items()]
        lines += [f"  {package}: {version or 'not installed'}" for package, version in self.versions.items()]
        return "\n".join(lines)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(backend: str = "auto", device: str | None = None) -> Description:
    """Build the backend ``(backend, device)`` resolves to and report it with versions and reasons."""
    from embedtools.backends._shared import SPEEDUP_SHAPE
    from embedtools.search.certified import AUTO_SCREEN_SPEEDUP

    choice = resolve(backend, device)
    built = make_backend(choice.name, choice.device)
    installed = available_backends()
    speedups: dict[str, float] = {kind: built.gemm_speedup(kind) for kind in ("bfloat16", "float16", "int8")}
    fast = [kind for kind, rate in speedups.items() if rate >= AUTO_SCREEN_SPEEDUP]
    rule = (
        f"on: exact searches of tables with a {' or '.join(fast)} index screen by it (certified, same ids)"
        if fast
        else f"off: no low-precision GEMM ran {AUTO_SCREEN_SPEEDUP:g}x faster than float32 here, exact search stays float32"
    )
    chooser = getattr(built, "block_product", None)
    screen_products = {} if not callable(chooser) else {
        kind: str(chooser(SPEEDUP_SHAPE[2], kind)) for kind in ("bfloat16", "float16") if speedups[kind] >= 1.0
    }  # fmt: skip
    return Description(
        float32_products=_float32_products(built),
        screen_products=screen_products,
        backend=built.name,
        device=built.device,
        reason=choice.reason,
        installed=installed,
        devices={name: devices(name) for name in installed},
        versions={p: _version(p) for p in ("embedtools", "numpy", "torch", "mlx", "dependency-injector", "safetensors")},
        screen_speedups=speedups,
        auto_screen=rule,
    )


def _float32_products(built: object) -> dict[str, str]:
    """The timed choice of a backend that has one (torch), by the class of query counts it covers."""
    chooser = getattr(built, "float32_product", None)
    if not callable(chooser):
        return {}
    from embedtools.backends.torch_products import QUERY_CLASSES

    starts = sorted(QUERY_CLASSES)
    spans = [f"{a}" if b == a + 1 else f"{a}-{b - 1}" for a, b in zip(starts, starts[1:], strict=False)] + [f"{starts[-1]}+"]
    return {f"{span} {'query' if span == '1' else 'queries'}": str(chooser(start)) for span, start in zip(spans, starts, strict=True)}
