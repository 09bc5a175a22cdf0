"""The safetensors byte layout, written and read by embedtools itself rather than by ``safetensors``.

Apart from what the embedtools format puts in the file (:mod:`embedtools.fileformat`): safetensors'
dtype names and the order it lays tensors out in, the writer of a file's bytes
(:func:`safetensors_chunks`, identical to what ``save_file`` writes but deterministic and streamed),
the raw reader of its header (:func:`safetensors_entries`, :func:`map_tensors`), and a typed view of
``safetensors.safe_open`` (:class:`SafetensorsFile`), whose stub leaves every method unannotated.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np

from embedtools.errors import InvalidArgumentError, invalid_file
from embedtools.validation import decode_json

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["SafetensorsFile", "SafetensorsSlice", "map_tensors", "safetensors_chunks", "safetensors_dtype", "safetensors_entries", "typed"]

# safetensors' dtype names, and the order it lays tensors out in: by dtype, larger first (its Rust
# enum, descending), then by name. Following it keeps the file identical to what ``save_file`` writes.
_SAFETENSORS_DTYPES = {"u8": "U64", "i8": "I64", "f8": "F64", "f4": "F32", "u4": "U32", "i4": "I32",
                       "f2": "F16", "u2": "U16", "i2": "I16", "i1": "I8", "u1": "U8", "b1": "BOOL"}
_SAFETENSORS_ORDER = {name: rank for rank, name in enumerate(_SAFETENSORS_DTYPES.values())}


def safetensors_dtype(dtype: np.dtype[Any]) -> str:
    """safetensors' name of a NumPy dtype (a codec's tensors are described by NumPy dtypes)."""
    return _SAFETENSORS_DTYPES[f"{dtype.kind}{dtype.itemsize}"]


def safetensors_chunks(tensors: Mapping[str, npt.NDArray[Any]], metadata: Mapping[str, str]) -> list[bytes | memoryview]:
    """The safetensors file of ``tensors`` as buffers: its header, then each tensor's bytes, uncopied.

    Written here rather than by ``save_file`` so that the only temp file is our own (``save_file``
    writes a ``.tmpXXXXXX`` of its own beside the target, which a SIGKILL leaves behind), that each
    array's own buffer goes straight to ``os.write``, and that the header is deterministic
    (``save_file`` orders ``__metadata__`` by a Rust ``HashMap``, differently from run to run);
    metadata keys are sorted.
    """
    arrays: dict[str, tuple[str, list[int], npt.NDArray[Any]]] = {}
    for name, array in tensors.items():
        key = f"{array.dtype.kind}{array.dtype.itemsize}"
        if key not in _SAFETENSORS_DTYPES:
            raise InvalidArgumentError(f"tensor {name} has dtype {array.dtype}, which safetensors cannot hold")
        flat = np.ascontiguousarray(array).reshape(-1)
        arrays[name] = (_SAFETENSORS_DTYPES[key], list(array.shape), flat.astype(flat.dtype.newbyteorder("<"), copy=False))
    order = sorted(arrays, key=lambda name: (_SAFETENSORS_ORDER[arrays[name][0]], name))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    start = 0
    for name in order:
        dtype, shape, flat = arrays[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [start, start + flat.nbytes]}
        start += flat.nbytes
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    out: list[bytes | memoryview] = [len(text).to_bytes(8, "little"), text]
    out += [arrays[name][2].view(np.uint8).data for name in order if arrays[name][2].nbytes]
    return out


class SafetensorsSlice(Protocol):
    def get_dtype(self) -> str: ...
    def get_shape(self) -> list[int]: ...


class SafetensorsFile(Protocol):
    """What embedtools calls on ``safetensors.safe_open``, whose stub leaves every method unannotated."""

    def __enter__(self) -> SafetensorsFile: ...
    def __exit__(self, *exc: object) -> None: ...
    def metadata(self) -> dict[str, str] | None: ...
    def keys(self) -> list[str]: ...
    def get_slice(self, name: str) -> SafetensorsSlice: ...
    def get_tensor(self, name: str) -> npt.NDArray[Any]: ...


def typed(opened: object) -> SafetensorsFile:
    """A ``safetensors.safe_open`` object, typed (see :class:`SafetensorsFile`)."""
    return cast("SafetensorsFile", opened)


def safetensors_entries(path: Path) -> tuple[int, dict[str, Any]]:
    """The length and entries of the file's safetensors header, as this module reads them itself.

    safetensors has already parsed it; it is parsed again here under the one JSON rule so that a
    name given twice (which safetensors and ``json`` might resolve differently) is refused.
    """
    try:
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            raw = handle.read(size)
        entries, problem = decode_json(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise invalid_file(path, f"unreadable safetensors header ({type(exc).__name__})") from None
    if problem is not None or not isinstance(entries, dict):
        raise invalid_file(path, f"safetensors header{problem or ' is not an object'}")
    return size, cast("dict[str, Any]", entries)  # parsed by decode_json: str keys


def map_tensors(path: Path, names: set[str]) -> dict[str, npt.NDArray[Any]]:
    """Read-only ``numpy.memmap`` views of float32 tensors, at the offsets safetensors' header gives."""
    if not names:
        return {}
    size, entries = safetensors_entries(path)
    out: dict[str, npt.NDArray[Any]] = {}
    for name in names:
        start, end = entries[name]["data_offsets"]
        shape = tuple(entries[name]["shape"])
        if end - start != int(np.prod(shape)) * 4:
            raise invalid_file(path, f"tensor {name} has {end - start} bytes for shape {shape}")
        out[name] = np.memmap(path, dtype="<f4", mode="r", offset=8 + size + start, shape=shape)
    return out
