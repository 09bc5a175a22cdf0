from __future__ import annotations

import pytest

import embedtools as et


@pytest.fixture
def container() -> et.Container:
    c = et.Container()
    c.config.from_dict({"backend": "numpy", "device": "cpu", "max_memory_gb": 1.0})
    return c


@pytest.fixture
def store(container: et.Container) -> et.EmbeddingStore:
    return container.store()
