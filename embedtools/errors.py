"""The exceptions embedtools raises for bad input.

Every failure a caller can provoke is an :class:`EmbedtoolsError`, so one ``except`` catches them all;
each subclass also inherits the builtin a caller would have caught before (``ValueError``,
``MemoryError``, ``ImportError``, ...) so code written against the seed package keeps working.
A call that raises one of these has changed nothing: no store, accountant or file is left half-done.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "DimensionError",
    "DuplicateIdError",
    "EmbedtoolsError",
    "InvalidArgumentError",
    "InvalidEmbeddingError",
    "MemoryLimitError",
    "ReadOnlyStoreError",
    "ShardLostError",
    "StoreFormatError",
    "StoreNotEmptyError",
    "StoreNotFoundError",
    "StoreWriteError",
    "UnhashableConfigError",
    "UnknownIdError",
]


class EmbedtoolsError(Exception):
    """Base of every error embedtools raises on purpose."""


class InvalidArgumentError(EmbedtoolsError, ValueError):
    """An argument has the wrong type or value (``k <= 0``, an unknown metric, mismatched lengths)."""


class InvalidEmbeddingError(EmbedtoolsError, ValueError):
    """Vectors that cannot be stored or searched: NaN/inf, wrong rank, non-numeric or empty."""


class DimensionError(EmbedtoolsError, ValueError):
    """A dimension that does not fit: no table for it, or vectors of another width."""


class DuplicateIdError(EmbedtoolsError, ValueError):
    """An id that is already in the table, or given twice in one call."""


class UnknownIdError(EmbedtoolsError, LookupError):
    """An id that is not in the table asked about."""


class StoreFormatError(EmbedtoolsError, ValueError):
    """A file that is not a valid embedtools (or seed) store: truncated, corrupt or inconsistent."""


def invalid_file(path: object, reason: str) -> StoreFormatError:
    """The :class:`StoreFormatError` for ``path``, which is not a valid embedtools file for ``reason``.

    One wording for every module that reads the file (the format, its safetensors layout, ``locate``).
    """
    return StoreFormatError(f"{path} is not a valid embedtools file: {reason}")


class StoreNotFoundError(EmbedtoolsError, FileNotFoundError):
    """The path given to ``load`` does not exist."""


class StoreWriteError(EmbedtoolsError, OSError):
    """``save`` could not write the file (permission, disk full, a name too long for the filesystem).

    The target is untouched and no temp file is left; ``errno`` is the operating system's, when it
    gave one, so a caller can tell a full disk from a read-only folder.
    """


class StoreNotEmptyError(EmbedtoolsError, RuntimeError):
    """``load`` was called on a store that already holds tables; it only fills empty stores."""


class ReadOnlyStoreError(EmbedtoolsError, PermissionError):
    """A change to a store whose tables are memory-mapped from a file; ``materialize()`` it first."""


class UnhashableConfigError(EmbedtoolsError, TypeError):
    """A configuration value that has no unambiguous canonical encoding (see README, hash rules)."""


class BackendUnavailableError(EmbedtoolsError, ImportError):
    """The asked-for array library or device is not usable here; the message names what to install."""


class MemoryLimitError(EmbedtoolsError, MemoryError):
    """A reservation that would exceed the memory budget; raised before anything is allocated."""

    def __init__(self, message: str, *, asked: int, used: int, limit: int) -> None:
        super().__init__(message)
        self.asked = asked
        self.used = used
        self.limit = limit

    def __reduce__(self) -> tuple[object, ...]:
        # keyword-only fields: the default reduce would call cls(message) and fail (a sharded
        # store's workers send their errors to the client pickled)
        return (_memory_limit, (str(self), self.asked, self.used, self.limit))


def _memory_limit(message: str, asked: int, used: int, limit: int) -> MemoryLimitError:
    return MemoryLimitError(message, asked=asked, used=used, limit=limit)


class ShardLostError(EmbedtoolsError, RuntimeError):
    """Shards of a :class:`~embedtools.sharded.ShardedStore` whose worker died and that no saved
    file can restore: the call gave no answer rather than one from the other shards; ``shards``
    names them."""

    def __init__(self, message: str, *, shards: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.shards = shards

    def __reduce__(self) -> tuple[object, ...]:
        return (_shard_lost, (str(self), self.shards))


def _shard_lost(message: str, shards: tuple[int, ...]) -> ShardLostError:
    return ShardLostError(message, shards=shards)
