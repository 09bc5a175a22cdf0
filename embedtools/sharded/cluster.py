"""The one place embedtools talks to Dask ``distributed``: workers, actors, and their calls.

Kept apart so the rest of the sharded store sees typed functions: ``distributed``'s own
annotations are partial (``Actor`` methods are resolved at run time), and this seam is where a
different engine would plug in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["Pending", "call", "release", "start_actor", "worker_addresses"]


class Pending(Protocol):
    """A call in flight on a shard's worker (an ``ActorFuture``)."""

    def result(self, timeout: float | None = None) -> Any: ...


def worker_addresses(client: Client) -> list[str]:
    """The addresses of the cluster's workers now, sorted."""
    info = cast("dict[str, Any]", cast("Any", client).scheduler_info())
    return sorted(str(w) for w in cast("dict[str, object]", info["workers"]))


def start_actor(client: Client, cls: type, args: tuple[object, ...], worker: str, timeout: float | None) -> tuple[object, object]:
    """An instance of ``cls(*args)`` as an actor pinned to ``worker``: ``(future, actor)`` (the
    future keeps the actor alive)."""
    future = cast("Any", client).submit(cls, *args, actor=True, workers=[worker], allow_other_workers=False, pure=False)
    return cast("object", future), cast("object", future.result(timeout=timeout))


def call(actor: object, method: str, *args: object) -> Pending:
    """``actor.method(*args)`` on its worker, without waiting."""
    return cast("Pending", getattr(actor, method)(*args))


def release(future: object) -> None:
    cast("Any", future).release()
