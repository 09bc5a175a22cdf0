"""Truncation and quantisation studies: what each prefix dimension, funnel and quantised index
costs and keeps, measured on the user's own store and queries, in one call.

    table = study(store, queries, k=10)
    print(table.to_markdown())
    table.plot("study.png")            # needs matplotlib: pip install 'embedtools[plot]'

Recall@k is measured against the exact full-dimension search of the same store; time per query is
the best of ``repeat`` runs of the whole batch divided by its size; bytes per row are what the
setting reads per row (prefix float32 columns, a quantised index's codes).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedtools.errors import InvalidArgumentError
from embedtools.progress import Bar, progress_bar
from embedtools.protocols import Metric
from embedtools.quantize import QUANTIZATIONS, Quantization, QuantizedIndex, check_quantization
from embedtools.search import check_k, check_metric
from embedtools.validation import as_queries, check_positive_int

if TYPE_CHECKING:
    import numpy.typing as npt

    from embedtools.store import EmbeddingStore

__all__ = ["StudyRow", "StudyTable", "study"]


@dataclass(frozen=True)
class StudyRow:
    """One setting: ``kind`` is ``"prefix"``, ``"funnel"`` or a quantisation name."""

    kind: str
    dimension: int
    setting: str
    recall: float
    ms_per_query: float
    bytes_per_row: float


@dataclass(frozen=True)
class StudyTable:
    """The rows of a study, with the full dimension and ``k`` they were measured against."""

    rows: tuple[StudyRow, ...]
    full_dimension: int
    k: int
    metric: str

    def to_markdown(self) -> str:
        lines = [
            f"recall@{self.k} against exact {self.full_dimension}-d {self.metric} search",
            "",
            "| kind | dimension | setting | recall@k | ms/query | bytes/row |",
            "| --- | ---: | --- | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {r.kind} | {r.dimension} | {r.setting} | {r.recall:.4f} | {r.ms_per_query:.3f} | {r.bytes_per_row:.0f} |"
            for r in self.rows
        ]
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Write a PNG: recall against dimension, and recall against bytes per row."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise InvalidArgumentError("plot needs matplotlib: pip install 'embedtools[plot]'") from None
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        quantized_kinds = [k for k in dict.fromkeys(r.kind for r in self.rows) if k not in ("prefix", "funnel")]
        for kind in dict.fromkeys(r.kind for r in self.rows):
            number = quantized_kinds.index(kind) if kind in quantized_kinds else 0
            rows = [r for r in self.rows if r.kind == kind]
            marker = "o-" if kind == "prefix" else "s--" if kind == "funnel" else "^"
            left.plot([r.dimension for r in rows], [r.recall for r in rows], marker, label=kind)
            right.plot([r.bytes_per_row for r in rows], [r.recall for r in rows], marker, label=kind)
            if kind not in ("prefix", "funnel"):
                for r in rows:  # labels stepped down, so indexes of equal size and recall stay legible
                    right.annotate(r.setting, (r.bytes_per_row, r.recall), fontsize=7, xytext=(4, -4 - 9 * number), textcoords="offset points")
        left.set(xlabel="dimension (prefix / funnel shortlist dimension)", ylabel=f"recall@{self.k}", title="recall vs dimension")
        right.set(xlabel="bytes per row read", xscale="log", title="recall vs bytes per row")
        for axis in (left, right):
            axis.grid(alpha=0.3)
            axis.set_ylim(0, 1.02)
            axis.legend(fontsize=8)
        title = f"exact {self.full_dimension}-d {self.metric} top-{self.k} as the reference"
        figure.suptitle(title)  # pyright: ignore[reportUnknownMemberType]  (matplotlib leaves **kwargs untyped)
        figure.tight_layout()
        out = Path(path)
        figure.savefig(out, dpi=110)  # pyright: ignore[reportUnknownMemberType]  (as above)
        plt.close(figure)
        return out


def _timed(fn: Any, repeat: int) -> tuple[Any, float]:
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return result, best


def _recall(found: np.ndarray[Any, Any], truth: np.ndarray[Any, Any]) -> float:
    return float(np.mean([len(set(a) & set(b)) / max(len(b), 1) for a, b in zip(found.tolist(), truth.tolist(), strict=True)]))


def _is_sequence(value: object) -> bool:
    """A list, tuple or 1-d array of settings (not a str, whose letters would be read one by one)."""
    if isinstance(value, np.ndarray):
        return value.ndim == 1
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


#: Timed runs per setting at most: more measures nothing new, and ``repeat=10**400`` never ends.
_MAX_REPEAT = 1000


def study(
    store: EmbeddingStore,
    queries: object,
    *,
    k: int = 10,
    dimension: int | None = None,
    dimensions: Sequence[int] | None = None,
    quantizations: Sequence[Quantization] = QUANTIZATIONS,
    rescore: int = 4,
    funnel_shortlist: int = 100,
    metric: Metric = "cosine",
    repeat: int = 3,
    progress: bool | None = None,
) -> StudyTable:
    """Measure every prefix dimension (plain and as a funnel), and each quantised index, on ``store``.

    ``dimension`` is the table studied (default: the widest); ``dimensions`` the prefixes (default:
    halvings of the width down to 16). Quantised indexes the table lacks are built for the study and
    dropped after it (they are charged while they exist); the store is otherwise unchanged, but for
    the caches its searches keep. ``progress`` as for the store (a bar on a terminal).
    """
    q = as_queries(queries)
    full = max(store.dimensions) if dimension is None and store.dimensions else dimension
    if full is None:
        raise InvalidArgumentError("study needs a store with a table")
    full = check_positive_int(full, "dimension")
    store.table(full)
    repeat = check_positive_int(repeat, "repeat", upper=_MAX_REPEAT)
    # every setting checked before the first search, so a bad one never leaves a study index behind
    k, metric = check_k(k), check_metric(metric)
    rescore = check_positive_int(rescore, "rescore")
    funnel_shortlist = check_positive_int(funnel_shortlist, "funnel_shortlist")
    if not _is_sequence(quantizations):
        raise InvalidArgumentError(f"quantizations must be a sequence of kinds, got {quantizations!r}")
    quantizations = tuple(check_quantization(kind) for kind in quantizations)
    if dimensions is None:
        dims: list[int] = []
        d = full
        while d >= 16:
            dims.append(d)
            d //= 2
    else:
        if not _is_sequence(dimensions):
            raise InvalidArgumentError(f"dimensions must be a sequence of ints, got {dimensions!r}")
        dims = sorted({check_positive_int(d, "dimension") for d in dimensions}, reverse=True)
        if any(d > full for d in dims):
            raise InvalidArgumentError(f"study dimensions must be at most {full}")
    q = q[:, :full]
    with progress_bar(progress, 2 * len(dims) + len(quantizations), "study", "settings") as bar:
        return _measure(store, q, full, dims, k, metric, quantizations, rescore, funnel_shortlist, repeat, bar)


def _measure(
    store: EmbeddingStore,
    q: npt.NDArray[np.float32],
    full: int,
    dims: list[int],
    k: int,
    metric: Metric,
    quantizations: Sequence[Quantization],
    rescore: int,
    funnel_shortlist: int,
    repeat: int,
    bar: Bar,
) -> StudyTable:
    truth, exact_time = _timed(lambda: store.search(q, k=k, metric=metric).indices, repeat)
    rows: list[StudyRow] = []
    per_query = 1e3 / max(q.shape[0], 1)
    for d in dims:
        found, t = (truth, exact_time) if d == full else _timed(lambda: store.search(q, k=k, dimension=d, metric=metric).indices, repeat)  # noqa: B023
        rows.append(StudyRow("prefix", d, f"{d}-d exact", _recall(found, truth), t * per_query, d * 4))
        bar.update()
    for d in dims:
        if d < full:
            funnel = [(d, max(funnel_shortlist, k))]
            found, t = _timed(lambda: store.search(q, k=k, metric=metric, funnel=funnel).indices, repeat)  # noqa: B023
            rows.append(StudyRow("funnel", d, f"{d}-d x{funnel[0][1]} -> {full}-d", _recall(found, truth), t * per_query, d * 4))
        bar.update()
    for each in quantizations:
        kind: Quantization = each  # a declared type: the lambda below reads it after the loop narrowed it
        built_here = kind not in store.memory_info().tables[full].quantized
        if built_here:
            store.quantize(full, kind)
        try:
            found, t = _timed(lambda: store.search(q, k=k, metric=metric, quantized=kind, rescore=rescore).indices, repeat)  # noqa: B023
        finally:
            if built_here:
                store.drop_quantized(full, kind)
        n = len(store.table(full))
        nbytes = QuantizedIndex.nbytes_for(kind, n, full) / n  # calibration spread over the rows
        rows.append(StudyRow(kind, full, f"{kind}, rescore x{rescore}", _recall(found, truth), t * per_query, nbytes))
        bar.update()
    return StudyTable(rows=tuple(rows), full_dimension=full, k=k, metric=metric)
