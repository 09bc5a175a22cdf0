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
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedtools.errors import InvalidArgumentError, StoreFormatError, StoreNotFoundError
from embedtools.quantize import QUANTIZATIONS, Quantization, QuantizedIndex
from embedtools.records import StoreRecord, TableRecord, TableShape
from embedtools.validation import INT64_MAX, INT64_MIN, Labels, as_labels, label_kind

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "atomic_write", "read_header", "read_store", "read_table_shapes", "write_store"]

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


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Run ``write`` on a temp file beside ``path``, fsync it, then ``os.replace`` it into place.

    A crash at any moment leaves the old file or the new one, never a mix; on an exception the temp
    file is removed and ``path`` is untouched. The new file's mode follows the umask, as ``open`` would.
    """
    target = Path(path)
    if target.is_dir():
        raise InvalidArgumentError(f"{target} is a directory; save writes one file")
    folder = target.parent
    if not folder.is_dir():
        raise StoreNotFoundError(f"folder {folder} does not exist")
    tmp = folder / f".{target.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        mode = os.fstat(fd).st_mode & 0o777  # 0o666 less the umask, read without touching the umask
        os.close(fd)
        write(tmp)
        os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _encode_strings(values: Iterable[str]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    encoded = [v.encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return data, offsets


def _digest(array: npt.NDArray[Any]) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).view(np.uint8).reshape(-1).data).hexdigest()


def write_store(path: str | os.PathLike[str], record: StoreRecord, config_hash: str) -> None:
    """Write ``record`` to ``path`` atomically (see :func:`atomic_write`)."""
    from safetensors.numpy import save_file

    tensors: dict[str, npt.NDArray[Any]] = {}
    tables = []
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
            tensors[f"{d}d/quantized.{index.kind}.codes"] = np.ascontiguousarray(index.codes)
            if index.scale is not None and index.offset is not None:
                tensors[f"{d}d/quantized.{index.kind}.scale"] = index.scale
                tensors[f"{d}d/quantized.{index.kind}.offset"] = index.offset
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
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    metadata = {_HEADER_KEY: text, _HEADER_DIGEST_KEY: digest}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


# ----------------------------------------------------------------------------------------- reading


def _fail(path: Path, reason: str) -> StoreFormatError:
    return StoreFormatError(f"{path} is not a valid embedtools file: {reason}")


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise StoreNotFoundError(f"no store at {path}")


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The verified JSON header of an embedtools file (tensors are not read)."""
    from safetensors import safe_open

    p = Path(path)
    _check_exists(p)
    try:
        with safe_open(str(p), framework="np") as handle:
            meta: Mapping[str, str] | None = handle.metadata()
            shapes = {name: (handle.get_slice(name).get_dtype(), handle.get_slice(name).get_shape()) for name in handle.keys()}
    except StoreFormatError:
        raise
    except Exception as exc:  # safetensors raises its own error types, OSError and ValueError
        raise _fail(p, f"unreadable safetensors data ({type(exc).__name__}: {exc})") from None
    if not meta or _HEADER_KEY not in meta or _HEADER_DIGEST_KEY not in meta:
        raise _fail(p, "no embedtools header")
    text = meta[_HEADER_KEY]
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != meta[_HEADER_DIGEST_KEY]:
        raise _fail(p, "header checksum mismatch")
    try:
        header = json.loads(text)
    except ValueError as exc:
        raise _fail(p, f"header is not JSON ({exc})") from None
    _check_header(p, header, shapes)
    return dict(header)


def _check_header(path: Path, header: Any, shapes: Mapping[str, tuple[str, list[int]]]) -> None:
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise _fail(path, "not an embedtools header")
    version = header.get("version")
    if version != FORMAT_VERSION:
        raise _fail(path, f"format version {version!r}; this embedtools reads version {FORMAT_VERSION}")
    tables = header.get("tables")
    digests = header.get("tensors")
    if not isinstance(tables, list) or not isinstance(digests, dict) or not isinstance(header.get("config"), dict):
        raise _fail(path, "header lacks tables, tensors or config")
    expected: dict[str, tuple[str, list[int] | None]] = {}
    seen: set[int] = set()
    for entry in tables:
        d, n = (entry.get("dimension"), entry.get("rows")) if isinstance(entry, dict) else (None, None)
        if not isinstance(d, int) or not isinstance(n, int) or d < 1 or n < 1 or d in seen:
            raise _fail(path, f"bad table entry {entry!r}")
        seen.add(d)
        expected[f"{d}d/vectors"] = ("F32", [n, d])
        for name in _STRING_FIELDS:
            expected[f"{d}d/{name}.utf8"] = ("U8", None)
            expected[f"{d}d/{name}.offsets"] = ("I64", [n + 1])
        if entry.get(_LABEL_TYPE, _INT_LABELS) != _INT_LABELS:
            raise _fail(path, f"bad {_LABEL_TYPE} {entry.get(_LABEL_TYPE)!r}")
        components = entry.get("rotation", 0)
        if not isinstance(components, int) or isinstance(components, bool) or not 0 <= components <= d:
            raise _fail(path, f"bad rotation {components!r}")
        if components:
            expected[f"{d}d/rotation.matrix"] = ("F32", [d, d])
        kinds = entry.get("quantized", [])
        if not isinstance(kinds, list) or len(set(map(str, kinds))) != len(kinds) or not set(kinds) <= set(QUANTIZATIONS):
            raise _fail(path, f"bad quantized list {kinds!r}")
        for kind in kinds:
            prefix = f"{d}d/quantized.{kind}"
            if kind == "float16":
                expected[f"{prefix}.codes"] = ("F16", [n, d])
            elif kind == "bfloat16":
                expected[f"{prefix}.codes"] = ("U16", [n, d])
            elif kind == "binary":
                expected[f"{prefix}.codes"] = ("U8", [n, (d + 7) // 8])
            else:
                expected[f"{prefix}.codes"] = ("I8", [n, d])
                expected[f"{prefix}.scale"] = ("F32", [d])
                expected[f"{prefix}.offset"] = ("F32", [d])
    if set(shapes) != set(expected) or set(digests) != set(expected):
        raise _fail(path, "tensor names do not match the header")
    for name, (dtype, shape) in expected.items():
        got_dtype, got_shape = shapes[name]
        fits = list(got_shape) == shape if shape is not None else len(got_shape) == 1
        if got_dtype != dtype or not fits:
            raise _fail(path, f"tensor {name} is {got_dtype}{list(got_shape)}, expected {dtype}{shape or '[m]'}")


def _map_tensors(path: Path, names: set[str]) -> dict[str, npt.NDArray[Any]]:
    """Read-only ``numpy.memmap`` views of float32 tensors, at the offsets safetensors' header gives."""
    if not names:
        return {}
    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        entries = json.loads(handle.read(size))
    out: dict[str, npt.NDArray[Any]] = {}
    for name in names:
        start, end = entries[name]["data_offsets"]
        shape = tuple(entries[name]["shape"])
        if end - start != int(np.prod(shape)) * 4:
            raise _fail(path, f"tensor {name} has {end - start} bytes for shape {shape}")
        out[name] = np.memmap(path, dtype="<f4", mode="r", offset=8 + size + start, shape=shape)
    return out


def read_table_shapes(path: str | os.PathLike[str]) -> tuple[TableShape, ...]:
    header = read_header(path)
    return tuple(
        TableShape(t["dimension"], t["rows"], tuple(t.get("quantized", ())), t.get("rotation", 0)) for t in header["tables"]
    )


def _decode_strings(path: Path, name: str, data: npt.NDArray[Any], offsets: npt.NDArray[Any]) -> tuple[str, ...]:
    if offsets[0] != 0 or offsets[-1] != data.shape[0] or np.any(np.diff(offsets) < 0):
        raise _fail(path, f"{name}: offsets do not index the string bytes")
    raw = data.tobytes()
    try:
        return tuple(raw[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True))
    except UnicodeDecodeError:
        raise _fail(path, f"{name}: invalid UTF-8") from None


def read_store(path: str | os.PathLike[str], *, mmap: bool = False) -> tuple[StoreRecord, dict[str, Any]]:
    """Every table of an embedtools file, each tensor checked against its SHA-256; and the header.

    ``mmap=True`` maps the vector tensors read-only from the file instead of reading them into
    memory (their checksums are still verified, by streaming through the mapping once).
    """
    from safetensors import safe_open

    p = Path(path)
    header = read_header(p)
    digests: dict[str, str] = header["tensors"]
    arrays: dict[str, npt.NDArray[Any]] = {}
    mapped = {name for name in digests if name.endswith("/vectors")} if mmap else set()
    try:
        with safe_open(str(p), framework="np") as handle:
            for name in sorted(set(digests) - mapped):
                arrays[name] = handle.get_tensor(name)
        arrays.update(_map_tensors(p, mapped))
    except StoreFormatError:
        raise
    except Exception as exc:
        raise _fail(p, f"unreadable tensor data ({type(exc).__name__}: {exc})") from None
    for name, array in arrays.items():
        if _digest(array) != digests[name]:
            raise _fail(p, f"checksum mismatch in tensor {name}")
    tables = []
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
            if not _is_json_object(text):
                raise _fail(p, f"{d}d/metadata row {i} is not a JSON object")
        quantized = tuple(_read_quantized(p, d, kind, arrays) for kind in entry.get("quantized", ()))
        rotation = arrays.get(f"{d}d/rotation.matrix")
        if rotation is not None and not _is_orthogonal(rotation):
            raise _fail(p, f"{d}d/rotation.matrix is not a rotation")
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


def _labels(path: Path, d: int, texts: tuple[str, ...], ints: bool) -> Labels:
    """A table's labels as saved: str, or int from canonical int64 decimal text (nothing else)."""
    if not ints:
        return texts
    for i, text in enumerate(texts):
        if len(text) > 20 or _DECIMAL.fullmatch(text) is None or not INT64_MIN <= int(text) <= INT64_MAX:
            raise _fail(path, f"{d}d/labels row {i} is not an int64 label ({text[:40]!r})")
    return as_labels([int(text) for text in texts])


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _read_quantized(
    path: Path, d: int, kind: Quantization, arrays: Mapping[str, npt.NDArray[Any]]
) -> QuantizedIndex[npt.NDArray[Any]]:
    prefix = f"{d}d/quantized.{kind}"
    codes = arrays[f"{prefix}.codes"]
    if kind != "int8":
        values = (codes.astype(np.uint32) << np.uint32(16)).view(np.float32) if kind == "bfloat16" else codes
        if kind in ("float16", "bfloat16") and not np.isfinite(values).all():
            raise _fail(path, f"{prefix} holds NaN or infinite values")
        return QuantizedIndex(kind, d, codes.shape[0], codes)
    scale, offset = arrays[f"{prefix}.scale"], arrays[f"{prefix}.offset"]
    if not (np.isfinite(scale).all() and np.isfinite(offset).all() and (scale > 0).all()):
        raise _fail(path, f"{prefix} has a bad calibration (scale must be finite and positive)")
    return QuantizedIndex(kind, d, codes.shape[0], codes, scale=scale, offset=offset)


def _is_orthogonal(matrix: npt.NDArray[Any]) -> bool:
    if not np.isfinite(matrix).all():
        return False
    product = matrix.astype(np.float64).T @ matrix.astype(np.float64)
    return bool(np.allclose(product, np.eye(matrix.shape[0]), atol=1e-3))
