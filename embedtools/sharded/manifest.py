"""The saved form of a sharded store: a folder of one embedtools file per shard and a manifest.

``manifest.json`` names each shard's file with its SHA-256 and rows per table, the global row order
of every table (its runs, :mod:`embedtools.sharded.placement`) and the experiment config with its
hash. The shards' files are written first (each atomically, by its own worker), the manifest last
and atomically: a crash mid-save leaves the old manifest, which names the old files by digest, so a
load never mixes shard files of two saves without noticing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedtools.atomic import as_store_path, atomic_write
from embedtools.errors import StoreFormatError, StoreNotFoundError
from embedtools.sharded.placement import Runs
from embedtools.validation import JSONObject

__all__ = ["MANIFEST", "Manifest", "ShardEntry", "read_manifest", "shard_file", "write_manifest"]

MANIFEST = "manifest.json"
FORMAT = "embedtools-sharded"
VERSION = 1


def shard_file(index: int) -> str:
    return f"shard-{index:05d}.embedtools"


@dataclass(frozen=True)
class ShardEntry:
    """One shard's file: its SHA-256 (for any tool), its header's (what a load checks, with the
    tensors' own digests, in one pass) and its rows per table."""

    file: str
    sha256: str
    header_sha256: str
    rows: Mapping[int, int]


@dataclass(frozen=True)
class Manifest:
    shards: tuple[ShardEntry, ...]
    tables: Mapping[int, Runs]
    config: JSONObject
    config_hash: str


def write_manifest(folder: str | os.PathLike[str], manifest: Manifest) -> None:
    body = {
        "format": FORMAT,
        "version": VERSION,
        "shards": [{"file": s.file, "sha256": s.sha256, "header_sha256": s.header_sha256, "rows": {str(d): n for d, n in sorted(s.rows.items())}} for s in manifest.shards],
        "tables": {str(d): runs.to_json() for d, runs in sorted(manifest.tables.items())},
        "config": manifest.config,
        "config_hash": manifest.config_hash,
    }
    atomic_write(as_store_path(folder) / MANIFEST, [json.dumps(body, indent=1, sort_keys=True).encode()])


def is_sharded_folder(path: str | os.PathLike[str]) -> bool:
    return (as_store_path(path) / MANIFEST).is_file()


def read_manifest(folder: str | os.PathLike[str]) -> Manifest:
    """The manifest of a saved sharded store, checked for consistency before any shard is read."""
    path = as_store_path(folder) / MANIFEST
    try:
        body: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreNotFoundError(f"no sharded store at {folder} (no {MANIFEST})") from None
    except (OSError, ValueError) as exc:
        raise StoreFormatError(f"{path} is not a sharded store manifest: {exc}") from None
    try:
        if body["format"] != FORMAT or body["version"] != VERSION:
            raise StoreFormatError(f"{path} is not a version {VERSION} {FORMAT} manifest")
        shards = tuple(
            ShardEntry(str(s["file"]), str(s["sha256"]), str(s["header_sha256"]), {int(d): int(n) for d, n in s["rows"].items()}) for s in body["shards"]
        )
        tables = {int(d): _runs(runs) for d, runs in body["tables"].items()}
        config: JSONObject = body["config"]
        config_hash = str(body["config_hash"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StoreFormatError(f"{path} is not a sharded store manifest: {exc!r}") from None
    for entry in shards:
        if Path(entry.file).name != entry.file:
            raise StoreFormatError(f"{path} names a shard file outside its folder: {entry.file!r}")
    for d, runs in tables.items():
        if any(s >= len(shards) or s < 0 for s in runs.shards):
            raise StoreFormatError(f"{path}: table {d}d names a shard it does not list")
        if runs.shard_rows(len(shards)) != tuple(s.rows.get(d, 0) for s in shards):
            raise StoreFormatError(f"{path}: table {d}d's row order does not add up to its shards' rows")
    return Manifest(shards, tables, config, config_hash)


def _runs(pairs: Sequence[Sequence[int]]) -> Runs:
    if any(len(p) != 2 or int(p[1]) <= 0 for p in pairs):
        raise ValueError("runs are [shard, length] pairs with length > 0")
    return Runs(tuple(int(p[0]) for p in pairs), tuple(int(p[1]) for p in pairs))
