"""Mutations of small valid store files, and the loader target they are fed to.

One engine for three drivers: ``tests/test_fuzz_loader.py`` (hypothesis, in CI), the long run
``benchmarks/fuzz_loader.py`` (a seeded ``random.Random``) and, where it installs, atheris. Each
driver only supplies a :class:`Chooser`; what a mutation does and what counts as a pass live here,
so the short run and the long run test the same thing.

A crafted file is the threat: the header digest is only a checksum, so :func:`resign` re-signs an
edited header exactly as ``fileformat.write_store`` signs its own, and :func:`build_safetensors`
lays out tensors the way safetensors does (or, on purpose, the way it must refuse).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import struct
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import numpy as np

import embedtools as et
from embedtools import ByteBudget, EmbeddingStore, Sha256Hasher
from embedtools.validation import Labels

__all__ = [
    "DOCUMENTED",
    "MUTATIONS",
    "Chooser",
    "Layout",
    "Outcome",
    "RandomChooser",
    "Snapshot",
    "Tally",
    "Tensor",
    "build_safetensors",
    "check_input",
    "digest",
    "header_of",
    "layout_header",
    "make_seeds",
    "make_store",
    "mutate",
    "parse_safetensors",
    "resign",
    "snapshot",
]

#: What a bad file may raise at load: the errors ``load`` documents for a file it refuses.
DOCUMENTED: tuple[type[et.EmbedtoolsError], ...] = (
    et.StoreFormatError,
    et.DuplicateIdError,
    et.InvalidEmbeddingError,
    et.MemoryLimitError,
)
#: The budget of each store a fuzzed file is loaded into: crafted sizes hit it, never the machine.
BUDGET_BYTES = 64 << 20

T = TypeVar("T")
Kind = Literal["ok", "format", "other", "hang"]


class Chooser(Protocol):
    """The only source of choices a mutation draws from (hypothesis data, a ``Random``, atheris)."""

    def integer(self, lo: int, hi: int) -> int:
        """An int in ``lo..hi`` inclusive."""
        ...


class RandomChooser:
    """:class:`Chooser` over ``random.Random``: the long run's driver, reproducible from its seed."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)


def pick(choose: Chooser, options: Sequence[T]) -> T:
    return options[choose.integer(0, len(options) - 1)]


# ----------------------------------------------------------------------------------------- layout


@dataclass
class Tensor:
    dtype: str
    shape: list[Any]
    data: bytes


@dataclass
class Layout:
    """A safetensors file taken apart: its tensors (in file order) and its ``__metadata__``."""

    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    offsets: dict[str, list[int]] = field(default_factory=dict)


def parse_safetensors(data: bytes) -> Layout:
    """Take a valid safetensors file apart (only ever called on the seeds, which are valid)."""
    size = struct.unpack("<Q", data[:8])[0]
    entries = json.loads(data[8 : 8 + size])
    blob = data[8 + size :]
    metadata = entries.pop("__metadata__", {})
    order = sorted(entries, key=lambda name: entries[name]["data_offsets"][0])
    tensors = {}
    offsets = {}
    for name in order:
        start, end = entries[name]["data_offsets"]
        tensors[name] = Tensor(entries[name]["dtype"], list(entries[name]["shape"]), blob[start:end])
        offsets[name] = [start, end]
    return Layout(tensors, dict(metadata), offsets)


def layout_header(layout: Layout, offsets: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """The safetensors header of ``layout``: tensors back to back, unless ``offsets`` says otherwise."""
    header: dict[str, Any] = {"__metadata__": layout.metadata}
    position = 0
    for name, tensor in layout.tensors.items():
        span = offsets[name] if offsets and name in offsets else [position, position + len(tensor.data)]
        header[name] = {"dtype": tensor.dtype, "shape": tensor.shape, "data_offsets": span}
        position += len(tensor.data)
    return header


def build_safetensors(layout: Layout, *, header_text: str | None = None) -> bytes:
    """The file bytes: 8-byte length, the JSON header space-padded to 8 bytes, then the data."""
    text = header_text if header_text is not None else json.dumps(layout_header(layout), separators=(",", ":"))
    raw = text.encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(t.data for t in layout.tensors.values())


def resign(layout: Layout, text: str) -> None:
    """Make ``text`` the embedtools header of ``layout``, signed as ``fileformat.write_store`` signs."""
    layout.metadata = {"embedtools": text, "embedtools.sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def header_of(layout: Layout) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(layout.metadata["embedtools"])
    return out


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------- seeds


def make_store() -> EmbeddingStore:
    return EmbeddingStore(et.make_backend("numpy"), ByteBudget(BUDGET_BYTES), Sha256Hasher())


def make_seeds(folder: Path) -> list[bytes]:
    """A few small valid files, written by ``save``: the mutations' starting points."""
    rng = np.random.default_rng(0)
    stores = []
    one = make_store()
    one.add(rng.standard_normal((3, 4)).astype(np.float32), ids=["a", "b", "c"], labels=["x", "", "z"],
            metadata=[{"k": 1, "n": {"l": [1.5, None, True, "é"]}}, {}, {"big": 2**62}])
    one.config = {"model": "m", "dim": 4, "nested": {"a": [1, 2]}}
    stores.append(one)
    two = make_store()
    two.add(rng.standard_normal((5, 8)).astype(np.float32))
    two.add(rng.standard_normal((2, 3)).astype(np.float32), ids=["p", "q"])
    for kind in ("int8", "binary", "float16", "bfloat16"):
        two.quantize(8, kind)
    two.fit_rotation(8, components=3)
    stores.append(two)
    stores.append(make_store())  # a store saved empty
    out = []
    for i, store in enumerate(stores):
        path = folder / f"seed-{i}"
        store.save(path)
        out.append(path.read_bytes())
        path.unlink()
    return out


# ----------------------------------------------------------------------------------------- mutations

_ODD_INTS: tuple[object, ...] = (0, -1, 1, 2, 3, 4, 5, 7, 8, 9, 2**31, 2**62, 2**63, 10**30, 10**400, True, False, None, "3", 1.5, [3], {})
_ODD_VALUES: tuple[object, ...] = (*_ODD_INTS, "", "int8", ["int8"], [["int8"]], [{"a": 1}], {"": None})
_RAW_NUMBERS = ("NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" * 400, "1" * 5000, "9223372036854775808", "-9223372036854775809")


_DEEP = "\x00deep\x00"


def _nested_text(depth: int, choose: Chooser) -> str:
    """JSON text nested ``depth`` containers deep (``json.dumps`` itself stops near 1,000)."""
    opens, closes = [], []
    for _ in range(depth):
        if choose.integer(0, 1):
            opens.append("[")
            closes.append("]")
        else:
            opens.append('{"a":')
            closes.append("}")
    return "".join(opens) + "1" + "".join(reversed(closes))


def _deep_text(depth: int) -> str:
    return "[" * depth + "]" * depth


def _flip(data: bytes, choose: Chooser) -> bytes:
    out = bytearray(data)
    for _ in range(choose.integer(1, 4)):
        out[choose.integer(0, len(out) - 1)] ^= 1 << choose.integer(0, 7)
    return bytes(out)


def _truncate(data: bytes, choose: Chooser) -> bytes:
    return data[: choose.integer(0, len(data) - 1)]


def _length_field(data: bytes, choose: Chooser) -> bytes:
    size = struct.unpack("<Q", data[:8])[0]
    new = pick(choose, (0, 1, 7, size - 8, size - 1, size + 1, size + 8, len(data), len(data) - 8, 2**63, 2**64 - 1,
                        choose.integer(0, 2 * len(data))))
    return struct.pack("<Q", max(0, min(new, 2**64 - 1))) + data[8:]


def _splice(data: bytes, choose: Chooser) -> bytes:
    start = choose.integer(0, len(data))
    end = min(len(data), start + choose.integer(0, 16))
    filler = bytes(choose.integer(0, 255) for _ in range(choose.integer(0, 16)))
    return data[:start] + filler + data[end:]


def _edit_header(layout: Layout, choose: Chooser) -> str:
    """An edited embedtools header (as text, to be re-signed): shapes, kinds, nesting, numbers."""
    header = header_of(layout)
    tables: list[dict[str, Any]] = header["tables"]
    what = choose.integer(0, 11)
    deep = ""
    if what == 0 and tables:
        entry = pick(choose, tables)
        entry[pick(choose, ("dimension", "rows", "rotation"))] = pick(choose, _ODD_INTS)
    elif what == 1 and tables:
        pick(choose, tables)["quantized"] = pick(
            choose, ([["int8"]], ["int8", "int8"], [1], "int8", [{}], [None], ["int4"], ["binary"], ["float16", "int8"], [], [True])
        )
    elif what == 2:
        depth = choose.integer(60, 70) if choose.integer(0, 1) else choose.integer(1, 3000)
        header["config"] = {"c": _DEEP}
        deep = _nested_text(depth, choose)
    elif what == 3:
        header[pick(choose, ("tables", "tensors", "version", "library", "format"))] = _DEEP
        deep = _nested_text(choose.integer(1, 3000), choose)
    elif what == 4:
        header["config"][pick(choose, ("a", "model", "x"))] = pick(choose, _ODD_VALUES)
    elif what == 5:
        header["config_hash"] = pick(choose, ("", "0" * 16, header.get("config_hash", "")[:8], 16, None, "z" * 16, "0" * 65))
    elif what == 6:
        del header[pick(choose, ("config", "config_hash", "tables", "tensors", "version", "format", "library"))]
    elif what == 7:
        header[pick(choose, ("version", "format"))] = pick(choose, (*_ODD_INTS, "embedtools"))
    elif what == 8 and header["tensors"]:
        name = pick(choose, sorted(header["tensors"]))
        if choose.integer(0, 1):
            del header["tensors"][name]
        else:
            header["tensors"][name] = pick(choose, ("", "0" * 64, 5, None))
    elif what == 9 and tables:
        entry = pick(choose, tables)
        tables.append(dict(entry))  # the same table twice
    elif what == 10:
        header["tables"] = pick(choose, ([], [[]], [None], "tables", [{"dimension": 4}], [{"rows": 3}]))
    else:
        # a raw edit json.dumps cannot make: a number no reader agrees on, a key twice, deep text
        text = json.dumps(header, ensure_ascii=False, separators=(",", ":"))
        raw = pick(choose, (*_RAW_NUMBERS, _deep_text(choose.integer(1, 5000))))
        form = choose.integer(0, 2)
        if form == 0:
            return text.replace('"config":{', '"config":{"r":' + raw + ",", 1)
        if form == 1:
            return text.replace('"config":{', '"config":{"r":1,"r":2,', 1)
        return text.replace('"version":1', '"version":1,"version":' + raw, 1)
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":"))
    return text.replace(json.dumps(_DEEP), deep) if deep else text


def _resigned_header(data: bytes, choose: Chooser) -> bytes:
    layout = parse_safetensors(data)
    resign(layout, _edit_header(layout, choose))
    return build_safetensors(layout)


def _edit_layout(data: bytes, choose: Chooser) -> bytes:
    """A safetensors header with edited shapes, dtypes or offsets (the embedtools header untouched)."""
    layout = parse_safetensors(data)
    if not layout.tensors:
        return data
    header = layout_header(layout)
    names = list(layout.tensors)
    name = pick(choose, names)
    what = choose.integer(0, 5)
    if what == 0:
        shape = header[name]["shape"]
        header[name]["shape"] = pick(choose, ([], [0], shape[::-1], [*shape, 1], [x + 1 for x in shape], [2**40], [-1]))
    elif what == 1:
        header[name]["dtype"] = pick(choose, ("F32", "F16", "BF16", "F64", "I8", "U8", "I16", "U16", "I32", "I64", "BOOL", "XX"))
    elif what == 2:
        start, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = pick(choose, ([start, end + 1], [start - 1, end], [end, start], [0, end - start], [start, start]))
    elif what == 3 and len(names) > 1:
        other = pick(choose, names)
        header[name]["data_offsets"] = list(header[other]["data_offsets"])  # two tensors over the same bytes
        if choose.integer(0, 1):
            header[name]["shape"] = header[other]["shape"]
            header[name]["dtype"] = header[other]["dtype"]
    elif what == 4:
        text = json.dumps(header, separators=(",", ":"))
        entry = json.dumps({name: header[pick(choose, names)]}, separators=(",", ":"))[1:-1]
        return build_safetensors(layout, header_text=text[:-1] + "," + entry + "}")  # a name twice
    else:
        header[pick(choose, ("extra", names[0] + "x"))] = {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
    return build_safetensors(layout, header_text=json.dumps(header, separators=(",", ":")))


def _strings(rows: Sequence[bytes]) -> tuple[bytes, bytes]:
    offsets = [0]
    for row in rows:
        offsets.append(offsets[-1] + len(row))
    return b"".join(rows), np.array(offsets, dtype="<i8").tobytes()


_CRAFTED_ROWS: tuple[bytes, ...] = (
    b"{}", b"[]", b"1", b"null", b'{"a":NaN}', b'{"a":Infinity}', b'{"a":1e999}', b'{"a":-1e999}', b'{"a":1,"a":2}',
    b'{"a":' + b"1" * 400 + b"}", b'{"a":' + b"9" * 5000 + b"}", b'{"a":9223372036854775808}', b'{"a":' + b"[" * 3000 + b"]" * 3000 + b"}",
    b'{"a":' + b"[" * 64 + b"]" * 64 + b"}", b'{"a":' + b"[" * 63 + b"]" * 63 + b"}", b"\xff\xfe", b'{"a":"\\ud800"}', b"{", b'{"a":1} x',
)


def _edit_tensor(data: bytes, choose: Chooser) -> bytes:
    """New bytes in one table's tensors, every digest and offset re-signed: content load must judge."""
    layout = parse_safetensors(data)
    header = header_of(layout)
    tables: list[dict[str, Any]] = header["tables"]
    if not tables:
        return data
    entry = pick(choose, tables)
    d, n = entry["dimension"], entry["rows"]
    what = choose.integer(0, 6)
    t = layout.tensors
    if what == 0:
        field_name = pick(choose, ("ids", "labels", "metadata"))
        if field_name == "metadata":  # one crafted row among plain ones, so it alone decides
            rows = [b"{}"] * n
            rows[choose.integer(0, n - 1)] = pick(choose, _CRAFTED_ROWS)
        else:
            rows = [pick(choose, (b"a", b"", b"\xff", b"b", b"\xed\xa0\x80")) + str(i).encode() for i in range(n)]
        blob, offsets = _strings(rows)
        t[f"{d}d/{field_name}.utf8"] = Tensor("U8", [len(blob)], blob)
        t[f"{d}d/{field_name}.offsets"] = Tensor("I64", [n + 1], offsets)
    elif what == 1:
        field_name = pick(choose, ("ids", "labels", "metadata"))
        size = len(t[f"{d}d/{field_name}.utf8"].data)
        edited = [choose.integer(-2, size + 2) for _ in range(n + 1)]
        if choose.integer(0, 1):
            edited[0], edited[-1] = 0, size
        t[f"{d}d/{field_name}.offsets"] = Tensor("I64", [n + 1], np.array(edited, dtype="<i8").tobytes())
    elif what == 2:
        vectors = np.frombuffer(t[f"{d}d/vectors"].data, dtype="<f4").copy()
        vectors[choose.integer(0, vectors.size - 1)] = pick(choose, (np.nan, np.inf, -np.inf, 3e38, 1e-45, 0.0, -0.0))
        t[f"{d}d/vectors"] = Tensor("F32", [n, d], vectors.tobytes())
    elif what == 3 and entry.get("quantized"):
        kind = pick(choose, entry["quantized"])
        name = pick(choose, [k for k in t if k.startswith(f"{d}d/quantized.{kind}.")])
        raw = bytearray(t[name].data)
        if raw:
            fill = pick(choose, (b"\x00", b"\xff", b"\x7f", b"\x80"))
            for i in range(0, len(raw), len(fill)):
                if choose.integer(0, 3) == 0:
                    raw[i : i + len(fill)] = fill
            if name.endswith((".scale", ".offset")):
                value = np.frombuffer(bytes(raw), dtype="<f4").copy()
                value[0] = pick(choose, (0.0, -1.0, np.nan, np.inf, 1e-45))
                raw = bytearray(value.tobytes())
        t[name] = Tensor(t[name].dtype, t[name].shape, bytes(raw))
    elif what == 4 and f"{d}d/rotation.matrix" in t:
        matrix = np.frombuffer(t[f"{d}d/rotation.matrix"].data, dtype="<f4").copy()
        matrix[choose.integer(0, matrix.size - 1)] = pick(choose, (0.0, 2.0, np.nan, -1.0))
        t[f"{d}d/rotation.matrix"] = Tensor("F32", [d, d], matrix.tobytes())
    elif what == 5:
        # rows and shapes changed together, so only the strings' count can disagree
        extra = choose.integer(1, 3)
        raw_vectors = t[f"{d}d/vectors"].data
        t[f"{d}d/vectors"] = Tensor("F32", [n + extra, d], raw_vectors + raw_vectors[: 4 * d] * extra)
        entry["rows"] = n + extra
    else:
        ids = [b"a"] * n if n > 1 else [b""]
        blob, offsets = _strings(ids)
        t[f"{d}d/ids.utf8"] = Tensor("U8", [len(blob)], blob)
        t[f"{d}d/ids.offsets"] = Tensor("I64", [n + 1], offsets)
    header["tensors"] = {name: digest(tensor.data) for name, tensor in sorted(t.items())}
    resign(layout, json.dumps(header, ensure_ascii=False, separators=(",", ":")))
    return build_safetensors(layout)


MUTATIONS: dict[str, Callable[[bytes, Chooser], bytes]] = {
    "flip": _flip,
    "truncate": _truncate,
    "length": _length_field,
    "splice": _splice,
    "header": _resigned_header,
    "layout": _edit_layout,
    "tensor": _edit_tensor,
}
#: Mutations that leave the file unsigned: whatever of it loads must be the seed's content.
UNSIGNED = frozenset({"flip", "truncate", "length", "splice"})
#: ... and so must a file whose layout alone was edited: the header's digests pin every tensor.
SAME_CONTENT = UNSIGNED | {"layout"}


def mutate(seeds: Sequence[bytes], choose: Chooser) -> tuple[int, str, bytes]:
    """One input: the seed it came from, the mutation's name, the bytes (sometimes stacked twice)."""
    seed = choose.integer(0, len(seeds) - 1)
    name = pick(choose, sorted(MUTATIONS))
    data = MUTATIONS[name](seeds[seed], choose)
    if choose.integer(0, 3) == 0 and len(data) > 8:
        second = pick(choose, sorted(UNSIGNED))
        data = MUTATIONS[second](data, choose)
        name = name if name not in UNSIGNED else second
    return seed, name, data


# ----------------------------------------------------------------------------------------- target


@dataclass(frozen=True)
class Snapshot:
    """A store's content through the public API, comparable with ``==``."""

    tables: tuple[tuple[int, bytes, tuple[str, ...], Labels, str, tuple[str, ...]], ...]
    config: str
    config_hash: str


def snapshot(store: EmbeddingStore) -> Snapshot:
    tables = []
    for d in store.dimensions:
        table = store.table(d)
        info = store.memory_info().tables[d]
        metadata = json.dumps(table.metadata, sort_keys=True)
        tables.append((d, table.to_numpy().tobytes(), table.ids, table.labels, metadata, tuple(sorted(info.quantized))))
    return Snapshot(tuple(tables), json.dumps(store.config, sort_keys=True), store.config_hash)


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    detail: str = ""
    seconds: float = 0.0
    traced_peak: int = 0


def _load(path: Path, mmap: bool) -> tuple[Snapshot | None, str]:
    """The loaded content, or ``None`` and what refused it; ``other:`` marks a broken contract."""
    store = make_store()
    try:
        store.load(path, mmap=mmap)
    except DOCUMENTED as exc:
        if store.dimensions or store.memory_info().used_bytes or store.mapped_from is not None:
            return None, f"other: {type(exc).__name__} left the store holding something"
        return None, f"{type(exc).__name__}"
    except Exception as exc:  # noqa: BLE001 - every other escape is the finding
        return None, f"other: {type(exc).__name__}: {str(exc)[:200]}"
    try:
        content = snapshot(store)
        stated = et.fileformat.read_header(path)["config_hash"]
        if et.config_hash(store.config, length=len(stated)) != stated:  # the hash at the length saved
            return None, "other: the file's config_hash is not its config's hash"
        _readd(store)
        for d in store.dimensions:
            store.search(store.table(d).to_numpy()[:1], k=1)
        again = path.with_name(path.name + ".resaved")
        store.save(again)
        reloaded = make_store().load(again)
        again.unlink()
        if snapshot(reloaded) != content:
            return None, "other: a loaded store does not survive save and load"
        if store.memory_info().used_bytes != store.memory_info().store_bytes:
            return None, "other: the budget holds more than the store's charges"
    except Exception as exc:  # noqa: BLE001
        return None, f"other: a loaded store fails later: {type(exc).__name__}: {str(exc)[:200]}"
    return content, "ok"


def _readd(store: EmbeddingStore) -> None:
    """What load accepted, given to ``add`` and the ``config`` setter: one rule for both doors."""
    fresh = make_store()
    try:
        for d in store.dimensions:
            table = store.table(d)
            fresh.add(table.to_numpy(), ids=table.ids, labels=table.labels, metadata=table.metadata)
        fresh.config = store.config
    except et.EmbedtoolsError as exc:
        raise AssertionError(f"load accepted what add or the config setter refuses: {exc}") from None
    fresh.clear()


def check_input(data: bytes, name: str, expected: Snapshot, folder: Path) -> Outcome:
    """Load ``data`` read and mapped; classify. A pass is an equal store or a documented error:
    both modes agree, a loaded store can be searched, saved and loaded again unchanged, and an
    unsigned mutation that loads at all loads the seed's own content."""
    path = folder / "input.safetensors"
    path.write_bytes(data)
    tracing = tracemalloc.is_tracing()
    if tracing:
        tracemalloc.reset_peak()
    started = time.perf_counter()
    try:
        read, why_read = _load(path, mmap=False)
        mapped, why_mapped = _load(path, mmap=True)
    finally:
        path.unlink()
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] if tracing else 0
    for why in (why_read, why_mapped):
        if why.startswith("other"):
            return Outcome("other", f"{name}: {why}", seconds, peak)
    if (read is None) != (mapped is None) or read != mapped:
        return Outcome("other", f"{name}: read ({why_read}) and mapped ({why_mapped}) loads disagree", seconds, peak)
    if read is not None and name in SAME_CONTENT and read != expected:
        return Outcome("other", f"{name}: an unsigned mutation loaded different content", seconds, peak)
    return Outcome("ok" if read is not None else "format", why_read, seconds, peak)


def rss_bytes() -> int:
    """Resident set size now (Linux ``/proc``), or the peak where ``/proc`` is missing."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass
class Tally:
    """The long run's counts; ``line()`` is the summary it prints."""

    hang_seconds: float
    inputs: int = 0
    ok: int = 0
    format_errors: int = 0
    other: int = 0
    hangs: int = 0
    baseline_rss: int = 0
    max_rss_growth: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.inputs += 1
        if outcome.seconds > self.hang_seconds:
            self.hangs += 1
            self.examples.append(f"hang ({outcome.seconds:.1f} s): {outcome.detail}")
        if outcome.kind == "ok":
            self.ok += 1
        elif outcome.kind == "format":
            self.format_errors += 1
        elif outcome.kind == "other":
            self.other += 1
            if len(self.examples) < 20:
                self.examples.append(outcome.detail)

    def sample_rss(self) -> None:
        now = rss_bytes()
        if not self.baseline_rss:
            self.baseline_rss = now
        self.max_rss_growth = max(self.max_rss_growth, now - self.baseline_rss)

    def line(self) -> str:
        growth = f"{self.max_rss_growth / 2**20:.1f} MiB"
        return (f"{self.inputs} inputs, {self.ok} ok, {self.format_errors} format errors, {self.other} other, "
                f"{self.hangs} hangs, max RSS growth {growth}")
