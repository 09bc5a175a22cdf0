"""Both doors, one rule: what ``add``, ``update`` and the ``config`` setter refuse, load refuses too.

Crafted files are re-signed the way ``save`` signs (:func:`tests.fuzzing.resign`): the header digest
is a checksum, not a signature, so load judges content, never the digest alone. Each refusal must
be a :class:`StoreFormatError` that leaves the store empty and the budget unreserved, read and mapped.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import embedtools as et
from embedtools import InvalidArgumentError, StoreFormatError, UnhashableConfigError
from tests.fuzzing import Layout, Tensor, build_safetensors, digest, header_of, layout_header, make_store, parse_safetensors, resign

ROOT = Path(__file__).resolve().parents[1]


def saved(tmp_path: Path, *, config: dict[str, Any] | None = None, hash_length: int = 16) -> Path:
    store = et.EmbeddingStore(et.make_backend("numpy"), et.ByteBudget(1 << 30), et.Sha256Hasher(hash_length))
    store.add(np.arange(12, dtype=np.float32).reshape(3, 4) + 1, ids=["a", "b", "c"], labels=["x", "y", "z"],
              metadata=[{"k": 1}, {}, {"s": "é"}])
    store.quantize(4, "int8")
    store.config = config if config is not None else {"model": "m"}
    path = tmp_path / "store.safetensors"
    store.save(path)
    return path


def rewrite(path: Path, edit: Callable[[Layout, dict[str, Any]], str | None]) -> None:
    """Apply ``edit`` to the layout and the parsed header; re-sign what it returns (or the header)."""
    layout = parse_safetensors(path.read_bytes())
    header = header_of(layout)
    text = edit(layout, header)
    header["tensors"] = {name: digest(t.data) for name, t in sorted(layout.tensors.items())}
    if text is None:
        text = json.dumps(header, ensure_ascii=False, separators=(",", ":"))
    resign(layout, text)
    path.write_bytes(build_safetensors(layout))


def metadata_rows(*rows: bytes) -> Callable[[Layout, dict[str, Any]], None]:
    def edit(layout: Layout, header: dict[str, Any]) -> None:
        offsets = np.cumsum([0, *map(len, rows)]).astype("<i8")
        layout.tensors["4d/metadata.utf8"] = Tensor("U8", [sum(map(len, rows))], b"".join(rows))
        layout.tensors["4d/metadata.offsets"] = Tensor("I64", [len(rows) + 1], offsets.tobytes())

    return edit


def raw_config(text: str) -> Callable[[Layout, dict[str, Any]], str]:
    """A header whose config is ``text`` verbatim (json.dumps cannot write NaN-free 1e999, a key twice, ...)."""

    def edit(layout: Layout, header: dict[str, Any]) -> str:
        header["tensors"] = {name: digest(t.data) for name, t in sorted(layout.tensors.items())}
        header["config"] = "\x00config\x00"
        return json.dumps(header, separators=(",", ":")).replace(json.dumps("\x00config\x00"), text)

    return edit


def assert_refused(path: Path, match: str) -> None:
    for mmap in (False, True):
        store = make_store()
        with pytest.raises(StoreFormatError, match=match):
            store.load(path, mmap=mmap)
        assert store.dimensions == () and store.memory_info().used_bytes == 0 and store.mapped_from is None


DEEP = "[" * 5000 + "]" * 5000


# ----------------------------------------------------------------------------------------- crafted files


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (raw_config('{"deep":' + DEEP + "}"), "nested deeper"),
        (lambda layout, header: json.dumps({**header, "tables": "\x00"}).replace('"\\u0000"', DEEP), "nested deeper"),
        (lambda layout, header: header["tables"][0].__setitem__("quantized", [["int8"]]), "bad quantized list"),
        (lambda layout, header: header["tables"][0].__setitem__("quantized", [{"k": 1}]), "bad quantized list"),
        (lambda layout, header: header["tables"][0].__setitem__("rotation", True), "bad rotation"),
        (lambda layout, header: header["tables"][0].__setitem__("rows", [3] * 100000), r"bad table entry .{0,200}$"),
        (metadata_rows(b"{}", b"{}", b'{"a":' + DEEP.encode() + b"}"), "table 4d, metadata row 2.*nested deeper"),
    ],
)
def test_crafted_headers_and_rows_are_format_errors(tmp_path: Path, edit: Any, match: str) -> None:
    path = saved(tmp_path)
    rewrite(path, edit)
    assert_refused(path, match)


def test_a_tensor_named_twice_in_the_layout_is_refused(tmp_path: Path) -> None:
    path = saved(tmp_path)
    layout = parse_safetensors(path.read_bytes())
    header = layout_header(layout)
    text = json.dumps(header, separators=(",", ":"))
    twice = json.dumps({"4d/ids.utf8": header["4d/labels.utf8"]}, separators=(",", ":"))[1:-1]
    path.write_bytes(build_safetensors(layout, header_text=text[:-1] + "," + twice + "}"))
    for mmap in (False, True):
        store = make_store()
        with pytest.raises(StoreFormatError):
            store.load(path, mmap=mmap)
        assert store.dimensions == () and store.memory_info().used_bytes == 0


# ----------------------------------------------------------------------------------------- JSON values at load


@pytest.mark.parametrize(
    ("row", "match"),
    [
        (b'{"a":NaN}', "nan is not a finite number"),
        (b'{"a":-Infinity}', "-inf is not a finite number"),
        (b'{"a":1e999}', "inf is not a finite number"),
        (b'{"a":1,"a":2}', "key 'a' appears twice"),
        (b'{"a":{"b":1,"b":1}}', "key 'b' appears twice"),
        (b'{"a":' + b"9" * 400 + b"}", "int64"),
        (b'{"a":' + b"9" * 5000 + b"}", "int64"),
        (b'{"a":9223372036854775808}', r"\['a'\]: integer outside the int64 range"),
        (b'{"a":' + b"[" * 64 + b"]" * 64 + b"}", "nested deeper than 64"),
        (b'{"a":"\\ud800"}', "lone surrogate"),
        (b"[]", "not a JSON object"),
    ],
)
def test_metadata_rows_add_refuses_are_refused_at_load(tmp_path: Path, row: bytes, match: str) -> None:
    path = saved(tmp_path)
    rewrite(path, metadata_rows(b"{}", row, b"{}"))
    assert_refused(path, f"table 4d, metadata row 1.*{match}")


def test_the_limits_themselves_load(tmp_path: Path) -> None:
    """The boundary values are the documented limits, accepted at both doors."""
    rows: list[dict[str, Any]] = [{"a": 2**63 - 1, "b": -(2**63)}, {"a": [[[]]]}, {}]
    deepest: Any = 1
    for _ in range(63):
        deepest = [deepest]
    rows[1] = {"a": deepest}  # 64 containers with the row itself
    store = make_store()
    store.add(np.ones((3, 4), np.float32), metadata=rows)
    store.config = {"seed": 2**63 - 1, "deep": deepest[0]}
    path = tmp_path / "limits"
    store.save(path)
    for mmap in (False, True):
        loaded = make_store().load(path, mmap=mmap)
        assert loaded.table(4).metadata == tuple(rows) and loaded.config == store.config


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ('{"a":NaN}', "nan is not a finite number"),
        ('{"a":1e999}', "finite"),
        ('{"a":1,"a":1}', "appears twice"),
        ('{"a":' + "1" * 400 + "}", "int64"),
        ('{"a":' + "[" * 300 + "]" * 300 + "}", r"\[.config.\]\[.a.\]\[0\].*: nested deeper than"),
    ],
)
def test_configs_the_setter_refuses_are_refused_at_load(tmp_path: Path, config: str, match: str) -> None:
    path = saved(tmp_path)
    rewrite(path, raw_config(config))
    assert_refused(path, match)


def test_a_config_hash_that_is_not_the_configs_is_refused(tmp_path: Path) -> None:
    path = saved(tmp_path)
    rewrite(path, lambda layout, header: header.__setitem__("config", {"model": "other"}))
    assert_refused(path, "config_hash .* is not the hash of the file's config")
    rewrite(path, lambda layout, header: header.__setitem__("config_hash", 16))
    assert_refused(path, "bad config_hash")


def test_a_file_saved_with_another_hash_length_loads(tmp_path: Path) -> None:
    """The stated hash is checked at its own length: stores with other ``hash_length`` read the file."""
    path = saved(tmp_path, config={"model": "bert", "dim": 768, "batch_size": 32}, hash_length=8)
    store = make_store().load(path)
    assert store.config_hash == "4864205289d401c2"


def test_loaded_json_equals_what_was_added(tmp_path: Path) -> None:
    metadata: list[dict[str, Any]] = [{"f": 0.1, "i": -5, "n": None, "b": False, "l": [1, "x", {"y": 2.5e-300}]}, {"é": "ü"}, {}]
    store = make_store()
    store.add(np.ones((3, 4), np.float32), metadata=metadata)
    store.save(tmp_path / "s")
    assert make_store().load(tmp_path / "s").table(4).metadata == tuple(metadata)


# ----------------------------------------------------------------------------------------- JSON values at add


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


BAD_VALUES: list[tuple[Any, str]] = [
    (float("nan"), "not a finite number"),
    (float("inf"), "not a finite number"),
    (10**400, "int64"),
    (2**63, "int64"),
    (-(2**63) - 1, "int64"),
    (_nested(64), "nested deeper than 64"),
    ({1: "x"}, "JSON keys must be str"),
    ("\ud800", "lone surrogate"),
    ({"\ud800": 1}, "lone surrogate"),
    (np.int64(3), "not JSON"),
]


@pytest.mark.parametrize(("value", "match"), BAD_VALUES)
def test_add_and_update_refuse_what_load_refuses(value: Any, match: str) -> None:
    store = make_store()
    store.add(np.ones((2, 4), np.float32), ids=["p", "q"], metadata=[{"ok": 1}, {}])
    used = store.memory_info().used_bytes
    with pytest.raises(InvalidArgumentError, match=rf"metadata\[1\]\['v'\].*{match}"):
        store.add(np.ones((2, 4), np.float32), metadata=[{}, {"v": value}])
    with pytest.raises(InvalidArgumentError, match=match):
        store.update(["q"], metadata=[{"v": value}], dimension=4)
    assert store.table(4).metadata == ({"ok": 1}, {}) and len(store) == 2 and store.memory_info().used_bytes == used


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (float("nan"), InvalidArgumentError, "finite"),
        (float("-inf"), InvalidArgumentError, "finite"),
        (10**400, InvalidArgumentError, "int64"),
        (10**5000, UnhashableConfigError, "decimal"),
        (BAD_VALUES[5][0], InvalidArgumentError, "nested deeper than 64"),
        ("\ud800", InvalidArgumentError, "lone surrogate"),
    ],
    ids=["nan", "-inf", "10**400", "10**5000", "65-deep", "surrogate"],
)
def test_the_config_setter_refuses_what_load_refuses(value: Any, error: type[Exception], match: str) -> None:
    store = make_store()
    store.config = {"model": "m"}
    with pytest.raises(error, match=match):
        store.config = {"a": value}
    assert store.config == {"model": "m"}


def test_config_hash_of_an_undecimalisable_int_is_typed() -> None:
    with pytest.raises(UnhashableConfigError):
        et.config_hash({"a": 10**5000})


def test_configs_within_the_rule_hash_as_the_seed_did() -> None:
    """int64-range ints (and everything else the rule allows) keep the seed's hash bytes."""
    store = make_store()
    config = {"seed": 2**63 - 1, "neg": -(2**63), "f": 0.5, "l": [1, None, True]}
    store.config = config
    seed = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    assert store.config_hash == seed == et.config_hash(config)


# ----------------------------------------------------------------------------------------- inspect


def inspect(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "embedtools", "inspect", str(path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)


def test_inspect_refuses_what_load_refuses(tmp_path: Path) -> None:
    path = saved(tmp_path)
    rewrite(path, lambda layout, header: layout.tensors.__setitem__("4d/ids.utf8", Tensor("U8", [3], b"aab")))
    with pytest.raises(et.DuplicateIdError):
        make_store().load(path)
    out = inspect(path)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "id 'a' appears at rows 0 and 1" in out.stderr, out
    assert "verified" not in out.stdout


def test_inspect_of_a_crafted_header_is_one_line(tmp_path: Path) -> None:
    path = saved(tmp_path)
    rewrite(path, raw_config('{"deep":' + DEEP + "}"))
    out = inspect(path)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "nested deeper" in out.stderr, out
    (tmp_path / "good").mkdir()
    assert inspect(saved(tmp_path / "good")).returncode == 0


# ----------------------------------------------------------------------------------------- seed folders


def test_a_crafted_seed_folder_is_a_format_error(tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "seed"
    shutil.copytree(ROOT / "tests" / "fixtures" / "seed_store_0_1_2", folder)
    meta = (folder / "metadata.json").read_text(encoding="utf-8")
    (folder / "metadata.json").write_text(meta.replace('"backend": "numpy"', '"backend": ' + DEEP), encoding="utf-8")
    store = make_store()
    with pytest.raises(StoreFormatError, match="nested too deep"):
        store.load(folder)
    assert store.dimensions == () and store.memory_info().used_bytes == 0
    nested = "[" * 900 + "]" * 900
    (folder / "metadata.json").write_text(meta.replace('"sliced_from": 8', '"sliced_from": ' + nested), encoding="utf-8")
    with pytest.warns(UserWarning) as caught:
        make_store().load(folder)
    assert all(len(str(w.message)) < 300 for w in caught)
