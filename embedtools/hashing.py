"""Sha256Hasher: configuration hashes byte-compatible with ``embedding_tools.compute_config_hash``.

The seed hashed ``json.dumps(config, sort_keys=True)`` with the stdlib defaults. Users keep those
hashes in cache file names, so every configuration the seed encoded *unambiguously* is encoded here
to the very same bytes. What the seed did ambiguously or not at all is decided here, once:

* keys must be ``str`` at every level (the seed turned ``{1: x}`` into ``{"1": x}``, colliding with
  the str key, and sorted int keys numerically): other keys raise :class:`UnhashableConfigError`;
* numpy scalars hash as the Python number of the same kind (``np.int64(3)`` as ``3``,
  ``np.float32(0.5)`` as ``0.5``, ``np.bool_`` as ``bool``): the seed already did so for ``np.float64``;
* numpy arrays, sets, bytes, paths, plain enums and arbitrary objects are refused: they have no
  single obvious encoding (``.tolist()``, ``sorted(...)`` or ``str(...)`` them first);
* tuples hash like lists and str/int enums like their values, as in the seed;
* NaN and ±inf keep the seed's encoding (``NaN``, ``Infinity``, ``-Infinity``): deterministic and
  distinct from every string, so they cannot collide;
* circular or absurdly deep structures are refused instead of raising ``RecursionError``, and ints
  too long for Python's int-to-str conversion (``10**5000``) instead of raising ``ValueError``.
"""

from __future__ import annotations

import enum
import hashlib
import json
import numbers
from collections.abc import Mapping, Sequence
from typing import cast

from embedtools.errors import UnhashableConfigError
from embedtools.validation import check_positive_int

__all__ = ["DEFAULT_HASH_LENGTH", "Sha256Hasher", "canonical_json", "config_hash", "param_hash"]

DEFAULT_HASH_LENGTH = 16
_MAX_DEPTH = 200

_Json = None | bool | int | float | str | list["_Json"] | dict[str, "_Json"]


def canonical_json(config: Mapping[str, object]) -> str:
    """The exact text that is hashed: the seed's ``json.dumps(..., sort_keys=True)`` of ``config``."""
    given = cast(object, config)  # untyped callers pass anything
    if not isinstance(given, Mapping):
        raise UnhashableConfigError(f"a configuration must be a mapping with str keys, got {type(config).__name__}")
    plain = _to_json(config, "config", 0, set())
    try:
        return json.dumps(plain, sort_keys=True)
    except ValueError as exc:  # an int past Python's int-to-str digit limit (sys.set_int_max_str_digits)
        raise UnhashableConfigError(f"config has a value with no decimal encoding here: {exc}") from None


def _to_json(value: object, where: str, depth: int, seen: set[int]) -> _Json:
    if depth > _MAX_DEPTH:
        raise UnhashableConfigError(f"{where}: nested deeper than {_MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, enum.Enum) and not isinstance(value, (int, float)):
        raise UnhashableConfigError(f"{where}: enum {value!r} has no canonical encoding; use its .value")
    if isinstance(value, numbers.Integral) and _is_builtin_or_numpy(value):
        return bool(value) if _is_numpy_bool(value) else int(value)
    if isinstance(value, numbers.Real) and _is_builtin_or_numpy(value):
        return float(value)
    if _is_numpy_bool(value):
        return bool(value)
    if isinstance(value, Mapping):
        return _mapping_to_json(cast("Mapping[object, object]", value), where, depth, seen)
    if isinstance(value, (list, tuple)):
        items = cast("Sequence[object]", value)
        if id(items) in seen:
            raise UnhashableConfigError(f"{where}: circular reference")
        seen.add(id(items))
        out = [_to_json(item, f"{where}[{i}]", depth + 1, seen) for i, item in enumerate(items)]
        seen.discard(id(items))
        return out
    raise UnhashableConfigError(
        f"{where}: values of type {type(value).__name__} have no canonical encoding "
        "(allowed: str, int, float, bool, None, lists/tuples and str-keyed mappings of them)"
    )


def _mapping_to_json(value: Mapping[object, object], where: str, depth: int, seen: set[int]) -> _Json:
    if id(value) in seen:
        raise UnhashableConfigError(f"{where}: circular reference")
    seen.add(id(value))
    out: dict[str, _Json] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise UnhashableConfigError(
                f"{where}: key {key!r} is a {type(key).__name__}; keys must be str "
                "(the seed turned it into a string that collides with the str key)"
            )
        out[str.__str__(key)] = _to_json(item, f"{where}[{key!r}]", depth + 1, seen)
    seen.discard(id(value))
    return out


def _is_builtin_or_numpy(value: object) -> bool:
    module = type(value).__module__
    return isinstance(value, (int, float)) or module == "numpy"


def _is_numpy_bool(value: object) -> bool:
    return type(value).__module__ == "numpy" and type(value).__name__ == "bool"


class Sha256Hasher:
    """First ``length`` hex characters of SHA-256 over :func:`canonical_json` (16, as the seed)."""

    def __init__(self, length: int = DEFAULT_HASH_LENGTH) -> None:
        self._length = check_positive_int(length, "hash length", upper=64)

    @property
    def length(self) -> int:
        return self._length

    def __repr__(self) -> str:
        return f"Sha256Hasher(length={self._length})"

    def hash_config(self, config: Mapping[str, object]) -> str:
        text = canonical_json(config)
        return hashlib.sha256(text.encode("ascii")).hexdigest()[: self._length]


def config_hash(config: Mapping[str, object], *, length: int = DEFAULT_HASH_LENGTH) -> str:
    """``embedding_tools.compute_config_hash`` with stricter input rules (module docstring)."""
    return Sha256Hasher(length).hash_config(config)


def param_hash(**params: object) -> str:
    """``embedding_tools.compute_param_hash``: the hash of the keyword arguments as a config."""
    return config_hash(params)
