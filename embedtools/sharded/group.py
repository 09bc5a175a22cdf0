"""The client's handle on its shards: one actor per shard, the calls to them, and lost-shard recovery.

A :class:`ShardGroup` starts a :class:`~embedtools.sharded.holder.ShardHolder` actor per shard on
its worker, sends method calls to many shards at once and gathers their results, counts the bytes
that cross, and keeps where each shard's current content can be reloaded from
(:class:`Source`). A call whose worker is gone marks its shard lost: the next call first reloads
every lost shard from its file on a live worker, or raises :class:`ShardLostError` naming them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from embedtools.errors import EmbedtoolsError, InvalidArgumentError, ShardLostError
from embedtools.sharded.cluster import Pending, call, release, start_actor, unpack, worker_addresses, worker_gone
from embedtools.sharded.holder import ShardHolder

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["ShardGroup", "ShardsLost", "Source", "shard_configs"]

#: How long a replacement shard's actor may take to start on a live worker.
_RECOVER_SECONDS = 60.0


@dataclass(frozen=True)
class Source:
    """Where a shard's current content can be reloaded from: a file (and its row ranges)."""

    path: str
    rows: Mapping[int, tuple[int, int]] | None
    header_sha256: str | None
    mmap: bool | None


class ShardsLost(Exception):
    """Internal: shards whose workers are gone (turned into a reload or a :class:`ShardLostError`)."""

    def __init__(self, shards: tuple[int, ...]) -> None:
        super().__init__(shards)
        self.shards = shards


class ShardGroup:
    """One actor per shard, placed round-robin on ``addresses`` and built from its shard's config.

    ``timeout`` bounds each shard call: a shard that does not answer in time counts as lost.
    """

    def __init__(self, client: Client, configs: Sequence[dict[str, object]], addresses: Sequence[str], timeout: float | None) -> None:
        count = len(configs)
        self._client = client
        self._configs = list(configs)
        self._timeout = timeout
        self.sources: list[Source | None] = [None] * count
        """Where each shard can be reloaded from (``None``: changed since, not recoverable)."""
        self.lost: set[int] = set()
        """The shards whose workers are gone and that are not reloaded yet."""
        self.traffic: int = 0
        """Bytes sent to and received from the shards (pickled arguments and results)."""
        self._workers = [addresses[i % len(addresses)] for i in range(count)]
        self._futures: list[object | None] = [None] * count
        self._holders: list[object | None] = [None] * count
        for i, handle in enumerate(self._start([(i, self._workers[i]) for i in range(count)])):
            self._futures[i], self._holders[i] = handle

    @property
    def shard_count(self) -> int:
        return len(self._holders)

    @property
    def workers(self) -> tuple[str, ...]:
        """The address of each shard's worker."""
        return tuple(self._workers)

    def _start(self, where: Sequence[tuple[int, str]], timeout: float | None = None) -> list[tuple[object, object]]:
        wait = self._timeout if timeout is None else timeout
        return [start_actor(self._client, ShardHolder, (self._configs[i],), w, wait) for i, w in where]

    def send(self, shard: int, method: str, *args: object) -> Pending:
        pending, sent = call(self._holders[shard], method, *args)
        self.traffic += sent
        return pending

    def gather(self, calls: Mapping[int, Pending]) -> dict[int, Any]:
        """Every call's result, after all calls ended; an embedtools error from a shard is raised as
        it is, a call whose worker is gone makes :class:`ShardsLost` name those shards (never probed
        again: connecting to a dead worker waits out the connect timeout)."""
        results: dict[int, Any] = {}
        error: BaseException | None = None
        lost: list[int] = []
        for shard, future in calls.items():
            try:
                results[shard], received = unpack(future.result(timeout=self._timeout))
                self.traffic += received
            except EmbedtoolsError as exc:
                error = error or exc
            except Exception as exc:
                if not worker_gone(exc):
                    raise
                lost.append(shard)
                error = error or exc
        if lost:
            self.lost.update(lost)
            raise ShardsLost(tuple(lost)) from error
        if error is not None:
            raise error
        return results

    def call(self, method: str, args: Mapping[int, tuple[object, ...]]) -> dict[int, Any]:
        """``method(*args[s])`` on each shard ``s`` at once; a lost shard is a :class:`ShardLostError`."""
        self.refuse_lost()
        try:
            return self.gather({s: self.send(s, method, *a) for s, a in args.items()})
        except ShardsLost as lost:
            raise self.lost_error(lost.shards) from None

    def all(self, method: str, *args: object) -> dict[int, Any]:
        """``method(*args)`` on every shard at once."""
        return self.call(method, {s: args for s in range(self.shard_count)})

    def lost_error(self, shards: Sequence[int]) -> ShardLostError:
        named = tuple(sorted(shards))
        return ShardLostError(f"shards {list(named)} were lost with their workers and have no saved file to reload from "
                              "(save the store to make lost shards recoverable)", shards=named)  # fmt: skip

    def refuse_lost(self) -> None:
        """Reload the lost shards, or raise :class:`ShardLostError` naming them."""
        if self.lost and not self.recover():
            raise self.lost_error(sorted(self.lost))

    def recover(self) -> bool:
        """Reload every lost shard from its file on a live worker; ``False`` if one has no file."""
        if any(self.sources[i] is None for i in self.lost):
            return False
        dead = {self._workers[i] for i in self.lost}
        live = [w for w in worker_addresses(self._client) if w not in dead]  # the scheduler may not know yet
        if not live:
            return False
        load: dict[int, Pending] = {}
        placed = [w for j, w in enumerate(self._workers) if j not in self.lost]
        try:
            for i in sorted(self.lost):
                self._workers[i] = min(live, key=lambda w: (placed.count(w), live.index(w)))
                placed.append(self._workers[i])
                self._futures[i], self._holders[i] = self._start([(i, self._workers[i])], _RECOVER_SECONDS)[0]
                source = self.sources[i]
                assert source is not None
                load[i] = self.send(i, "load", source.path, source.mmap, source.rows, source.header_sha256)
        except Exception as exc:  # the worker chosen is gone too (the scheduler did not know yet)
            if not worker_gone(exc):
                raise
            return False
        self.lost.clear()
        try:
            self.gather(load)
        except ShardsLost:
            return False
        return True

    def close(self) -> None:
        """Release the shards' actors (their stores go with them)."""
        for f in self._futures:
            if f is not None:
                release(f)
        self._futures = [None] * self.shard_count


def shard_configs(config: object, count: int) -> list[dict[str, object]]:
    """``config`` (``None``, one mapping, or one per shard) as ``count`` checked container configs."""
    from embedtools.container import check_config_keys

    if config is None:
        configs: list[dict[str, object]] = [{} for _ in range(count)]
    elif isinstance(config, Mapping):
        configs = [dict(cast("Mapping[str, object]", config)) for _ in range(count)]
    elif isinstance(config, Sequence) and not isinstance(config, str):
        items = list(cast("Sequence[object]", config))
        if len(items) != count or not all(isinstance(c, Mapping) for c in items):
            raise InvalidArgumentError(f"config is one mapping or one per shard ({count}), not {len(items)} items")
        configs = [dict(cast("Mapping[str, object]", c)) for c in items]
    else:
        raise InvalidArgumentError(f"config must be a mapping or one per shard, not {type(config).__name__}")
    for c in configs:
        check_config_keys(c)
    return configs
