"""One LocalCluster of 2 worker processes x 1 thread for the sharded tests (the fault tests start
their own, as they kill its workers), bounded in time and always closed; each test builds its own
stores on it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

pytest.importorskip("distributed")

import distributed  # noqa: E402  (partly untyped: used through Any below)

from embedtools.container import Config  # noqa: E402

#: The most seconds the cluster may take to start, and each shard call in the tests.
START_SECONDS = 60
CALL_SECONDS = 60.0

CONFIG: Config = {"backend": "numpy", "max_memory_gb": 0.5}


def start_cluster() -> tuple[Any, Any]:
    """The cluster and a client on it; the HTTP server on a free port (two clusters may run at once)."""
    dask: Any = distributed
    cluster = dask.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                       silence_logs=logging.CRITICAL, timeout=START_SECONDS)  # fmt: skip
    try:
        client = dask.Client(cluster, timeout=START_SECONDS)
    except BaseException:
        cluster.close()
        raise
    client.wait_for_workers(2, timeout=START_SECONDS)
    return cluster, client


@contextmanager
def running_cluster() -> Iterator[Any]:
    """A client on a fresh cluster, closed (with the cluster) however the block ends."""
    cluster, client = start_cluster()
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@pytest.fixture(scope="session")
def client() -> Iterator[Any]:
    with running_cluster() as client:
        yield client
