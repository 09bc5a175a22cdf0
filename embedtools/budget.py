"""ByteBudget: the MemoryAccountant that refuses a reservation before anything is allocated."""

from __future__ import annotations

import math
import threading
from typing import Any, cast

import numpy as np

from embedtools.errors import InvalidArgumentError, MemoryLimitError
from embedtools.protocols import MemoryReport
from embedtools.validation import INT64_MAX, check_positive_int

__all__ = ["GIB", "ByteBudget", "format_bytes"]

GIB = 1024**3
_MAX_GIB = 2**33  # GiB in 2**63 bytes, one more than int64 holds


def format_bytes(n: int) -> str:
    """``1536`` → ``"1.5 KiB"``: binary units, one decimal, as people read memory."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


class ByteBudget:
    """A hard limit in bytes with a charge per owner; safe to share between threads and stores.

    Landing exactly on the limit is allowed (as in the seed). The limit is fixed at construction and
    must be positive: the seed accepted 0 and negative limits and then divided by zero. It is at most
    int64's maximum (8 EiB): a limit no machine reaches is a typo, and reports stay int64.
    """

    def __init__(self, limit_bytes: int) -> None:
        self._limit = check_positive_int(limit_bytes, "memory limit (bytes)", upper=INT64_MAX)
        self._charges: dict[str, int] = {}
        self._used = 0
        self._lock = threading.Lock()

    @classmethod
    def from_gib(cls, gib: object) -> ByteBudget:
        """A budget of ``gib`` GiB (1024³ bytes, the seed's ``max_memory_gb`` unit): a positive
        number (numpy's too), below 2**33 GiB so that the bytes fit int64 (``1e300`` is a typo, not
        "unlimited"); a fraction of a byte rounds down, to at least one byte."""
        if isinstance(gib, (bool, np.bool_)) or not isinstance(gib, (int, float, np.integer, np.floating)):
            raise InvalidArgumentError(f"max_memory_gb must be a positive finite number, got {gib!r}")
        # as just checked (int is a float to checkers); pyright's isinstance leaves numpy's type arguments unknown
        number = cast("float | np.integer[Any] | np.floating[Any]", gib)
        value = int(number) if isinstance(number, (int, np.integer)) else float(number)
        if not (value > 0 and (isinstance(value, int) or math.isfinite(value))):
            raise InvalidArgumentError(f"max_memory_gb must be a positive finite number, got {gib!r}")
        if value >= _MAX_GIB:
            raise InvalidArgumentError(
                f"max_memory_gb={gib!r} is more bytes than int64 holds; give less than {_MAX_GIB} GiB"
            )
        return cls(max(int(value * GIB), 1))

    @property
    def limit_bytes(self) -> int:
        return self._limit

    def __repr__(self) -> str:
        return f"ByteBudget(used={format_bytes(self._used)}, limit={format_bytes(self._limit)})"

    def reserve(self, owner: str, nbytes: int) -> None:
        if nbytes < 0:
            raise InvalidArgumentError(f"cannot reserve a negative amount ({nbytes} bytes)")
        with self._lock:
            if self._used + nbytes > self._limit:
                available = max(self._limit - self._used, 0)
                raise MemoryLimitError(
                    f"{owner} asks for {format_bytes(nbytes)} but {format_bytes(self._used)} of the "
                    f"{format_bytes(self._limit)} limit are in use ({format_bytes(available)} available)",
                    asked=nbytes,
                    used=self._used,
                    limit=self._limit,
                )
            self._charges[owner] = self._charges.get(owner, 0) + nbytes
            self._used += nbytes

    def release(self, owner: str, nbytes: int | None = None) -> None:
        with self._lock:
            held = self._charges.get(owner, 0)
            amount = held if nbytes is None else nbytes
            if amount < 0 or amount > held:
                raise InvalidArgumentError(f"{owner} holds {held} bytes and cannot release {amount}")
            if amount == held:
                self._charges.pop(owner, None)
            else:
                self._charges[owner] = held - amount
            self._used -= amount

    def report(self) -> MemoryReport:
        with self._lock:
            return MemoryReport(used_bytes=self._used, limit_bytes=self._limit, by_owner=dict(self._charges))
