from __future__ import annotations

import enum
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import embedtools as et
from embedtools import InvalidArgumentError, Sha256Hasher, UnhashableConfigError, canonical_json, config_hash, param_hash

# (config, seed hash) pairs from the report on embedding-tools 0.1.2, each verified against the package.
GOLDEN: list[tuple[dict[str, Any], str]] = [
    ({}, "44136fa355b3678a"),
    ({"model": "bert", "dim": 768, "batch_size": 32}, "4864205289d401c2"),
    ({"model": "all-MiniLM-L6-v2", "dimension": 384, "batch_size": 32}, "32bf1798f1389d03"),
    ({"model": "sentence-transformers/all-MiniLM-L6-v2", "dimension": 384, "batch_size": 32}, "a7ed89c306020909"),
    ({"model": "bert", "training": {"lr": 0.001, "batch_size": 32}, "data": {"chunk_size": 512}}, "91f6477a8eeaeb12"),
    ({"a": "é"}, "1bb044a097f285c5"),
    ({"a": float("nan")}, "13ef7bbcda554c8b"),
]


@pytest.mark.parametrize(("config", "expected"), GOLDEN)
def test_seed_golden_hashes(config: dict[str, Any], expected: str) -> None:
    assert config_hash(config) == expected
    assert Sha256Hasher().hash_config(config) == expected


def test_param_hash_is_config_hash_of_kwargs() -> None:
    assert param_hash(model="bert", dim=768, batch_size=32) == "4864205289d401c2"
    assert param_hash(model="all-MiniLM-L6-v2", dimension=384, batch_size=32) == "32bf1798f1389d03"


def test_canonical_json_is_the_seed_text() -> None:
    config = {"model": "bert", "training": {"lr": 0.001, "batch_size": 32}, "data": {"chunk_size": 512}}
    assert canonical_json(config) == json.dumps(config, sort_keys=True)
    assert canonical_json(config) == '{"data": {"chunk_size": 512}, "model": "bert", "training": {"batch_size": 32, "lr": 0.001}}'


def test_length_is_settable_and_checked() -> None:
    full = Sha256Hasher(64).hash_config({"x": 1})
    assert len(full) == 64 and full.startswith(config_hash({"x": 1}))
    assert config_hash({"x": 1}, length=8) == full[:8]
    for bad in (0, 65, -1, 1.5, True):
        with pytest.raises(InvalidArgumentError):
            Sha256Hasher(bad)  # type: ignore[arg-type]


class Colour(enum.Enum):
    RED = "red"


class Size(str, enum.Enum):
    BIG = "big"


class Level(enum.IntEnum):
    HIGH = 3


def test_sensitivity_to_values_and_types() -> None:
    assert config_hash({"a": 1}) != config_hash({"a": 1.0}) != config_hash({"a": True})
    assert config_hash({"a": True}) != config_hash({"a": "true"})
    assert config_hash({"a": None}) != config_hash({})
    assert config_hash({"a": 0.0}) != config_hash({"a": -0.0})
    assert config_hash({"a": {"b": 1}}) != config_hash({"a": {"b": 2}})
    assert config_hash({"a": [1, 2]}) != config_hash({"a": [2, 1]})


def test_documented_equivalences() -> None:
    assert config_hash({"a": (1, 2)}) == config_hash({"a": [1, 2]})
    assert config_hash({"a": Size.BIG}) == config_hash({"a": "big"})
    assert config_hash({"a": Level.HIGH}) == config_hash({"a": 3})
    assert config_hash({"a": np.int64(3)}) == config_hash({"a": 3})
    assert config_hash({"a": np.float32(0.5)}) == config_hash({"a": 0.5})
    assert config_hash({"a": np.float64(0.1)}) == config_hash({"a": 0.1})
    assert config_hash({"a": np.bool_(True)}) == config_hash({"a": True})
    assert config_hash({"a": 1e-3}) == config_hash({"a": 0.001})
    assert config_hash({"a": float("inf")}) != config_hash({"a": "Infinity"})
    assert canonical_json({"a": float("-inf"), "b": math.nan}) == '{"a": -Infinity, "b": NaN}'


@pytest.mark.parametrize(
    "config",
    [
        {1: "x"},
        {"a": {1: "x"}},
        {True: 1},
        {None: 1},
        {"a": {1, 2}},
        {"a": frozenset()},
        {"a": b"bytes"},
        {"a": Path("p")},
        {"a": object()},
        {"a": Colour.RED},
        {"a": np.array([1, 2])},
        {"a": 1 + 2j},
        {"a": [object()]},
    ],
)
def test_ambiguous_values_are_refused(config: dict[Any, Any]) -> None:
    with pytest.raises(UnhashableConfigError):
        config_hash(config)
    with pytest.raises(TypeError):  # still the builtin the seed raised
        config_hash(config)


def test_circular_and_too_deep_are_refused() -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with pytest.raises(UnhashableConfigError, match="circular"):
        config_hash(loop)
    items: list[Any] = []
    items.append(items)
    with pytest.raises(UnhashableConfigError, match="circular"):
        config_hash({"a": items})
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(300):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(UnhashableConfigError, match="deeper"):
        config_hash(deep)


def test_shared_but_not_circular_values_are_fine() -> None:
    shared = [1, 2]
    assert config_hash({"a": shared, "b": shared}) == config_hash({"a": [1, 2], "b": [1, 2]})


def test_non_mapping_is_refused() -> None:
    with pytest.raises(UnhashableConfigError):
        config_hash([("a", 1)])  # type: ignore[arg-type]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
configs = st.dictionaries(st.text(max_size=10), json_values, max_size=6)


@given(configs, st.randoms(use_true_random=False))
@settings(max_examples=200, deadline=None)
def test_key_order_does_not_matter(config: dict[str, Any], random: Any) -> None:
    items = list(config.items())
    random.shuffle(items)
    assert config_hash(dict(items)) == config_hash(config)


@given(configs)
@settings(max_examples=200, deadline=None)
def test_matches_the_seed_algorithm_on_plain_json(config: dict[str, Any]) -> None:
    import hashlib

    seed = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    assert config_hash(config) == seed


@given(configs, st.text(max_size=10), json_values)
@settings(max_examples=200, deadline=None)
def test_changing_a_value_changes_the_hash(config: dict[str, Any], key: str, value: Any) -> None:
    changed = dict(config)
    changed[key] = value
    if json.dumps(changed, sort_keys=True) != json.dumps(config, sort_keys=True):
        assert config_hash(changed) != config_hash(config)


def test_deterministic_across_processes() -> None:
    configs_ = [config for config, _ in GOLDEN if not any(isinstance(v, float) and math.isnan(v) for v in config.values())]
    configs_.append({"set-like": [3, 1, 2], "unicode": "ü∑", "nested": {"z": 1, "a": [None, True, 1.5]}})
    code = (
        "import json, sys, embedtools; "
        "print(json.dumps([embedtools.config_hash(c) for c in json.loads(sys.stdin.read())]))"
    )
    hashes = set()
    for seed in ("0", "1", "random"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps(configs_),
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        )
        hashes.add(out.stdout)
    assert len(hashes) == 1
    assert json.loads(hashes.pop()) == [config_hash(c) for c in configs_]


def test_hasher_satisfies_protocol() -> None:
    hasher: et.Hasher = Sha256Hasher(12)
    assert hasher.length == 12 and len(hasher.hash_config({"a": 1})) == 12
