"""Reader for the seed package's store folder (``embedding_tools`` 0.1.2 ``save_to_disk``).

The folder holds ``metadata.json`` (``dimensions``, ``dimension_info``), one ``embeddings_{d}d.npy``
per table and, store-wide, ``text_ids.txt`` / ``labels.txt`` (newline-joined). This reader is
stricter and more faithful than the seed's own: it splits lines without stripping them (the seed
lost leading/trailing spaces), checks every shape against ``metadata.json``, refuses pickles, NaN
rows and id lists whose length does not match a table, and reads nothing it has not budgeted for.
"""

from __future__ import annotations

import json
import reprlib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from embedtools.errors import InvalidEmbeddingError, StoreFormatError
from embedtools.records import StoreRecord, TableRecord, TableShape
from embedtools.validation import as_float32_matrix

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["is_seed_folder", "read_seed_shapes", "read_seed_store"]


def is_seed_folder(path: Path) -> bool:
    return path.is_dir() and (path / "metadata.json").is_file()


def _fail(path: Path, reason: str) -> StoreFormatError:
    return StoreFormatError(f"{path} is not a readable embedding_tools store: {reason}")


def _read_metadata(folder: Path) -> tuple[list[int], dict[int, object]]:
    """The table dimensions, and each table's table-level metadata (the seed's ``sliced_from``)."""
    try:
        meta: object = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _fail(folder, f"metadata.json: {exc}") from None
    except RecursionError:  # a crafted file nested past the parser's depth
        raise _fail(folder, "metadata.json is nested too deep") from None
    top = _object(meta)
    listed = top.get("dimensions")
    dims = [d for d in cast("list[object]", listed) if isinstance(d, int)] if isinstance(listed, list) else []
    if not isinstance(listed, list) or len(dims) != len(cast("list[object]", listed)) or not all(not isinstance(d, bool) and d > 0 for d in dims):
        raise _fail(folder, "metadata.json has no list of positive int dimensions")
    if len(set(dims)) != len(dims):
        raise _fail(folder, "metadata.json lists a dimension twice")
    info = _object(top.get("dimension_info"))
    extras = {d: _object(info.get(str(d))).get("metadata") for d in dims}
    return dims, {d: extra for d, extra in extras.items() if extra}


def _object(value: object) -> dict[str, object]:
    """A JSON object as a typed mapping; anything else reads as an empty one (the seed's ``.get`` rule)."""
    return cast("dict[str, object]", value) if isinstance(value, dict) else {}


def _open_npy(folder: Path, d: int) -> npt.NDArray[Any]:
    path = folder / f"embeddings_{d}d.npy"
    try:
        array: npt.NDArray[Any] = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise _fail(folder, f"{path.name}: {exc}") from None
    if array.ndim != 2 or array.shape[1] != d or array.shape[0] == 0:
        raise _fail(folder, f"{path.name} has shape {array.shape}, expected (rows, {d})")
    if array.dtype.kind not in "biuf":
        raise _fail(folder, f"{path.name} has dtype {array.dtype}")
    return array


def read_seed_shapes(folder: Path) -> tuple[TableShape, ...]:
    """Table shapes from the ``.npy`` headers alone (memory-mapped, nothing read into memory)."""
    dims, _ = _read_metadata(folder)
    return tuple(TableShape(dimension=d, rows=int(_open_npy(folder, d).shape[0])) for d in dims)


def _read_lines(folder: Path, name: str) -> tuple[str, ...] | None:
    path = folder / name
    if not path.exists():
        return None
    try:
        with path.open(encoding="utf-8", newline=None) as handle:
            return tuple(handle.read().split("\n"))
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(folder, f"{name}: {exc}") from None


def read_seed_store(folder: Path) -> StoreRecord:
    """All tables; the store-wide ids and labels are given to every table (as the seed shared them)."""
    ids = _read_lines(folder, "text_ids.txt")
    labels = _read_lines(folder, "labels.txt")
    dims, extras = _read_metadata(folder)
    for d, extra in extras.items():
        warnings.warn(
            f"{folder}: table {d}d had table-level metadata {reprlib.repr(extra)}, which embedtools does not keep",
            stacklevel=3,
        )
    tables: list[TableRecord] = []
    for d in dims:
        raw = _open_npy(folder, d)
        try:
            vectors = as_float32_matrix(np.asarray(raw), f"embeddings_{d}d.npy")
        except InvalidEmbeddingError as exc:
            raise _fail(folder, str(exc)) from None
        except (OSError, ValueError) as exc:
            raise _fail(folder, f"embeddings_{d}d.npy: {exc}") from None
        n = vectors.shape[0]
        for name, values in (("text_ids.txt", ids), ("labels.txt", labels)):
            if values is not None and len(values) != n:
                raise _fail(folder, f"{name} has {len(values)} lines for the {n} rows of table {d}d")
        tables.append(
            TableRecord(
                vectors=vectors,
                ids=ids if ids is not None else tuple(str(i) for i in range(n)),
                labels=labels if labels is not None else ("",) * n,
                metadata=("{}",) * n,
            )
        )
    return StoreRecord(tables=tuple(tables), config={})
