"""The fuzzed loader's long run: ``N`` mutated store files, each loaded read and mapped.

    PYTHONPATH=. nice python benchmarks/fuzz_loader.py --inputs 100000 [--seed 0]
    PYTHONPATH=. python benchmarks/fuzz_loader.py --atheris [atheris/libFuzzer flags...]

Prints ``N inputs, ok, format errors, other, hangs, max RSS growth`` (and up to 20 examples of
"other", each a broken contract). The mutations and the pass rule are ``tests/fuzzing.py``'s, the
same the CI run (``tests/test_fuzz_loader.py``) draws with hypothesis; here a seeded
``random.Random`` draws them, so a run is reproducible from ``--seed``. RSS growth is measured from
a baseline taken after the first 1,000 inputs (imports and first allocations excluded), sampled
every 500 inputs. A hang is an input whose two loads took longer than ``--hang-seconds``; one still
running at four times that is cut off by ``SIGALRM`` (counted, and the run goes on).

``--atheris`` drives the same target coverage-guided (atheris 3.0 installs from a wheel on CPython
3.11 x86-64; where ``import atheris`` fails the run says so and exits 2): its bytes choose the seed,
the mutation and every parameter, and a broken contract raises, which atheris reports as a crash.
Never part of CI.
"""

from __future__ import annotations

import argparse
import importlib
import random
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.fuzzing import Snapshot


def _setup(folder: Path) -> tuple[list[bytes], list[Snapshot]]:
    from tests.fuzzing import make_seeds, make_store, snapshot

    seeds = make_seeds(folder)
    expected = []
    for i, data in enumerate(seeds):
        path = folder / f"seed-{i}"
        path.write_bytes(data)
        expected.append(snapshot(make_store().load(path)))
        path.unlink()
    return seeds, expected


class _Stuck(BaseException):
    """Raised by the alarm in an input that runs far past the hang bound (a BaseException, so the
    target's own `except Exception` cannot take it for a finding)."""


def run(inputs: int, seed: int, hang_seconds: float) -> str:
    from tests.fuzzing import Outcome, RandomChooser, Tally, check_input, mutate

    tally = Tally(hang_seconds=hang_seconds)
    rng = random.Random(seed)

    def stuck(signum: int, frame: object) -> None:
        raise _Stuck

    signal.signal(signal.SIGALRM, stuck)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        seeds, expected = _setup(folder)
        for i in range(inputs):
            index, name, data = mutate(seeds, RandomChooser(rng))
            signal.setitimer(signal.ITIMER_REAL, 4 * hang_seconds)  # a true hang is cut off and counted
            try:
                outcome = check_input(data, name, expected[index], folder)
            except _Stuck:
                outcome = Outcome("hang", f"{name}: cut off after {4 * hang_seconds:.0f} s", 4 * hang_seconds)
                for stale in folder.glob("input.safetensors*"):
                    stale.unlink()
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            tally.add(outcome)
            if i + 1 == 1000 or (i + 1 > 1000 and (i + 1) % 500 == 0):
                tally.sample_rss()
            if (i + 1) % 10_000 == 0:
                print(f"... {tally.line()}", file=sys.stderr, flush=True)
    for example in tally.examples:
        print(f"  {example}")
    return tally.line()


class _AtherisChooser:
    def __init__(self, provider: Any) -> None:  # atheris.FuzzedDataProvider, untyped
        self._provider = provider

    def integer(self, lo: int, hi: int) -> int:
        return int(self._provider.ConsumeIntInRange(lo, hi))


def run_atheris(argv: list[str]) -> int:
    try:
        atheris = importlib.import_module("atheris")
    except ImportError as exc:
        print(f"atheris is not importable here ({exc}); `pip install atheris` (CPython, Linux/macOS)", file=sys.stderr)
        return 2
    with atheris.instrument_imports(include=["embedtools"]):
        from tests.fuzzing import check_input, mutate

    tmp = tempfile.TemporaryDirectory()
    folder = Path(tmp.name)
    seeds, expected = _setup(folder)

    def one(data: bytes) -> None:
        provider = atheris.FuzzedDataProvider(data)
        index, name, blob = mutate(seeds, _AtherisChooser(provider))
        outcome = check_input(blob, name, expected[index], folder)
        if outcome.kind not in ("ok", "format"):
            raise AssertionError(outcome.detail)

    atheris.Setup([sys.argv[0], *argv], one)
    atheris.Fuzz()
    return 0  # pragma: no cover - atheris.Fuzz() exits the process


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hang-seconds", type=float, default=5.0)
    parser.add_argument("--atheris", action="store_true", help="coverage-guided, over the same target; the rest goes to atheris")
    args, rest = parser.parse_known_args()
    if args.atheris:
        return run_atheris(rest)
    print(run(args.inputs, args.seed, args.hang_seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
