"""The embedtools file: one safetensors file, verified on every load, replaced atomically on save.

Layout (format version 1), for each table of dimension ``d``:

* ``{d}d/vectors``: float32 ``(n, d)``;
* ``{d}d/ids.utf8``, ``{d}d/labels.utf8``, ``{d}d/metadata.utf8``: uint8, the rows' UTF-8 strings
  concatenated (metadata rows are JSON objects), each with ``{d}d/<name>.offsets``: int64
  ``(n + 1,)`` byte offsets starting at 0. Strings in tensors keep the header small at millions of rows.
  A table of int labels says ``"label_type": "int64"`` in its header entry and writes each label as
  its canonical decimal text (``-12``) in ``labels.utf8``; without the field labels are str, so
  files of str-label tables are byte for byte what they were, and older versions read int labels
  as their decimal strings.

The safetensors ``__metadata__`` holds two strings: ``embedtools``, a JSON header (format, version,
library, store config and its hash, tables, and the SHA-256 of every tensor's bytes), and
``embedtools.sha256``, the SHA-256 of that header text. A flipped bit anywhere in the file is thus
caught by safetensors' own checks, the header digest or a tensor digest: a :class:`StoreFormatError`.
The header digest is only a checksum (anyone can re-sign an edited header), so reading also holds
every header and metadata row to what ``save`` could have written (README, "Crafted files").

This module is the format itself: the header, its checks, the tables' tensors. How its bytes lie in
a safetensors file is :mod:`embedtools.safetensors_layout`; how the file replaces the old one on disk
is :mod:`embedtools.atomic`. ``as_store_path``, ``temp_prefix`` and ``remove_stale_temp_files`` are
re-exported from there, as ``fileformat.*`` is how README and the store name them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import reprlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import numpy as np

from embedtools.atomic import as_store_path, atomic_write, locate, remove_stale_temp_files, temp_prefix
from embedtools.errors import EmbedtoolsError, InvalidArgumentError, StoreFormatError, invalid_file
from embedtools.hashing import config_hash
from embedtools.quantize import CODECS, Quantization, QuantizedIndex
from embedtools.records import StoreRecord, TableRecord, TableShape, verify_table
from embedtools.safetensors_layout import map_tensors, safetensors_chunks, safetensors_dtype, safetensors_entries, typed
from embedtools.validation import (
    INT64_MAX,
    INT64_MIN,
    MAX_JSON_DEPTH,
    JSONObject,
    Labels,
    as_labels,
    decode_json,
    json_problem,
    label_kind,
)

if TYPE_CHECKING:
    import numpy.typing as npt

    from embedtools.protocols import Hasher

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "as_store_path",
    "read_header",
    "read_store",
    "read_table_shapes",
    "remove_stale_temp_files",
    "temp_prefix",
    "verify",
    "write_store",
]

FORMAT_NAME = "embedtools"
FORMAT_VERSION = 1
_HEADER_KEY = "embedtools"
_HEADER_DIGEST_KEY = "embedtools.sha256"
_STRING_FIELDS = ("ids", "labels", "metadata")
#: The header entry's field for a table of int labels, and its one value (absent: str labels).
_LABEL_TYPE = "label_type"
_INT_LABELS = "int64"
_DECIMAL = re.compile(r"0|-?[1-9][0-9]*")


def _library_version() -> str:
    from embedtools import __version__

    return __version__


# ----------------------------------------------------------------------------------------- writing


def _encode_strings(values: Iterable[str]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    encoded = [v.encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return data, offsets


def _digest(array: npt.NDArray[Any]) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).view(np.uint8).reshape(-1).data).hexdigest()


def write_store(path: str | os.PathLike[str], record: StoreRecord, config_hash: str) -> None:
    """Write ``record`` to ``path`` atomically (see :func:`~embedtools.atomic.atomic_write`), the same bytes every time."""
    target = as_store_path(path)
    tensors: dict[str, npt.NDArray[Any]] = {}
    tables: list[dict[str, Any]] = []
    for table in record.tables:
        d = table.dimension
        tensors[f"{d}d/vectors"] = np.ascontiguousarray(table.vectors, dtype="<f4")
        int_labels = label_kind(table.labels) is int
        for name in _STRING_FIELDS:
            values = tuple(map(str, table.labels)) if name == "labels" and int_labels else getattr(table, name)
            data, offsets = _encode_strings(values)
            tensors[f"{d}d/{name}.utf8"] = data
            tensors[f"{d}d/{name}.offsets"] = offsets.astype("<i8", copy=False)
        for index in table.quantized:
            tensors.update({f"{d}d/quantized.{index.kind}.{name}": array for name, array in index.file_tensors().items()})
        entry: dict[str, Any] = {"dimension": d, "rows": len(table.ids), "dtype": "float32"}
        if int_labels:
            entry[_LABEL_TYPE] = _INT_LABELS
        if table.quantized:
            entry["quantized"] = [index.kind for index in table.quantized]
        if table.rotation is not None:
            tensors[f"{d}d/rotation.matrix"] = np.ascontiguousarray(table.rotation, dtype="<f4")
            entry["rotation"] = table.rotation_components
        tables.append(entry)
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "library": f"embedtools {_library_version()}",
        "config": record.config,
        "config_hash": config_hash,
        "tables": tables,
        "tensors": {name: _digest(array) for name, array in sorted(tensors.items())},
    }
    try:
        text = json.dumps(header, ensure_ascii=False, separators=(",", ":"))
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    except (ValueError, TypeError, RecursionError) as exc:  # a config that slipped past validation
        raise InvalidArgumentError(f"cannot save {target}: the header does not encode as JSON ({type(exc).__name__}: {exc})") from None
    metadata = {_HEADER_KEY: text, _HEADER_DIGEST_KEY: digest}
    atomic_write(target, safetensors_chunks(tensors, metadata))


# ----------------------------------------------------------------------------------------- reading


def _check_exists(path: Path) -> None:
    if locate(path)[1]:
        raise invalid_file(path, "a directory, not a regular file")


def _short(value: object) -> str:
    """A bounded ``repr`` for messages: a crafted header may hold values nested or sized at will."""
    return _REPR.repr(value)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60


def read_header(path: str | os.PathLike[str], *, hasher: Hasher | None = None) -> dict[str, Any]:
    """The verified JSON header of an embedtools file (tensors are not read).

    Besides the digest (only a checksum: anyone can re-sign an edited header), the header must obey
    what ``save`` could have written: the JSON rule of :func:`~embedtools.validation.decode_json`,
    a config that the ``config`` setter would accept, and a ``config_hash`` that is that config's
    hash (by ``hasher``, or the SHA-256 rule of :mod:`embedtools.hashing` at the stated length).
    """
    from safetensors import safe_open

    p = Path(path)
    _check_exists(p)
    try:
        with typed(safe_open(str(p), framework="np")) as handle:
            meta: Mapping[str, str] | None = handle.metadata()
            shapes = {name: (handle.get_slice(name).get_dtype(), handle.get_slice(name).get_shape()) for name in handle.keys()}
    except StoreFormatError:
        raise
    except Exception as exc:  # safetensors raises its own error types, OSError and ValueError
        raise invalid_file(p, f"unreadable safetensors data ({type(exc).__name__}: {exc})") from None
    if not meta or _HEADER_KEY not in meta or _HEADER_DIGEST_KEY not in meta:
        raise invalid_file(p, "no embedtools header")
    text = meta[_HEADER_KEY]
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != meta[_HEADER_DIGEST_KEY]:
        raise invalid_file(p, "header checksum mismatch")
    safetensors_entries(p)  # the layout header, as the mapped path reads it: duplicate names refused
    header, problem = decode_json(text, depth_limit=MAX_JSON_DEPTH + 1)  # the config sits one level down
    if problem is not None:
        raise invalid_file(p, f"header{problem}")
    _check_header(p, header, shapes)
    _check_config(p, header, hasher)
    return dict(header)


def _check_config(path: Path, header: dict[str, Any], hasher: Hasher | None) -> None:
    config = header["config"]
    problem = json_problem(config)
    if problem is not None:
        raise invalid_file(path, f"config{problem}")
    stated = header.get("config_hash")
    if not isinstance(stated, str) or not 1 <= len(stated) <= 64:
        raise invalid_file(path, f"bad config_hash {_short(stated)}")
    if hasher is not None:
        try:
            if hasher.hash_config(config) == stated:
                return
        except EmbedtoolsError:
            pass
    if config_hash(config, length=len(stated)) != stated:
        raise invalid_file(path, f"config_hash {_short(stated)} is not the hash of the file's config")


def _check_header(path: Path, decoded: object, shapes: Mapping[str, tuple[str, list[int]]]) -> None:
    if not isinstance(decoded, dict):
        raise invalid_file(path, "not an embedtools header")
    header = cast("JSONObject", decoded)  # parsed by decode_json: str keys, JSON values
    if header.get("format") != FORMAT_NAME:
        raise invalid_file(path, "not an embedtools header")
    version = header.get("version")
    if version != FORMAT_VERSION:
        raise invalid_file(path, f"format version {version!r}; this embedtools reads version {FORMAT_VERSION}")
    tables = header.get("tables")
    digests = header.get("tensors")
    if not isinstance(tables, list) or not isinstance(digests, dict) or not isinstance(header.get("config"), dict):
        raise invalid_file(path, "header lacks tables, tensors or config")
    expected: dict[str, tuple[str, list[int] | None]] = {}
    seen: set[int] = set()
    for entry in tables:
        if not isinstance(entry, dict):
            raise invalid_file(path, f"bad table entry {_short(entry)}")
        d, n = entry.get("dimension"), entry.get("rows")
        if not _is_int(d) or not _is_int(n) or d < 1 or n < 1 or d in seen:
            raise invalid_file(path, f"bad table entry {_short(entry)}")
        seen.add(d)
        expected[f"{d}d/vectors"] = ("F32", [n, d])
        for name in _STRING_FIELDS:
            expected[f"{d}d/{name}.utf8"] = ("U8", None)
            expected[f"{d}d/{name}.offsets"] = ("I64", [n + 1])
        if entry.get(_LABEL_TYPE, _INT_LABELS) != _INT_LABELS:
            raise invalid_file(path, f"bad {_LABEL_TYPE} {entry.get(_LABEL_TYPE)!r}")
        components = entry.get("rotation", 0)
        if not _is_int(components) or not 0 <= components <= d:
            raise invalid_file(path, f"bad rotation {_short(components)}")
        if components:
            expected[f"{d}d/rotation.matrix"] = ("F32", [d, d])
        kinds = entry.get("quantized", [])
        if (
            not isinstance(kinds, list)
            or not all(isinstance(kind, str) and kind in CODECS for kind in kinds)
            or len(set(kinds)) != len(kinds)
        ):
            raise invalid_file(path, f"bad quantized list {_short(kinds)}")
        for kind in cast("list[Quantization]", kinds):  # each checked above to be a CODECS key
            for name, spec in QuantizedIndex.file_tensors_for(kind, n, d).items():
                expected[f"{d}d/quantized.{kind}.{name}"] = (safetensors_dtype(spec.dtype), list(spec.shape))
    if set(shapes) != set(expected) or set(digests) != set(expected):
        raise invalid_file(path, "tensor names do not match the header")
    for name, (dtype, shape) in expected.items():
        got_dtype, got_shape = shapes[name]
        fits = list(got_shape) == shape if shape is not None else len(got_shape) == 1
        if got_dtype != dtype or not fits:
            raise invalid_file(path, f"tensor {name} is {got_dtype}{list(got_shape)}, expected {dtype}{shape or '[m]'}")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def read_table_shapes(path: str | os.PathLike[str], *, hasher: Hasher | None = None) -> tuple[TableShape, ...]:
    header = read_header(path, hasher=hasher)
    return tuple(
        TableShape(t["dimension"], t["rows"], tuple(t.get("quantized", ())), t.get("rotation", 0)) for t in header["tables"]
    )


def _decode_strings(path: Path, name: str, data: npt.NDArray[Any], offsets: npt.NDArray[Any]) -> tuple[str, ...]:
    if offsets[0] != 0 or offsets[-1] != data.shape[0] or np.any(np.diff(offsets) < 0):
        raise invalid_file(path, f"{name}: offsets do not index the string bytes")
    raw = data.tobytes()
    try:
        return tuple(raw[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True))
    except UnicodeDecodeError:
        raise invalid_file(path, f"{name}: invalid UTF-8") from None


def read_store(
    path: str | os.PathLike[str], *, mmap: bool = False, hasher: Hasher | None = None
) -> tuple[StoreRecord, dict[str, Any]]:
    """Every table of an embedtools file, each tensor checked against its SHA-256; and the header.

    ``mmap=True`` maps the vector tensors read-only from the file instead of reading them into
    memory (their checksums are still verified, by streaming through the mapping once).
    """
    from safetensors import safe_open

    p = Path(path)
    header = read_header(p, hasher=hasher)
    digests: dict[str, str] = header["tensors"]
    arrays: dict[str, npt.NDArray[Any]] = {}
    mapped: set[str] = {name for name in digests if name.endswith("/vectors")} if mmap else set()
    try:
        with typed(safe_open(str(p), framework="np")) as handle:
            for name in sorted(set(digests) - mapped):
                arrays[name] = handle.get_tensor(name)
        arrays.update(map_tensors(p, mapped))
    except StoreFormatError:
        raise
    except Exception as exc:
        raise invalid_file(p, f"unreadable tensor data ({type(exc).__name__}: {exc})") from None
    for name, array in arrays.items():
        if _digest(array) != digests[name]:
            raise invalid_file(p, f"checksum mismatch in tensor {name}")
    tables: list[TableRecord] = []
    for entry in header["tables"]:
        d = entry["dimension"]
        strings = {
            field: _decode_strings(p, f"{d}d/{field}", arrays[f"{d}d/{field}.utf8"], arrays[f"{d}d/{field}.offsets"])
            for field in _STRING_FIELDS
        }
        vectors = arrays[f"{d}d/vectors"]
        if not isinstance(vectors, np.memmap):
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        for i, text in enumerate(strings["metadata"]):
            row, problem = decode_json(text)
            if problem is not None or not isinstance(row, dict):
                raise invalid_file(p, f"table {d}d, metadata row {i}{problem or ' is not a JSON object'}")
        quantized = tuple(_read_quantized(p, d, kind, arrays) for kind in entry.get("quantized", ()))
        rotation = arrays.get(f"{d}d/rotation.matrix")
        if rotation is not None and not _is_orthogonal(rotation):
            raise invalid_file(p, f"{d}d/rotation.matrix is not a rotation")
        tables.append(
            TableRecord(
                vectors=vectors,
                ids=strings["ids"],
                labels=_labels(p, d, strings["labels"], entry.get(_LABEL_TYPE) == _INT_LABELS),
                metadata=strings["metadata"],
                quantized=quantized,
                rotation=rotation,
                rotation_components=int(entry.get("rotation", 0)),
            )
        )
    return StoreRecord(tables=tuple(tables), config=dict(header["config"])), header


def verify(path: str | os.PathLike[str], *, hasher: Hasher | None = None) -> tuple[StoreRecord, dict[str, Any]]:
    """:func:`read_store` plus the checks ``load`` applies to each table
    (:func:`~embedtools.records.verify_table`), on the host: what ``embedtools inspect`` runs, so
    that it passes exactly the files ``load`` accepts, without a backend or a budget."""
    record, header = read_store(path, hasher=hasher)
    for table in record.tables:
        verify_table(table)
    return record, header


def _labels(path: Path, d: int, texts: tuple[str, ...], ints: bool) -> Labels:
    """A table's labels as saved: str, or int from canonical int64 decimal text (nothing else)."""
    if not ints:
        return texts
    for i, text in enumerate(texts):
        if len(text) > 20 or _DECIMAL.fullmatch(text) is None or not INT64_MIN <= int(text) <= INT64_MAX:
            raise invalid_file(path, f"{d}d/labels row {i} is not an int64 label ({text[:40]!r})")
    return as_labels([int(text) for text in texts])


def _read_quantized(
    path: Path, d: int, kind: Quantization, arrays: Mapping[str, npt.NDArray[Any]]
) -> QuantizedIndex[npt.NDArray[Any]]:
    """The index of ``kind`` in table ``d``, after its codec's checks (what ``save`` could have written)."""
    prefix = f"{d}d/quantized.{kind}"
    names = QuantizedIndex.file_tensors_for(kind, 0, d)
    index = QuantizedIndex.from_file(kind, d, {name: arrays[f"{prefix}.{name}"] for name in names})
    if isinstance(index, str):
        raise invalid_file(path, f"{prefix} {index}")
    return index


def _is_orthogonal(matrix: npt.NDArray[Any]) -> bool:
    if not np.isfinite(matrix).all():
        return False
    product = matrix.astype(np.float64).T @ matrix.astype(np.float64)
    return bool(np.allclose(product, np.eye(matrix.shape[0]), atol=1e-3))
