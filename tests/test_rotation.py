"""PCA rotation for funnel search on tables whose prefixes carry little (non-Matryoshka models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import embedtools as et
from embedtools import ByteBudget, EmbeddingStore, InvalidArgumentError, MemoryLimitError, Sha256Hasher
from tests.conformance.backends import IDS, PAIRS
from tests.helpers import clustered, reference_scores


def make_store(pair: tuple[str, str] = ("numpy", "cpu"), limit_bytes: int = 1 << 30) -> EmbeddingStore:
    return EmbeddingStore(et.make_backend(*pair), ByteBudget(limit_bytes), Sha256Hasher())


def variance_at_the_end(rows: int, dim: int, seed: int) -> np.ndarray:
    """Clusters whose variance *rises* along the dimensions: raw prefixes carry almost nothing."""
    rng = np.random.default_rng(seed)
    spectrum = np.exp(-np.arange(dim)[::-1] / (dim / 8))
    centres = rng.standard_normal((30, dim)) * spectrum
    data = centres[rng.integers(0, 30, rows)] + 0.3 * rng.standard_normal((rows, dim)) * spectrum
    return data.astype(np.float32)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found.tolist(), truth.tolist(), strict=True)]))


@pytest.mark.parametrize("pair", PAIRS, ids=IDS)
def test_rotation_rescues_the_funnel_where_prefixes_carry_nothing(pair: tuple[str, str]) -> None:
    corpus = variance_at_the_end(3000, 64, seed=1)
    queries = corpus[:40] + 0.05 * np.random.default_rng(2).standard_normal((40, 64)).astype(np.float32)
    truth = np.argsort(-reference_scores(queries, corpus, "cosine"), axis=1)[:, :10]
    store = make_store(pair)
    store.add(corpus)
    raw = recall(store.search(queries, k=10, funnel=[(16, 50)]).indices, truth)
    store.fit_rotation(64, components=16)
    rotated = store.search(queries, k=10, funnel=[(16, 50)])
    assert recall(rotated.indices, truth) >= 0.95 > raw
    ref = reference_scores(queries, corpus, "cosine")
    np.testing.assert_allclose(rotated.scores, np.take_along_axis(ref, rotated.indices, axis=1), atol=1e-4)
    plain_prefix = store.search(queries, k=10, dimension=16)  # a plain prefix search ignores the rotation
    assert plain_prefix.source_dimension == 64


def test_rotation_charges_releases_and_follows_the_table(tmp_path: Path) -> None:
    store = make_store()
    store.add(clustered(100, 32))
    base = store.memory_info().used_bytes
    store.fit_rotation(32)  # default: a quarter of the width
    assert store.memory_info().used_bytes == base + 32 * 32 * 4 + 100 * 8 * 4
    store.fit_rotation(32, components=16)
    assert store.memory_info().used_bytes == base + 32 * 32 * 4 + 100 * 16 * 4
    store.add(clustered(20, 32, seed=1))
    state = store.table(32)
    assert state.rotation is not None and store.backend.shape(state.rotation.prefix) == (120, 16)
    store.save(tmp_path / "s")
    loaded = make_store().load(tmp_path / "s")
    loaded_rotation = loaded.table(32).rotation
    assert loaded_rotation is not None
    np.testing.assert_array_equal(loaded_rotation.matrix, state.rotation.matrix)
    q = clustered(4, 32, seed=3)
    assert loaded.search(q, k=5, funnel=[(8, 30)]).ids == store.search(q, k=5, funnel=[(8, 30)]).ids
    assert loaded.memory_info().used_bytes == store.memory_info().used_bytes  # both cached the 8-d unit prefix
    store.fit_rotation(32, components=16)  # refitting releases the old rotation's norm cache
    assert store.memory_info().used_bytes == 120 * 33 * 4 + 32 * 32 * 4 + 120 * 16 * 4
    store.drop_rotation(32)
    assert store.table(32).rotation is None
    assert store.memory_info().used_bytes == 120 * 33 * 4
    with pytest.raises(InvalidArgumentError):
        store.drop_rotation(32)


def test_a_rotated_cosine_funnel_ranks_on_a_charged_unit_copy_of_the_rotated_prefix() -> None:
    corpus, q = clustered(300, 32), clustered(6, 32, seed=4)
    store = make_store()
    store.add(corpus)
    store.fit_rotation(32, components=8)
    before = store.memory_info().used_bytes
    found = store.search(q, k=5, funnel=[(8, 40)])
    assert dict(store.table(32).caches) == {"rotation_unit_prefix/8": 300 * 8 * 4}
    assert store.memory_info().used_bytes == before + 300 * 8 * 4
    # the same search by hand: rotated queries against the normalised rotated prefix, then exact cosine
    rotation = store.table(32).rotation
    assert rotation is not None
    prefix = np.asarray(rotation.prefix)[:, :8]
    first = (q @ rotation.matrix[:, :8]) @ (prefix / np.linalg.norm(prefix, axis=1, keepdims=True)).T
    exact = reference_scores(q, corpus, "cosine")
    for row, shortlist in enumerate(np.argsort(-first, axis=1, kind="stable")[:, :40]):
        best = shortlist[np.argsort(-exact[row, shortlist], kind="stable")[:5]]
        assert found.indices[row].tolist() == best.tolist()
    assert store.search(q, k=5, funnel=[(8, 40)]).ids == found.ids  # the cached copy ranks alike
    store.drop_rotation(32)  # the copy goes with the rotation, and its bytes with it
    assert dict(store.table(32).caches) == {} and store.memory_info().used_bytes == 300 * 33 * 4


def test_full_shortlist_with_rotation_is_exact() -> None:
    corpus = clustered(200, 24)
    store = make_store()
    store.add(corpus)
    store.fit_rotation(24, components=12)
    q = clustered(5, 24, seed=9)
    for metric in ("cosine", "dot", "l2"):
        np.testing.assert_array_equal(
            store.search(q, k=5, metric=metric, funnel=[(6, 200), (12, 200)]).indices,
            store.search(q, k=5, metric=metric).indices,
        )


def test_bad_rotation_requests_change_nothing() -> None:
    store = make_store(limit_bytes=100 * 33 * 4 + 100)
    store.add(clustered(100, 32))
    before = store.memory_info().used_bytes
    with pytest.raises(MemoryLimitError):
        store.fit_rotation(32)
    for bad in (0, 33, 2.5, "8"):
        with pytest.raises(InvalidArgumentError):
            store.fit_rotation(32, components=bad)  # type: ignore[arg-type]
    with pytest.raises(et.DimensionError):
        store.fit_rotation(16)
    assert store.memory_info().used_bytes == before and store.table(32).rotation is None


def test_moments_summed_in_chunks_give_the_same_rotation(monkeypatch: pytest.MonkeyPatch) -> None:
    import embedtools.rotation as rotation_module

    corpus = clustered(500, 16, seed=21)
    whole = make_store()
    whole.add(corpus)
    whole.fit_rotation(16, 8)
    monkeypatch.setattr(rotation_module, "MOMENT_CHUNK_VALUES", 16 * 7)  # 7 rows a chunk
    chunked = make_store()
    chunked.add(corpus)
    chunked.fit_rotation(16, 8)
    a, b = whole.table(16).rotation, chunked.table(16).rotation
    assert a is not None and b is not None
    np.testing.assert_allclose(np.abs(a.matrix), np.abs(b.matrix), atol=1e-5)  # axes up to sign
