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
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import reprlib
import secrets
import stat
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard, cast

import numpy as np

from embedtools.errors import EmbedtoolsError, InvalidArgumentError, StoreFormatError, StoreNotFoundError, StoreWriteError
from embedtools.hashing import config_hash
from embedtools.quantize import CODECS, Quantization, QuantizedIndex
from embedtools.records import StoreRecord, TableRecord, TableShape, verify_table
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
    "atomic_write",
    "locate",
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

# A temp file is ``.NAME.XXXXXXXXXXXX.tmp`` (12 hex digits) beside the target, NAME cut to this many
# bytes so that a target name the filesystem accepts (up to 255 bytes) still has a temp name it accepts.
_TEMP_NAME_BYTES = 200
_TEMP_TOKEN_HEX = 12
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def temp_prefix(name: str) -> str:
    """The NAME in ``.NAME.XXXXXXXXXXXX.tmp``: the target's file name, cut to 200 bytes if longer.

    Cut because the temp name is 18 bytes longer than NAME, and a 240-byte target name (which the
    filesystem accepts) would otherwise give a temp name it refuses.
    """
    prefix = name
    while len(os.fsencode(prefix)) > _TEMP_NAME_BYTES:
        prefix = prefix[:-1]
    return prefix


def _is_temp_of(entry: str, prefix: str) -> bool:
    head = f".{prefix}."
    if not (entry.startswith(head) and entry.endswith(".tmp")):
        return False
    token = entry[len(head) : -len(".tmp")]
    return len(token) == _TEMP_TOKEN_HEX and all(c in "0123456789abcdef" for c in token)


def as_store_path(path: object) -> Path:
    """``path`` as a ``Path``, or an :class:`InvalidArgumentError` naming what is wrong with it.

    Checked up front so that ``save(5)`` or a NUL in the name is a typed error before anything is
    written, not a ``TypeError``/``ValueError`` from deep inside ``os``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentError(f"a store path must be a str or os.PathLike, not {type(path).__name__}")
    # isinstance leaves the PathLike type argument unknown; os.fspath itself refuses all but str and bytes
    text = os.fspath(cast("str | os.PathLike[str] | os.PathLike[bytes]", path))
    if not isinstance(text, str):
        raise InvalidArgumentError(f"a store path must be text, not {type(text).__name__}")
    if not text:
        raise InvalidArgumentError("a store path must not be empty")
    if "\0" in text:
        raise InvalidArgumentError(f"a store path must not contain a NUL character: {text!r}")
    return Path(text)


def _write_error(target: Path, exc: OSError) -> StoreWriteError:
    error = StoreWriteError(f"cannot save {target}: {exc.strerror or exc}")
    error.errno = exc.errno
    return error


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symlink"))
    return next((name for test, name in kinds if test(mode)), "special file")


def _replaceable(target: Path) -> Path:
    """The file a save of ``target`` replaces: ``target``, or the regular file a symlink there names.

    Only a regular file (or nothing) may be replaced: ``os.replace`` would swap a FIFO, a device or a
    socket for a regular file. A symlink to a regular file is followed, so the link stays and what it
    points at is replaced (as ``open(path, "w")`` would write through it); any other symlink is refused.
    """
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        if not target.parent.is_dir():
            raise StoreNotFoundError(f"folder {target.parent} does not exist") from None
        return target
    except NotADirectoryError:
        raise StoreNotFoundError(f"{target.parent} is not a folder") from None
    except OSError as exc:
        raise _write_error(target, exc) from None
    if stat.S_ISLNK(info.st_mode):
        resolved = Path(os.path.realpath(target))
        try:
            final = os.stat(resolved)
        except OSError:
            raise InvalidArgumentError(f"{target} is a symlink to {resolved}, which does not exist; save replaces only regular files") from None
        if not stat.S_ISREG(final.st_mode):
            raise InvalidArgumentError(f"{target} is a symlink to a {_kind(final.st_mode)}; save replaces only regular files")
        return resolved
    if not stat.S_ISREG(info.st_mode):
        raise InvalidArgumentError(f"{target} is a {_kind(info.st_mode)}; save writes one regular file")
    return target


def _recheck(target: Path) -> None:
    """Refuse if ``target`` became something other than a regular file while the temp was written."""
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(info.st_mode):
        raise InvalidArgumentError(f"{target} is now a {_kind(info.st_mode)}; save replaces only regular files")


def _lock(fd: int, *, wait: bool) -> None:
    if sys.platform == "win32":  # pragma: no cover
        return
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)


def remove_stale_temp_files(path: str | os.PathLike[str]) -> tuple[Path, ...]:
    """Delete the ``.NAME.XXXXXXXXXXXX.tmp`` files that killed saves of ``path`` left; return them.

    A save holds an exclusive ``flock`` on its temp file from creation until it is renamed into place,
    so only temps that no live process holds are deleted: a save running right now in another process
    is never touched, however slow. Every ``save`` calls this first (freeing the space before writing);
    call it yourself to tidy a folder. Where ``flock`` does not exist (Windows), nothing is deleted.
    """
    target = as_store_path(path)
    if sys.platform == "win32":  # pragma: no cover - no flock: a running save cannot be told apart
        return ()
    prefix = temp_prefix(target.name)
    try:
        names = [entry.name for entry in os.scandir(target.parent) if _is_temp_of(entry.name, prefix)]
    except OSError:
        return ()
    removed: list[Path] = []
    for name in sorted(names):
        tmp = target.parent / name
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_NONBLOCK | _O_NOFOLLOW | _O_CLOEXEC)
        except OSError:
            continue
        try:
            held = os.fstat(fd)
            if not stat.S_ISREG(held.st_mode):
                continue
            _lock(fd, wait=False)  # raises while a save holds it
            now = os.lstat(tmp)
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                os.unlink(tmp)
                removed.append(tmp)
        except OSError:
            continue
        finally:
            os.close(fd)
    return tuple(removed)


def _create_temp(target: Path) -> tuple[int, Path]:
    """A new temp file beside ``target``, open for writing and locked against cleanup."""
    prefix = temp_prefix(target.name)
    for _ in range(100):
        tmp = target.parent / f".{prefix}.{secrets.token_hex(_TEMP_TOKEN_HEX // 2)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            raise _write_error(target, exc) from None
        try:
            try:
                _lock(fd, wait=True)
            except OSError:  # a filesystem without flock: a cleanup's lock fails there too, so it skips this
                pass
            held, now = os.fstat(fd), os.lstat(tmp)
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return fd, tmp
        except FileNotFoundError:
            pass  # another process's cleanup took it between creation and lock: take another name
        except OSError as exc:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise _write_error(target, exc) from None
        os.close(fd)
    raise StoreWriteError(f"cannot save {target}: no free temp file name beside it")


def _write_all(fd: int, chunk: bytes | memoryview) -> None:
    view = memoryview(chunk).cast("B")
    while view:
        view = view[os.write(fd, view[: 1 << 26]) :]


def atomic_write(path: str | os.PathLike[str], chunks: Iterable[bytes | memoryview]) -> None:
    """Write ``chunks`` to a temp file beside ``path``, fsync it, then ``os.replace`` it into place.

    A crash at any moment leaves the old file or the new one, never a mix, and at worst one
    ``.NAME.XXXXXXXXXXXX.tmp`` (see :func:`temp_prefix`), which the next save of ``path`` removes; on
    an exception the temp file is removed and ``path`` is untouched. Only a regular file (or a symlink
    to one, whose target is replaced) is replaced. OS failures are :class:`StoreWriteError`. The new
    file's mode follows the umask, as ``open`` would. ``chunks`` is consumed lazily, so a caller can
    stream large arrays without copying them.
    """
    target = _replaceable(as_store_path(path))
    remove_stale_temp_files(target)
    fd, tmp = _create_temp(target)
    try:
        for chunk in chunks:
            _write_all(fd, chunk)
        os.fsync(fd)
        _recheck(target)
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        os.close(fd)
        if isinstance(exc, OSError) and not isinstance(exc, EmbedtoolsError):
            raise _write_error(target, exc) from None
        raise
    os.close(fd)  # releases the lock only now: the temp name is gone, so no cleanup can race the rename
    _fsync_folder(target.parent)


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


# safetensors' dtype names, and the order it lays tensors out in: by dtype, larger first (its Rust
# enum, descending), then by name. Following it keeps the file identical to what ``save_file`` writes.
_SAFETENSORS_DTYPES = {"u8": "U64", "i8": "I64", "f8": "F64", "f4": "F32", "u4": "U32", "i4": "I32",
                       "f2": "F16", "u2": "U16", "i2": "I16", "i1": "I8", "u1": "U8", "b1": "BOOL"}
_SAFETENSORS_ORDER = {name: rank for rank, name in enumerate(_SAFETENSORS_DTYPES.values())}


def _safetensors_dtype(dtype: np.dtype[Any]) -> str:
    """safetensors' name of a NumPy dtype (a codec's tensors are described by NumPy dtypes)."""
    return _SAFETENSORS_DTYPES[f"{dtype.kind}{dtype.itemsize}"]


def _safetensors_chunks(tensors: Mapping[str, npt.NDArray[Any]], metadata: Mapping[str, str]) -> list[bytes | memoryview]:
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


def write_store(path: str | os.PathLike[str], record: StoreRecord, config_hash: str) -> None:
    """Write ``record`` to ``path`` atomically (see :func:`atomic_write`), the same bytes every time."""
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
    atomic_write(target, _safetensors_chunks(tensors, metadata))


# ----------------------------------------------------------------------------------------- reading


def _fail(path: Path, reason: str) -> StoreFormatError:
    return StoreFormatError(f"{path} is not a valid embedtools file: {reason}")


def locate(path: object) -> tuple[Path, bool]:
    """A store to read: its ``Path`` and whether it is a folder (a seed store), checked before
    anything is read — a FIFO or a device would block a reader or stream forever, and a name the
    filesystem refuses is no store either: typed errors, not ``OSError`` from deep inside ``os``."""
    target = as_store_path(path)
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        raise StoreNotFoundError(f"no store at {target}") from None
    except OSError as exc:  # a name over the filesystem's limit, a folder we may not search
        raise StoreNotFoundError(f"no store at {target}: {exc.strerror or exc}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise _fail(target, f"a {_kind(mode)}, not a regular file")
    return target, stat.S_ISDIR(mode)


def _check_exists(path: Path) -> None:
    if locate(path)[1]:
        raise _fail(path, "a directory, not a regular file")


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
        with _typed(safe_open(str(p), framework="np")) as handle:
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
    _safetensors_entries(p)  # the layout header, as the mapped path reads it: duplicate names refused
    header, problem = decode_json(text, depth_limit=MAX_JSON_DEPTH + 1)  # the config sits one level down
    if problem is not None:
        raise _fail(p, f"header{problem}")
    _check_header(p, header, shapes)
    _check_config(p, header, hasher)
    return dict(header)


def _check_config(path: Path, header: dict[str, Any], hasher: Hasher | None) -> None:
    config = header["config"]
    problem = json_problem(config)
    if problem is not None:
        raise _fail(path, f"config{problem}")
    stated = header.get("config_hash")
    if not isinstance(stated, str) or not 1 <= len(stated) <= 64:
        raise _fail(path, f"bad config_hash {_short(stated)}")
    if hasher is not None:
        try:
            if hasher.hash_config(config) == stated:
                return
        except EmbedtoolsError:
            pass
    if config_hash(config, length=len(stated)) != stated:
        raise _fail(path, f"config_hash {_short(stated)} is not the hash of the file's config")


def _check_header(path: Path, decoded: object, shapes: Mapping[str, tuple[str, list[int]]]) -> None:
    if not isinstance(decoded, dict):
        raise _fail(path, "not an embedtools header")
    header = cast("JSONObject", decoded)  # parsed by decode_json: str keys, JSON values
    if header.get("format") != FORMAT_NAME:
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
        if not isinstance(entry, dict):
            raise _fail(path, f"bad table entry {_short(entry)}")
        d, n = entry.get("dimension"), entry.get("rows")
        if not _is_int(d) or not _is_int(n) or d < 1 or n < 1 or d in seen:
            raise _fail(path, f"bad table entry {_short(entry)}")
        seen.add(d)
        expected[f"{d}d/vectors"] = ("F32", [n, d])
        for name in _STRING_FIELDS:
            expected[f"{d}d/{name}.utf8"] = ("U8", None)
            expected[f"{d}d/{name}.offsets"] = ("I64", [n + 1])
        if entry.get(_LABEL_TYPE, _INT_LABELS) != _INT_LABELS:
            raise _fail(path, f"bad {_LABEL_TYPE} {entry.get(_LABEL_TYPE)!r}")
        components = entry.get("rotation", 0)
        if not _is_int(components) or not 0 <= components <= d:
            raise _fail(path, f"bad rotation {_short(components)}")
        if components:
            expected[f"{d}d/rotation.matrix"] = ("F32", [d, d])
        kinds = entry.get("quantized", [])
        if (
            not isinstance(kinds, list)
            or not all(isinstance(kind, str) and kind in CODECS for kind in kinds)
            or len(set(kinds)) != len(kinds)
        ):
            raise _fail(path, f"bad quantized list {_short(kinds)}")
        for kind in cast("list[Quantization]", kinds):  # each checked above to be a CODECS key
            for name, spec in QuantizedIndex.file_tensors_for(kind, n, d).items():
                expected[f"{d}d/quantized.{kind}.{name}"] = (_safetensors_dtype(spec.dtype), list(spec.shape))
    if set(shapes) != set(expected) or set(digests) != set(expected):
        raise _fail(path, "tensor names do not match the header")
    for name, (dtype, shape) in expected.items():
        got_dtype, got_shape = shapes[name]
        fits = list(got_shape) == shape if shape is not None else len(got_shape) == 1
        if got_dtype != dtype or not fits:
            raise _fail(path, f"tensor {name} is {got_dtype}{list(got_shape)}, expected {dtype}{shape or '[m]'}")


class _SafetensorsSlice(Protocol):
    def get_dtype(self) -> str: ...
    def get_shape(self) -> list[int]: ...


class _SafetensorsFile(Protocol):
    """What this module calls on ``safetensors.safe_open``, whose stub leaves every method unannotated."""

    def __enter__(self) -> _SafetensorsFile: ...
    def __exit__(self, *exc: object) -> None: ...
    def metadata(self) -> dict[str, str] | None: ...
    def keys(self) -> list[str]: ...
    def get_slice(self, name: str) -> _SafetensorsSlice: ...
    def get_tensor(self, name: str) -> npt.NDArray[Any]: ...


def _typed(opened: object) -> _SafetensorsFile:
    """A ``safetensors.safe_open`` object, typed (see :class:`_SafetensorsFile`)."""
    return cast("_SafetensorsFile", opened)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _safetensors_entries(path: Path) -> tuple[int, dict[str, Any]]:
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
        raise _fail(path, f"unreadable safetensors header ({type(exc).__name__})") from None
    if problem is not None or not isinstance(entries, dict):
        raise _fail(path, f"safetensors header{problem or ' is not an object'}")
    return size, cast("dict[str, Any]", entries)  # parsed by decode_json: str keys


def _map_tensors(path: Path, names: set[str]) -> dict[str, npt.NDArray[Any]]:
    """Read-only ``numpy.memmap`` views of float32 tensors, at the offsets safetensors' header gives."""
    if not names:
        return {}
    size, entries = _safetensors_entries(path)
    out: dict[str, npt.NDArray[Any]] = {}
    for name in names:
        start, end = entries[name]["data_offsets"]
        shape = tuple(entries[name]["shape"])
        if end - start != int(np.prod(shape)) * 4:
            raise _fail(path, f"tensor {name} has {end - start} bytes for shape {shape}")
        out[name] = np.memmap(path, dtype="<f4", mode="r", offset=8 + size + start, shape=shape)
    return out


def read_table_shapes(path: str | os.PathLike[str], *, hasher: Hasher | None = None) -> tuple[TableShape, ...]:
    header = read_header(path, hasher=hasher)
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
        with _typed(safe_open(str(p), framework="np")) as handle:
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
                raise _fail(p, f"table {d}d, metadata row {i}{problem or ' is not a JSON object'}")
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
            raise _fail(path, f"{d}d/labels row {i} is not an int64 label ({text[:40]!r})")
    return as_labels([int(text) for text in texts])



def _read_quantized(
    path: Path, d: int, kind: Quantization, arrays: Mapping[str, npt.NDArray[Any]]
) -> QuantizedIndex[npt.NDArray[Any]]:
    """The index of ``kind`` in table ``d``, after its codec's checks (what ``save`` could have written)."""
    prefix = f"{d}d/quantized.{kind}"
    names = QuantizedIndex.file_tensors_for(kind, 0, d)
    index = QuantizedIndex.from_file(kind, d, {name: arrays[f"{prefix}.{name}"] for name in names})
    if isinstance(index, str):
        raise _fail(path, f"{prefix} {index}")
    return index


def _is_orthogonal(matrix: npt.NDArray[Any]) -> bool:
    if not np.isfinite(matrix).all():
        return False
    product = matrix.astype(np.float64).T @ matrix.astype(np.float64)
    return bool(np.allclose(product, np.eye(matrix.shape[0]), atol=1e-3))
