"""Crash safety: SIGKILL ``save`` at random moments; the target is always absent or whole.

A child process builds a store and saves it (once to a fresh path, or in a loop over an existing
file); the parent kills it after a random delay spread over the save's duration. Afterwards the target
is absent (fresh path, killed before the rename), the old complete file or the new complete file
(loaded and compared), and every other file in the folder is one ``.NAME.XXXXXXXXXXXX.tmp``, which the
next save removes. CI runs ``EMBEDTOOLS_CRASH_KILLS`` kills (16 by default) under a wall-clock cap;
``EMBEDTOOLS_CRASH_KILLS=200 pytest -s tests/test_crash_safety.py`` is the long run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

import embedtools as et
from embedtools import ByteBudget, EmbeddingStore, Sha256Hasher, fileformat

ROOT = Path(__file__).resolve().parents[1]
KILLS = int(os.environ.get("EMBEDTOOLS_CRASH_KILLS", "16"))
SIZES = (500, 8_000)  # rows of 512-d: 1 MiB and 16 MiB of vectors
CAP_S = max(25.0, 2.5 * KILLS)

CHILD = """
import sys
from tests.test_crash_safety import build
path, rows, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
store = build(rows, "new")
print("ready", flush=True)
store.save(path)
while mode == "overwrite":
    store.save(path)
print("done", flush=True)
sys.stdin.read()
"""


def build(rows: int, tag: str) -> EmbeddingStore:
    """The same store in the child and in the parent, so the parent can tell old from new."""
    store = EmbeddingStore(et.make_backend("numpy"), ByteBudget(1 << 32), Sha256Hasher())
    vectors = np.random.default_rng(rows).standard_normal((rows, 512)).astype(np.float32)
    store.add(vectors, ids=[f"{tag}{i}" for i in range(rows)], metadata=[{"i": i} for i in range(rows)])
    store.quantize(512, "int8")
    store.config = {"tag": tag, "rows": rows}
    return store


def same(a: EmbeddingStore, b: EmbeddingStore) -> bool:
    return (
        a.config == b.config
        and a.dimensions == b.dimensions
        and all(
            a.table(d).ids == b.table(d).ids and np.array_equal(a.table(d).to_numpy(), b.table(d).to_numpy())
            for d in a.dimensions
        )
    )


def empty() -> EmbeddingStore:
    return EmbeddingStore(et.make_backend("numpy"), ByteBudget(1 << 32), Sha256Hasher())


def test_sigkill_during_save_leaves_old_or_new_and_only_documented_temps(tmp_path: Path) -> None:
    rng = np.random.default_rng(int(os.environ.get("EMBEDTOOLS_CRASH_SEED", "0")))
    new = {rows: build(rows, "new") for rows in SIZES}
    old = build(7, "old")
    durations = {}
    for rows, store in new.items():
        started = time.perf_counter()
        store.save(tmp_path / "timing")
        durations[rows] = time.perf_counter() - started
    (tmp_path / "timing").unlink()
    outcomes: Counter[str] = Counter()
    deadline = time.monotonic() + CAP_S
    kills = 0
    while kills < KILLS and time.monotonic() < deadline:
        mode = ("fresh", "overwrite")[kills % 2]
        rows = SIZES[(kills // 2) % len(SIZES)]
        folder = tmp_path / f"run{kills}"
        folder.mkdir()
        target = folder / "store.safetensors"
        if mode == "overwrite":
            old.save(target)
        delay = float(rng.uniform(0, (1.3 if mode == "fresh" else 3.0) * durations[rows]))
        with subprocess.Popen(
            [sys.executable, "-c", CHILD, str(target), str(rows), mode],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
        ) as child:
            assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
            time.sleep(delay)
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=60)
        kills += 1
        pattern = re.compile(re.escape(f".{fileformat.temp_prefix(target.name)}.") + r"[0-9a-f]{12}\.tmp")
        others = sorted(p.name for p in folder.iterdir() if p != target)
        assert all(pattern.fullmatch(name) for name in others), others
        if not target.exists():
            assert mode == "fresh", "an overwrite lost the old file"
            outcome = "absent"
        else:
            loaded = empty().load(target)
            if same(loaded, new[rows]):
                outcome = "new"
            else:
                assert mode == "overwrite" and same(loaded, old), "the target is neither the old nor the new store"
                outcome = "old"
        outcomes[f"{mode} {outcome}" + (" + temp" if others else "")] += 1
        old.save(target)  # a later save removes what the killed one left
        assert sorted(p.name for p in folder.iterdir()) == [target.name]
    print(f"\n{kills} kills: {dict(sorted(outcomes.items()))}")
    assert kills >= min(KILLS, 8), f"only {kills} kills in {CAP_S:.0f} s"
    assert sum(n for key, n in outcomes.items() if key.endswith("+ temp")) > 0, "no kill landed inside a write"
