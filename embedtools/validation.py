"""Checks at the store's edge: caller data becomes validated host NumPy, or a typed error.

Everything a store call accepts passes through here *before* any state changes, so a failing call
has nothing to undo. The functions copy what they keep (the seed aliased caller arrays and lists).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypeGuard, cast

import numpy as np

from embedtools.errors import DimensionError, DuplicateIdError, InvalidArgumentError, InvalidEmbeddingError

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = [
    "as_float32_matrix",
    "as_config",
    "as_queries",
    "INT64_MAX",
    "INT64_MIN",
    "JSONObject",
    "JSONValue",
    "Labels",
    "as_labels",
    "LabelsArg",
    "check_dimension",
    "check_ids",
    "check_labels",
    "check_positive_int",
    "check_prefix",
    "check_strings",
    "check_update",
    "decode_json",
    "encode_metadata",
    "is_integer",
    "json_problem",
    "label_kind",
]

#: A table's labels: all str or all int, never a mixture (one kind per table, fixed by its first add).
Labels = tuple[str, ...] | tuple[int, ...]
#: A JSON value as configs and metadata read back (after :func:`json_problem` accepted it).
JSONValue: TypeAlias = "None | bool | int | float | str | list[JSONValue] | dict[str, JSONValue]"
JSONObject: TypeAlias = "dict[str, JSONValue]"
#: What ``labels=`` takes: str or int labels (numpy integers and integer arrays count).
LabelsArg: TypeAlias = "Sequence[str] | Sequence[int | np.integer[Any]] | npt.NDArray[np.integer[Any]]"
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
#: Containers nested deeper than this are refused in metadata and configs, at ``add`` and at load.
MAX_JSON_DEPTH = 64
#: Integers outside int64 are refused: every JSON reader in the formats' reach (NumPy, serde, Go,
#: Java) reads them exactly, and the seed's hashes of them are kept (README, JSON values).
JSON_INT_MIN, JSON_INT_MAX = INT64_MIN, INT64_MAX
_INT_DIGITS = len(str(JSON_INT_MIN))


def _array_list(data: object) -> Sequence[object] | None:
    """``data`` as a list of arrays to stack, or None where it is not one."""
    if not isinstance(data, (list, tuple)):
        return None
    items = cast("Sequence[object]", data)
    return items if items and all(hasattr(item, "__dlpack__") for item in items) else None


def _foreign_to_host(data: object) -> object:
    """A torch tensor (any device, with or without grad, bfloat16 too) as something NumPy reads;
    MLX arrays and NumPy-likes pass through (NumPy reads them through the buffer protocol). A list
    of arrays (sentence-transformers' ``encode`` without ``convert_to_*``) is stacked row by row."""
    arrays = _array_list(data)
    if arrays is not None:
        return np.stack([np.asarray(_foreign_to_host(item)) for item in arrays])
    detach = getattr(data, "detach", None)
    if isinstance(data, np.ndarray) or not callable(detach):
        return data  # pyright: ignore[reportUnknownVariableType]  (an ndarray of any dtype, returned as object)
    tensor: Any = cast("Callable[[], Any]", detach)().cpu()
    if str(tensor.dtype) == "torch.bfloat16":
        tensor = tensor.float()  # NumPy has no bfloat16; float32 holds every bfloat16 exactly
    return tensor


def _to_host(data: object, what: str) -> npt.NDArray[Any]:
    """One conversion to host NumPy, whatever the caller holds (NumPy, lists, torch, MLX)."""
    if isinstance(data, (str, bytes)):
        raise InvalidEmbeddingError(f"{what} must be numeric, got {type(data).__name__}")
    try:
        array = np.asarray(_foreign_to_host(data))
    except (TypeError, ValueError) as exc:
        raise InvalidEmbeddingError(f"{what} cannot be read as a numeric array: {exc}") from None
    if array.dtype.kind not in "biuf":
        raise InvalidEmbeddingError(f"{what} must be real numbers, got dtype {array.dtype}")
    return array


def _finite_float32(array: npt.NDArray[Any], what: str) -> npt.NDArray[np.float32]:
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.array(array, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(out).all():
        bad = np.argwhere(~np.isfinite(out))[0]
        where = f"row {int(bad[0])}" if out.ndim == 2 else "position " + str(tuple(int(i) for i in bad))
        overflow = np.isfinite(array).all() if array.dtype.kind == "f" else True
        reason = "does not fit float32" if overflow else "is NaN or infinite"
        raise InvalidEmbeddingError(f"{what}: a value at {where} {reason}")
    return out


def as_float32_matrix(data: object, what: str = "vectors") -> npt.NDArray[np.float32]:
    """A fresh C-contiguous float32 ``(n, d)`` copy with ``n, d >= 1`` and finite values."""
    array = _to_host(data, what)
    if array.ndim != 2:
        raise InvalidEmbeddingError(f"{what} must be a 2-D array (rows, dimension), got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidEmbeddingError(f"{what} is empty (shape {array.shape})")
    return _finite_float32(array, what)


def as_queries(data: object) -> npt.NDArray[np.float32]:
    """Queries as float32 ``(q, d)``; one ``(d,)`` query becomes ``(1, d)``; ``q`` may be 0."""
    array = _to_host(data, "queries")
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise InvalidEmbeddingError(f"queries must be (d,) or (q, d), got shape {array.shape}")
    if array.shape[1] == 0:
        raise InvalidEmbeddingError("queries have width 0")
    return _finite_float32(array, "queries")


def is_integer(value: object) -> TypeGuard[int | np.integer[Any]]:
    """An int or a NumPy integer (bools too: callers that refuse them say so); a guard rather than
    a bare isinstance, so type checkers know the NumPy integer's type argument."""
    return isinstance(value, (int, np.integer))


def check_positive_int(value: object, what: str, *, upper: int | None = None) -> int:
    """``value`` as an int in ``1..upper``; bools, floats and strings are refused."""
    if isinstance(value, bool) or not is_integer(value) or value < 1:
        raise InvalidArgumentError(f"{what} must be a positive int, got {value!r}")
    if upper is not None and value > upper:
        raise InvalidArgumentError(f"{what} must be at most {upper}, got {value!r}")
    return int(value)


def check_prefix(dim: int, width: int) -> int:
    """A Matryoshka prefix width ``1..width`` (every backend's ``slice_last_dim`` checks the same)."""
    if not 1 <= dim <= width:
        raise DimensionError(f"prefix dimension must be in 1..{width}, got {dim}")
    return dim


def check_dimension(dimension: object) -> int:
    return check_positive_int(dimension, "dimension")


def check_ids(ids: object, *, unique: bool = False) -> tuple[str, ...]:
    """The ids a remove or update names, a sequence of str (not an array); ``unique``: none twice."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise InvalidArgumentError(f"ids must be a sequence of str, got {type(ids).__name__}")
    given = cast("Sequence[object]", ids)  # isinstance leaves the item type unknown
    keys = check_strings(given, len(given), "ids")
    if unique and len(set(keys)) != len(keys):
        raise DuplicateIdError("an id is given twice in one update")
    return keys


def check_update(vectors: object, dimension: object, n: int) -> tuple[npt.NDArray[np.float32] | None, int]:
    """An update's new vectors (``None``: kept) for ``n`` rows, and the table they go to: the
    vectors' width, or ``dimension`` (which an update without vectors must give)."""
    host = None if vectors is None else as_float32_matrix(vectors)
    if host is None:
        if dimension is None:
            raise InvalidArgumentError("update needs vectors or a dimension to know which table")
        return None, check_dimension(dimension)
    d = host.shape[1] if dimension is None else check_dimension(dimension)
    if host.shape != (n, d):
        raise DimensionError(f"vectors have shape {host.shape}; expected ({n}, {d}) for {n} ids in table {d}d")
    return host, d


def as_config(value: Mapping[str, object]) -> JSONObject:
    """A config as a file carries it: JSON, by the rule load applies to a file's (:func:`json_problem`)."""
    try:
        plain: JSONObject = json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"config is not JSON-serialisable: {exc}") from None
    problem = json_problem(plain)
    if problem is not None:
        raise InvalidArgumentError(f"config{problem}")
    return plain


def check_strings(values: object, n: int, what: str) -> tuple[str, ...]:
    """``n`` str values that can be written as UTF-8 (lone surrogates cannot)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence | np.ndarray):
        raise InvalidArgumentError(f"{what} must be a sequence of str, got {type(values).__name__}")
    items = tuple(cast("Iterable[object]", values))
    if len(items) != n:
        raise InvalidArgumentError(f"{what} has {len(items)} entries for {n} rows")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise InvalidArgumentError(f"{what}[{i}] is a {type(item).__name__}, expected str")
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgumentError(f"{what}[{i}] is not valid Unicode (lone surrogate)") from None
    return tuple(str.__str__(cast(str, s)) for s in items)


def label_kind(labels: Labels) -> type[str] | type[int]:
    """``int`` or ``str``: what a table's labels are (a table always has a row to tell by)."""
    return int if labels and type(labels[0]) is int else str


def as_labels(values: Sequence[str | int]) -> Labels:
    """A tuple of labels the caller knows to be of one kind (slices and merges of one table's)."""
    return cast("Labels", tuple(values))


def _label(item: object, i: int, what: str) -> str | int:
    if isinstance(item, str):
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgumentError(f"{what}[{i}] is not valid Unicode (lone surrogate)") from None
        return str.__str__(item)
    if is_integer(item) and not isinstance(item, (bool, np.bool_)):
        value = int(item)
        if not INT64_MIN <= value <= INT64_MAX:
            raise InvalidArgumentError(f"{what}[{i}] = {value} is outside int64, the range int labels are saved in")
        return value
    raise InvalidArgumentError(
        f"{what}[{i}] is a {type(item).__name__}; labels are str or int (bools and floats are refused)"
    )


def check_labels(values: object, n: int, existing: Labels | None = None, what: str = "labels") -> Labels:
    """``n`` labels, all str or all int (numpy integers count as int, within int64), and of the same
    kind as ``existing``, the table's labels, when the table exists: a table holds one kind so that
    ``Label(3)`` and ``Label("3")`` mean one thing and the file saves one typed column."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence | np.ndarray):
        raise InvalidArgumentError(f"{what} must be a sequence of str or of int, got {type(values).__name__}")
    items: Sequence[object]
    if isinstance(values, np.ndarray):
        array = cast("npt.NDArray[Any]", values)
        items = array.tolist() if array.dtype.kind in "iu" else tuple(array)
    else:
        items = tuple(cast("Sequence[object]", values))
    if len(items) != n:
        raise InvalidArgumentError(f"{what} has {len(items)} entries for {n} rows")
    out = tuple(_label(item, i, what) for i, item in enumerate(items))
    kinds = [type(v) for v in out]
    if out and any(k is not kinds[0] for k in kinds):
        j = next(i for i, k in enumerate(kinds) if k is not kinds[0])
        raise InvalidArgumentError(
            f"{what} mix {kinds[0].__name__} ({what}[0]) and {kinds[j].__name__} ({what}[{j}]); a table's labels are one kind"
        )
    if out and existing is not None and kinds[0] is not label_kind(existing):
        have = label_kind(existing).__name__
        raise InvalidArgumentError(
            f"this table's labels are {have} (fixed by its first add); {kinds[0].__name__} labels are refused"
        )
    return as_labels(out)


def encode_metadata(values: object, n: int) -> tuple[str, ...]:
    """Each row's metadata as compact JSON text: validated once, stored and saved as is."""
    given = type(values).__name__
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
        raise InvalidArgumentError(f"metadata must be a sequence of one mapping per row, got {given}")
    rows = cast("Sequence[object]", values)
    if len(rows) != n:
        raise InvalidArgumentError(f"metadata has {len(rows)} entries for {n} rows")
    out: list[str] = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise InvalidArgumentError(f"metadata[{i}] is a {type(row).__name__}, expected a mapping")
        plain = dict(cast("Mapping[object, object]", row))
        problem = json_problem(plain)
        if problem is not None:
            raise InvalidArgumentError(f"metadata[{i}]{problem}")
        try:
            text = json.dumps(plain, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:  # pragma: no cover - json_problem refuses these first
            raise InvalidArgumentError(f"metadata[{i}] is not JSON-serialisable: {exc}") from None
        out.append(text)
    return tuple(out)


def json_problem(value: object, *, depth_limit: int = MAX_JSON_DEPTH) -> str | None:
    """Why ``value`` is not a JSON value every reader reads back identically, or ``None``.

    The one rule for metadata rows and configs, at ``add``/``update``, the ``config`` setter and
    load (:func:`decode_json`), so a store never holds what it would refuse from a file or could
    not save: str keys, finite floats, ints within int64, str/int/float/bool/None/list/tuple/dict
    values, at most :data:`MAX_JSON_DEPTH` containers deep (which also catches cycles), and text
    that UTF-8 can encode. The answer names the place, as in ``['a'][0]: ...``.
    """
    found = _problem(value, 1, depth_limit)
    if found is None:
        return None
    path, reason = found
    where = "".join(f"[{_short(step)}]" if isinstance(step, str) else f"[{step}]" for step in reversed(path))
    return f"{where}: {reason}"


_Found = tuple[list[object], str]  # the path to the bad value (innermost step first) and why


def _problem(value: object, depth: int, limit: int) -> _Found | None:
    """The walk behind :func:`json_problem`; the path is built only on failure (load calls this for
    every metadata row, so the passing case stays a plain type dispatch)."""
    if value is None or value is True or value is False:
        return None
    if isinstance(value, str):
        return None if value.isascii() or _encodable(value) else ([], "text is not valid Unicode (lone surrogate)")
    if isinstance(value, int):
        return None if JSON_INT_MIN <= value <= JSON_INT_MAX else ([], "integer outside the int64 range [-2**63, 2**63 - 1]")
    if isinstance(value, float):
        return None if math.isfinite(value) else ([], f"{value!r} is not a finite number")
    if isinstance(value, (dict, list, tuple)):
        if depth > limit:
            return [], f"nested deeper than {limit} levels"
        if isinstance(value, dict):
            for key, item in cast("dict[object, object]", value).items():
                if not isinstance(key, str):
                    return [], f"key {_short(key)} is a {type(key).__name__}; JSON keys must be str"
                found = _problem(key, depth, limit) or _problem(item, depth + 1, limit)
                if found is not None:
                    found[0].append(key)
                    return found
        else:
            for i, item in enumerate(cast("Sequence[object]", value)):
                found = _problem(item, depth + 1, limit)
                if found is not None:
                    found[0].append(i)
                    return found
        return None
    return [], f"values of type {type(value).__name__} are not JSON (str, int, float, bool, None, lists, str-keyed dicts)"


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short(value: object) -> str:
    text = repr(value) if isinstance(value, (str, int, float)) else f"<{type(value).__name__}>"
    return text if len(text) <= 40 else text[:37] + "..."


class _Refused(Exception):
    """Raised inside :func:`json.loads` hooks to stop at the first value the rule refuses."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"key {_short(key)} appears twice")
        out[key] = value
    return out


def _integer(text: str) -> int:
    if len(text) > _INT_DIGITS:  # before int(): 10**5000 would otherwise hit Python's digit limit
        raise _Refused("integer outside the int64 range [-2**63, 2**63 - 1]")
    return int(text)


def decode_json(text: str, *, depth_limit: int = MAX_JSON_DEPTH) -> tuple[Any, str | None]:
    """``text`` parsed under :func:`json_problem`'s rule, plus the first problem (then ``None``, reason).

    What a parsed value cannot show is checked while parsing: a key given twice (``json`` keeps
    the last silently). NaN, ``Infinity`` and ``1e999`` parse as floats and ints as ints, so the
    rule refuses them after; an int too long for Python's int-from-str limit is named as the int64
    problem it is. Nesting deep enough to exhaust the parser's recursion is a problem, never a
    ``RecursionError``.
    """
    try:
        value = json.loads(text, object_pairs_hook=_pairs)
    except _Refused as exc:
        return None, f": {exc}"
    except RecursionError:
        return None, f": nested deeper than {depth_limit} levels"
    except ValueError as exc:
        try:  # only a failing text pays for the per-int hook that tells an overlong int apart
            json.loads(text, object_pairs_hook=_pairs, parse_int=_integer)
        except _Refused as refused:
            return None, f": {refused}"
        except (ValueError, RecursionError):
            pass
        return None, f": not JSON ({exc})"
    problem = json_problem(value, depth_limit=depth_limit)
    return (value, None) if problem is None else (None, problem)
