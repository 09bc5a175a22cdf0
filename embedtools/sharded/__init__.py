"""A sharded store on Dask ``distributed`` (the ``embedtools[dask]`` extra): :class:`ShardedStore`.

Importing this package needs ``distributed``; ``import embedtools`` does not import it, and
``embedtools.ShardedStore`` loads it on first use.
"""

from __future__ import annotations

from embedtools.errors import BackendUnavailableError


def _require_distributed() -> None:
    try:
        import distributed  # noqa: F401  # pyright: ignore[reportUnusedImport]
    except ImportError as exc:  # pragma: no cover - exercised in a subprocess without dask
        raise BackendUnavailableError(
            "embedtools.sharded needs Dask distributed, which is not installed: pip install 'embedtools[dask]'"
        ) from exc


_require_distributed()

from embedtools.sharded.results import SearchStats, ShardedMemoryInfo, ShardedTable
from embedtools.sharded.files import load_into
from embedtools.sharded.store import ShardedStore

__all__ = ["SearchStats", "ShardedMemoryInfo", "ShardedStore", "ShardedTable", "load_into"]
