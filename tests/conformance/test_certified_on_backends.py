"""Certified screening on every usable (backend, device): the same exact ids as the float64
reference for every query, whatever each device's low-precision GEMM rounds (bf16/fp16 output on a
CPU, float32 output through cuBLAS), with and without a filter."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest

import embedtools as et
from embedtools import ByteBudget, EmbeddingStore, Metric, Sha256Hasher
from embedtools.filters import Label
from tests.conformance.backends import IDS, PAIRS
from tests.helpers import clustered, matryoshka_like, reference_scores


@functools.cache
def _backend(name: str, device: str) -> et.Backend[Any]:
    """One backend per pair for the module: each times its low-precision GEMMs once, on first use."""
    return et.make_backend(name, device)


def _exact(queries: np.ndarray, corpus: np.ndarray, metric: Metric, k: int, mask: np.ndarray | None = None) -> np.ndarray:
    ref = reference_scores(queries, corpus, metric)
    if mask is not None:
        ref = np.where(mask[None, :], ref, -np.inf)
    return np.lexsort((np.broadcast_to(np.arange(corpus.shape[0]), ref.shape), -ref), axis=1)[:, :k]


@pytest.mark.parametrize(("name", "device"), PAIRS, ids=IDS)
@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_certified_screens_return_the_exact_ids(name: str, device: str, metric: Metric) -> None:
    corpus = clustered(1500, 40, seed=31)
    corpus[7] = corpus[3]  # a duplicate: the lower row wins
    queries = clustered(9, 40, seed=32)
    labels = ["a" if i % 4 else "b" for i in range(corpus.shape[0])]
    mask = np.array([label == "a" for label in labels])
    store = EmbeddingStore(_backend(name, device), ByteBudget(1 << 30), Sha256Hasher(), search_block_bytes=1 << 18)
    store.add(corpus, labels=labels)
    for kind in ("bfloat16", "float16", "int8"):
        store.quantize(40, kind)
        got = store.search(queries, 10, metric=metric, quantized=kind, rescore="certified")
        np.testing.assert_array_equal(got.indices, _exact(queries, corpus, metric, 10), err_msg=kind)
        kept = store.search(queries, 10, metric=metric, quantized=kind, rescore="certified", where=Label("a"))
        np.testing.assert_array_equal(kept.indices, _exact(queries, corpus, metric, 10, mask), err_msg=f"{kind} filtered")


@pytest.mark.parametrize(("name", "device"), PAIRS, ids=IDS)
def test_certified_funnel_returns_the_exact_ids(name: str, device: str) -> None:
    corpus = matryoshka_like(2000, 48, seed=33)
    queries = matryoshka_like(7, 48, seed=34)
    store = EmbeddingStore(_backend(name, device), ByteBudget(1 << 30), Sha256Hasher())
    store.add(corpus)
    for metric in ("cosine", "dot", "l2"):
        got = store.search(queries, 10, metric=metric, funnel=[(12, 30)], rescore="certified")
        np.testing.assert_array_equal(got.indices, _exact(queries, corpus, metric, 10), err_msg=metric)
