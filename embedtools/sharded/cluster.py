"""The one place embedtools talks to Dask ``distributed``: workers, actors, and their calls.

Kept apart so the rest of the sharded store sees typed functions: ``distributed``'s own
annotations are partial (``Actor`` methods are resolved at run time), and this seam is where a
different engine would plug in.
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["Pending", "call", "release", "start_actor", "unpack", "worker_addresses", "worker_gone"]


class Pending(Protocol):
    """A call in flight on a shard's worker (an ``ActorFuture``)."""

    def result(self, timeout: float | None = None) -> Any: ...


def worker_addresses(client: Client, wait: float | None = None) -> list[str]:
    """The addresses of the cluster's workers now, sorted; with ``wait``, first wait up to that many
    seconds for one to be there (a cluster just started, or whose workers are restarting)."""
    if wait is not None:
        try:
            cast("Any", client).wait_for_workers(1, timeout=wait)
        except TimeoutError:
            return []
    # ``nthreads()`` asks the scheduler each time; ``scheduler_info()`` returns a cache that the
    # client's periodic refresh may overwrite with one listing no workers at all (a race seen
    # under load: "the cluster has no workers" with both running)
    threads = cast("dict[str, object]", cast("Any", client).nthreads())
    return sorted(str(w) for w in threads)


def start_actor(client: Client, cls: type, args: tuple[object, ...], worker: str, timeout: float | None) -> tuple[object, object]:
    """An instance of ``cls(*args)`` as an actor pinned to ``worker``: ``(future, actor)`` (the
    future keeps the actor alive)."""
    future = cast("Any", client).submit(cls, *args, actor=True, workers=[worker], allow_other_workers=False, pure=False)
    return cast("object", future), cast("object", future.result(timeout=timeout))


def call(actor: object, method: str, *args: object) -> tuple[Pending, int]:
    """``actor.run(method, pickled args)`` on its worker, without waiting, and the bytes sent.

    Arguments and results cross as one pickle each (see :func:`unpack`): Dask's message
    serialisation walks lists item by item, and a list of 60,000 ids took seconds where its pickle
    takes milliseconds; arrays travel as pickle-5 buffers either way.
    """
    payload = pickle.dumps(args, protocol=5)
    try:
        pending = cast("Pending", cast("Any", actor).run(method, payload))
    except Exception as exc:  # the actor's worker is already known to be gone
        return _Failed(exc), len(payload)
    return pending, len(payload)


class _Failed:
    """A call that could not be sent: its result is the error."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def result(self, timeout: float | None = None) -> Any:
        raise self.error


def worker_gone(error: BaseException) -> bool:
    """Whether a failed call means its worker is gone (or did not answer in time), rather than an
    error the method raised: connection errors and timeouts are ``OSError``s, and an actor whose
    worker the scheduler already dropped refuses calls with this ``RuntimeError``."""
    return isinstance(error, OSError) or (isinstance(error, RuntimeError) and "Actor was lost" in str(error))


def unpack(result: object) -> tuple[Any, int]:
    """A shard call's result and its size in bytes."""
    blob = cast("bytes", result)
    return pickle.loads(blob), len(blob)  # noqa: S301 - our own workers' answers


def release(future: object) -> None:
    cast("Any", future).release()
