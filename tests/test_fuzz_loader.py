"""The fuzzed loader, CI's short run: hypothesis mutates small valid files, loads each read and mapped.

Every input must load as an equal store or be refused with a documented error, leaving the store
empty and the budget unreserved, within a wall-clock and traced-memory bound; the mutations and the
pass rule are :mod:`tests.fuzzing`'s, shared with the long run (``benchmarks/fuzz_loader.py``).
"""

from __future__ import annotations

import random
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzzing import MUTATIONS, Outcome, RandomChooser, Snapshot, check_input, make_seeds, make_store, mutate, snapshot

#: One input that takes longer than this (read and mapped together) counts as a hang.
INPUT_SECONDS = 5.0
#: Python-traced memory one input may take at its peak (the files are a few KB).
INPUT_BYTES = 32 << 20
#: The whole short run stops drawing new inputs after this long, whatever the example count.
RUN_SECONDS = 30.0


class Fuzzed:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.seeds = make_seeds(folder)
        self.expected: list[Snapshot] = []
        for i, data in enumerate(self.seeds):
            path = folder / f"seed-{i}"
            path.write_bytes(data)
            self.expected.append(snapshot(make_store().load(path)))
            path.unlink()


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    tracemalloc.start()
    try:
        yield Fuzzed(tmp_path_factory.mktemp("fuzz"))
    finally:
        tracemalloc.stop()


class DrawChooser:
    """Hypothesis as a :class:`tests.fuzzing.Chooser`: every choice shrinks."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))


def assert_passes(outcome: Outcome) -> None:
    assert outcome.kind in ("ok", "format"), outcome.detail
    assert outcome.seconds < INPUT_SECONDS, f"{outcome.detail}: {outcome.seconds:.1f} s"
    assert outcome.traced_peak < INPUT_BYTES, f"{outcome.detail}: {outcome.traced_peak} bytes traced"


_STARTED: list[float] = []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzzed_files_load_equal_or_fail_typed(fuzzed: Fuzzed, data: st.DataObject) -> None:
    if not _STARTED:
        _STARTED.append(time.monotonic())
    seed, name, blob = mutate(fuzzed.seeds, DrawChooser(data))
    if time.monotonic() - _STARTED[0] > RUN_SECONDS:
        return  # the CI bound, after the same draws (hypothesis checks they repeat); the long run goes on
    assert_passes(check_input(blob, name, fuzzed.expected[seed], fuzzed.folder))


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_each_mutation_kind_from_a_fixed_seed(fuzzed: Fuzzed, name: str) -> None:
    """Every kind of mutation, reproducibly: 40 inputs each from ``random.Random`` (the long run's driver)."""
    rng = random.Random(name)
    seen = set()
    for _ in range(40):
        choose = RandomChooser(rng)
        seed = choose.integer(0, len(fuzzed.seeds) - 1)
        blob = MUTATIONS[name](fuzzed.seeds[seed], choose)
        outcome = check_input(blob, name, fuzzed.expected[seed], fuzzed.folder)
        assert_passes(outcome)
        seen.add(outcome.kind)
    assert "format" in seen  # the mutations do reach the checks
