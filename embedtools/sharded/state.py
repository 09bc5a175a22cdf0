"""What the client keeps of a sharded store: its shards, each table's global row order, the config.

One :class:`ShardedState` is shared by the facade (:class:`~embedtools.sharded.store.ShardedStore`)
and the modules that do its work (:mod:`~embedtools.sharded.changes`,
:mod:`~embedtools.sharded.searching`, :mod:`~embedtools.sharded.files`): they read and change the
client's picture only through it, under its lock.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import cast

from embedtools.errors import DimensionError, ReadOnlyStoreError
from embedtools.hashing import Sha256Hasher
from embedtools.protocols import Quantization
from embedtools.sharded.group import ShardGroup
from embedtools.sharded.holder import ShardTable
from embedtools.sharded.placement import Runs
from embedtools.sharded.results import ShardedTable
from embedtools.validation import JSONObject, check_dimension

__all__ = ["ShardedState"]


class ShardedState:
    """The shards (``group``) and the client's picture of them; calls hold ``lock`` (re-entrant)."""

    def __init__(self, group: ShardGroup, hasher: Sha256Hasher) -> None:
        self.group = group
        self.hasher = hasher
        self.lock: AbstractContextManager[bool] = threading.RLock()
        self.runs: dict[int, Runs] = {}
        """Each table's global row order."""
        self.int_labels: dict[int, bool] = {}
        """Whether each table's labels are integers."""
        self.config: JSONObject = {}
        self.mapped = False
        """Whether the shards are memory-mapped from their files (and read-only)."""

    @property
    def shard_count(self) -> int:
        return self.group.shard_count

    @property
    def dimensions(self) -> tuple[int, ...]:
        return tuple(sorted(self.runs))

    @property
    def config_hash(self) -> str:
        return self.hasher.hash_config(self.config)

    def no_table(self, d: int) -> DimensionError:
        return DimensionError(f"no table of dimension {d}; stored: {list(self.dimensions) or 'none'}")

    def dimension(self, dimension: object) -> int:
        """``dimension`` checked, and a table of it stored."""
        d = check_dimension(dimension)
        if d not in self.runs:
            raise self.no_table(d)
        return d

    def holding(self, d: int) -> list[int]:
        """The shards that hold rows of table ``d``."""
        return [s for s, n in enumerate(self.runs[d].shard_rows(self.shard_count)) if n]

    def table(self, d: int) -> ShardedTable:
        """Table ``d`` (stored) across the shards, with the indexes every shard keeps."""
        infos = self.group.all("tables")
        shard_rows = self.runs[d].shard_rows(self.shard_count)
        kinds: list[Quantization] = sorted({k for info in infos.values() if d in info for k in cast("ShardTable", info[d]).quantized})
        return ShardedTable(d, self.runs[d].rows, shard_rows, tuple(kinds), self.int_labels[d])

    def changed(self, shards: Sequence[int] | range) -> None:
        """These shards changed: their files no longer hold them."""
        for s in shards:
            self.group.sources[s] = None

    def writable(self) -> None:
        if self.mapped:
            raise ReadOnlyStoreError("this sharded store's shards are memory-mapped from their files and read-only; "
                                     "call materialize() to copy them into their workers' memory first")  # fmt: skip
