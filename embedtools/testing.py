"""Typed seams for tests: swap a container's collaborators, and fakes that record what the store did.

dependency-injector's ``override`` accepts any provider, so a fake missing a Protocol member passes
both type checkers and fails at its first use. :func:`overriding` takes the Protocols themselves,
so mypy and pyright list the missing members at the call. The fakes delegate to the real
implementations (``NumpyBackend``, ``ByteBudget``) so they keep satisfying the Protocols as those
change, and a test asserts on what was called instead of reaching into the store.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Generator
from typing import Any, Literal, NamedTuple, TypeVar

from dependency_injector import providers

from embedtools.backends.numpy import NumpyBackend
from embedtools.budget import ByteBudget
from embedtools.container import Container
from embedtools.errors import MemoryLimitError
from embedtools.protocols import ArrayBackend, Hasher, MemoryAccountant, MemoryReport

__all__ = ["AccountantCall", "FakeBackend", "RecordingAccountant", "overriding"]

T = TypeVar("T")


@contextlib.contextmanager
def overriding(
    container: Container,
    *,
    backend: ArrayBackend[Any] | None = None,
    accountant: MemoryAccountant | None = None,
    hasher: Hasher | None = None,
) -> Generator[Container]:
    """Within the block, ``container`` builds stores from the given collaborators.

    The backend and hasher replace the container's singletons; the accountant is shared by every
    store built in the block, which is what a test that inspects it wants.
    """
    with contextlib.ExitStack() as stack:
        if backend is not None:
            _swap(stack, container.backend, backend)
        if accountant is not None:
            _swap(stack, container.accountant, accountant)
        if hasher is not None:
            _swap(stack, container.hasher, hasher)
        yield container


def _swap(stack: contextlib.ExitStack[bool | None], provider: providers.Provider[T], value: T) -> None:
    """Override ``provider`` with ``value`` until ``stack`` closes; ``value``'s type is checked here,
    since dependency-injector's ``override`` accepts any provider."""
    provider.override(providers.Object(value))  # pyright: ignore[reportUnknownMemberType]
    stack.callback(provider.reset_last_overriding)


class FakeBackend(NumpyBackend):
    """A NumPy backend that records the name of every public method called on it, in order.

    It reports itself as ``numpy`` so the store treats it exactly as the real one. ``free_bytes``
    is settable because the real NumPy backend reports none, which leaves ``max_memory_gb="80%"``
    untestable on a CPU.
    """

    def __init__(self, *, free_bytes: int | None = None) -> None:
        super().__init__()
        self.calls: list[str] = []
        self._free = free_bytes
        self._calls_lock = threading.Lock()
        for name in dir(NumpyBackend):
            member = getattr(NumpyBackend, name)
            if not name.startswith("_") and callable(member):
                setattr(self, name, self._recorded(name, getattr(self, name)))

    def _recorded(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            with self._calls_lock:
                self.calls.append(name)
            return method(*args, **kwargs)

        return call

    def free_bytes(self) -> int | None:
        return self._free

    def count(self, name: str) -> int:
        """How many times the method ``name`` was called."""
        with self._calls_lock:
            return self.calls.count(name)


class AccountantCall(NamedTuple):
    """One call on a :class:`RecordingAccountant`; ``nbytes`` is ``None`` for a full release."""

    kind: Literal["reserve", "release", "refused"]
    owner: str
    nbytes: int | None


class RecordingAccountant:
    """A :class:`~embedtools.ByteBudget` that records every reservation and release with its owner.

    Set ``refusing`` (or pass ``refuse=True``) to make every reservation fail with
    :class:`~embedtools.MemoryLimitError`, as a full budget would: the way to test rollback without
    sizing data to a limit.
    """

    def __init__(self, limit_bytes: int = 1 << 30, *, refuse: bool = False) -> None:
        self.inner: ByteBudget = ByteBudget(limit_bytes)
        self.calls: list[AccountantCall] = []
        self.refusing: bool = refuse
        self._lock = threading.Lock()

    def reserve(self, owner: str, nbytes: int) -> None:
        with self._lock:
            if self.refusing:
                self.calls.append(AccountantCall("refused", owner, nbytes))
                used = self.inner.report().used_bytes
                raise MemoryLimitError(
                    f"{owner} asks for {nbytes} bytes: this RecordingAccountant refuses every reservation",
                    asked=nbytes,
                    used=used,
                    limit=self.inner.limit_bytes,
                )
            self.inner.reserve(owner, nbytes)
            self.calls.append(AccountantCall("reserve", owner, nbytes))

    def release(self, owner: str, nbytes: int | None = None) -> None:
        with self._lock:
            self.inner.release(owner, nbytes)
            self.calls.append(AccountantCall("release", owner, nbytes))

    def report(self) -> MemoryReport:
        return self.inner.report()

    def reserved(self) -> list[AccountantCall]:
        """The successful reservations, in order."""
        with self._lock:
            return [call for call in self.calls if call.kind == "reserve"]
