"""A stateful model of the store: hypothesis drives add, remove, update, search (filters, prefixes,
every metric, l2 on offset data), quantize, save and load against plain NumPy lists, and checks
after every step that the store holds exactly what the model says and that the budget charges
exactly what the store reports."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import embedtools as et
from embedtools import ByteBudget, EmbeddingStore, Sha256Hasher
from tests.helpers import assert_exact_topk

DIMS = (4, 8)
KINDS: tuple[et.Quantization, ...] = ("int8", "binary", "bfloat16")
METRICS: tuple[et.Metric, ...] = ("cosine", "dot", "l2")
#: The 4-d table is labelled by class ids, the 8-d one by strings (one kind per table).
LABELS: dict[int, tuple[str | int, ...]] = {4: (0, 1, 2), 8: ("", "a", "b")}


def repeated(label: str | int, n: int) -> list[str] | list[int]:
    """``n`` copies of one label, typed as one kind (what ``add`` and ``update`` take)."""
    return [label] * n if isinstance(label, str) else [label] * n
LIMIT = 1 << 20
F32_BYTES = 4


@dataclass
class ModelTable:
    ids: list[str] = field(default_factory=list)
    vectors: list[npt.NDArray[np.float32]] = field(default_factory=list)
    labels: list[str | int] = field(default_factory=list)
    metadata: list[dict[str, Any]] = field(default_factory=list)
    kinds: set[et.Quantization] = field(default_factory=set)

    def matrix(self, dim: int) -> npt.NDArray[np.float32]:
        return np.stack(self.vectors).astype(np.float32) if self.vectors else np.empty((0, dim), np.float32)


def make_rows(seed: int, n: int, dim: int, offset: bool) -> npt.NDArray[np.float32]:
    """Small integers (exact dot products, real ties) or rows far from the origin with tiny spread
    (where ranking by q.x - |x|^2/2 in float32 loses the distances)."""
    rng = np.random.default_rng(seed)
    if offset:
        return (1000.0 + 0.01 * rng.standard_normal((n, dim))).astype(np.float32)
    return rng.integers(-3, 4, size=(n, dim)).astype(np.float32)


def new_store(budget: ByteBudget) -> EmbeddingStore:
    return EmbeddingStore(et.make_backend("numpy"), budget, Sha256Hasher())


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.budget = ByteBudget(LIMIT)
        self.store = new_store(self.budget)
        self.model: dict[int, ModelTable] = {}
        self.serial = 0
        self.folder = Path(tempfile.mkdtemp(prefix="embedtools-model-"))

    def teardown(self) -> None:
        self.store.clear()
        assert self.budget.report().used_bytes == 0, "an emptied store keeps bytes charged"
        shutil.rmtree(self.folder, ignore_errors=True)

    @initialize()
    def start(self) -> None:
        assert len(self.store) == 0

    # ------------------------------------------------------------------ changes

    @rule(dim=st.sampled_from(DIMS), n=st.integers(1, 12), offset=st.booleans(), name_ids=st.booleans(),
          seed=st.integers(0, 2**32 - 1), which=st.integers(0, 2), value=st.integers(0, 3))
    def add(self, dim: int, n: int, offset: bool, name_ids: bool, seed: int, which: int, value: int) -> None:
        rows = make_rows(seed, n, dim, offset)
        label = LABELS[dim][which]
        ids = None
        if name_ids:
            ids = [f"r{self.serial + i}" for i in range(n)]
            self.serial += n
        got = self.store.add(rows, ids=ids, labels=repeated(label, n), metadata=[{"n": value}] * n)
        table = self.model.setdefault(dim, ModelTable())
        assert len(got) == n and len(set(got)) == n
        assert not set(got) & set(table.ids), "generated ids collide with the table's ids"
        if ids is not None:
            assert list(got) == ids
        table.ids += list(got)
        table.vectors += list(rows)
        table.labels += [label] * n
        table.metadata += [{"n": value}] * n

    @rule(dim=st.sampled_from(DIMS))
    def add_beyond_the_budget(self, dim: int) -> None:
        rows = np.ones((LIMIT // (F32_BYTES * dim) + 1, dim), dtype=np.float32)
        before = self.budget.report().used_bytes
        with pytest.raises(et.MemoryLimitError):
            self.store.add(rows, labels=repeated(LABELS[dim][0], len(rows)))
        assert self.budget.report().used_bytes == before

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        dim = data.draw(st.sampled_from(sorted(self.model)))
        table = self.model[dim]
        chosen = data.draw(st.lists(st.sampled_from(table.ids), min_size=1, max_size=4, unique=True))
        if data.draw(st.booleans()):
            with pytest.raises(et.UnknownIdError):
                self.store.remove([*chosen, "no-such-id"], dimension=dim)
            return
        assert self.store.remove(chosen, dimension=dim) == len(chosen)
        keep = [i for i, id_ in enumerate(table.ids) if id_ not in set(chosen)]
        if not keep:
            del self.model[dim]
            return
        table.ids = [table.ids[i] for i in keep]
        table.vectors = [table.vectors[i] for i in keep]
        table.labels = [table.labels[i] for i in keep]
        table.metadata = [table.metadata[i] for i in keep]

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), offset=st.booleans(), seed=st.integers(0, 2**32 - 1))
    def update(self, data: st.DataObject, offset: bool, seed: int) -> None:
        dim = data.draw(st.sampled_from(sorted(self.model)))
        table = self.model[dim]
        chosen = data.draw(st.lists(st.sampled_from(table.ids), min_size=1, max_size=3, unique=True))
        vectors = make_rows(seed, len(chosen), dim, offset) if data.draw(st.booleans()) else None
        labels = repeated(data.draw(st.sampled_from(LABELS[dim])), len(chosen)) if data.draw(st.booleans()) else None
        self.store.update(chosen, vectors, labels=labels, dimension=dim)
        for j, id_ in enumerate(chosen):
            r = table.ids.index(id_)
            if vectors is not None:
                table.vectors[r] = vectors[j]
            if labels is not None:
                table.labels[r] = labels[j]

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), kind=st.sampled_from(KINDS))
    def quantize(self, data: st.DataObject, kind: et.Quantization) -> None:
        dim = data.draw(st.sampled_from(sorted(self.model)))
        self.store.quantize(dim, kind)
        self.model[dim].kinds.add(kind)

    # ------------------------------------------------------------------ searches

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), metric=st.sampled_from(METRICS), k=st.integers(1, 6))
    def search(self, data: st.DataObject, metric: et.Metric, k: int) -> None:
        dim = data.draw(st.sampled_from(sorted(self.model)))
        corpus = self.model[dim].matrix(dim)
        queries = corpus[data.draw(st.lists(st.integers(0, len(corpus) - 1), min_size=1, max_size=3))]
        prefix = data.draw(st.sampled_from([None, 2, dim]))
        if prefix is not None and prefix != dim and any(d for d in self.model if prefix <= d < dim):
            prefix = None  # a narrower table would be searched instead; covered by the plain case
        width = dim if prefix is None else prefix
        result = self.store.search(queries, k=k, metric=metric, dimension=prefix)
        assert result.source_dimension == dim
        assert_exact_topk(queries[:, :width], corpus[:, :width], metric, k, result.indices, result.scores, tol=1e-5)
        if metric == "l2" and prefix is None and k == 1:
            self.check_self_retrieval(queries, corpus, result.indices)

    def check_self_retrieval(
        self, queries: npt.NDArray[np.float32], corpus: npt.NDArray[np.float32], indices: npt.NDArray[np.int64]
    ) -> None:
        """Each query is a stored row: its nearest row is itself, or a row with the same vector."""
        for q, i in zip(queries, indices[:, 0], strict=True):
            assert np.array_equal(corpus[i], q), "l2 did not return a query's own row"

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), metric=st.sampled_from(METRICS), which=st.integers(0, 2),
          value=st.integers(0, 3), k=st.integers(1, 5))
    def filtered_search(self, data: st.DataObject, metric: et.Metric, which: int, value: int, k: int) -> None:
        dim = data.draw(st.sampled_from(sorted(self.model)))
        label = LABELS[dim][which]
        table = self.model[dim]
        corpus = table.matrix(dim)
        keep = np.array([lab == label or m["n"] == value for lab, m in zip(table.labels, table.metadata, strict=True)])
        query = corpus[:1]
        result = self.store.search(query, k=k, metric=metric, where=et.Label(label) | et.Meta("n").eq(value))
        rows = np.flatnonzero(keep)
        assert result.indices.shape[1] == min(k, rows.size)
        assert set(result.indices[0].tolist()) <= set(rows.tolist())
        if rows.size:
            sub = np.searchsorted(rows, result.indices)
            assert_exact_topk(query, corpus[rows], metric, k, sub, result.scores, tol=1e-5)

    @precondition(lambda self: any(t.kinds for t in self.model.values()))
    @rule(data=st.data(), metric=st.sampled_from(METRICS))
    def quantized_search_with_a_full_shortlist(self, data: st.DataObject, metric: et.Metric) -> None:
        """A shortlist as long as the table makes a quantised search exact."""
        dim = data.draw(st.sampled_from(sorted(d for d, t in self.model.items() if t.kinds)))
        kind = data.draw(st.sampled_from(sorted(self.model[dim].kinds)))
        corpus = self.model[dim].matrix(dim)
        result = self.store.search(corpus[:2], k=1, metric=metric, quantized=kind, rescore=len(corpus))
        assert_exact_topk(corpus[:2], corpus, metric, 1, result.indices, result.scores, tol=1e-5)

    # ------------------------------------------------------------------ files

    @precondition(lambda self: bool(self.model))
    @rule(mmap=st.booleans())
    def save_and_load(self, mmap: bool) -> None:
        path = self.folder / "store.safetensors"
        self.store.save(path)
        budget = ByteBudget(LIMIT)
        loaded = new_store(budget).load(path, mmap=mmap)
        self.check_holds_model(loaded)
        expected = sum(self.base_bytes(d, mapped=mmap) for d in self.model)
        assert budget.report().used_bytes == expected, "a loaded store is charged other than a fresh accounting"

    # ------------------------------------------------------------------ invariants

    def base_bytes(self, dim: int, *, mapped: bool = False) -> int:
        """What a fresh table of the model's rows is charged: vectors (unless mapped), norms, indexes."""
        table = self.model[dim]
        rows = len(table.ids)
        info = self.store.memory_info().tables[dim]
        return (0 if mapped else rows * dim * F32_BYTES) + rows * F32_BYTES + sum(info.quantized.values())

    @invariant()
    def store_holds_the_model(self) -> None:
        self.check_holds_model(self.store)

    @invariant()
    def budget_charges_what_the_store_holds(self) -> None:
        info = self.store.memory_info()
        assert self.budget.report().used_bytes == info.store_bytes == sum(t.nbytes for t in info.tables.values())
        for d in self.model:
            assert info.tables[d].nbytes >= self.base_bytes(d)

    def check_holds_model(self, store: EmbeddingStore) -> None:
        assert store.dimensions == tuple(sorted(self.model))
        for d, table in self.model.items():
            view = store.table(d)
            assert list(view.ids) == table.ids
            assert list(view.labels) == table.labels
            assert list(view.metadata) == table.metadata
            np.testing.assert_array_equal(view.to_numpy(), table.matrix(d))
            assert set(store.memory_info().tables[d].quantized) == table.kinds


StoreMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_store_against_a_numpy_model = StoreMachine.TestCase

