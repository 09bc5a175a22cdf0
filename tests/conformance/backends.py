"""The (backend, device) pairs usable on this machine: every conformance test runs on each.

numpy, torch-cpu and mlx-cpu run in every CI; torch-cuda, torch-mps and mlx-gpu join where present.
"""

from __future__ import annotations

from embedtools.backends import available_backends, devices


def usable_pairs() -> list[tuple[str, str]]:
    pairs = []
    for name in available_backends():
        for device in devices(name):
            pairs.append((name, device))
    return pairs


PAIRS = usable_pairs()
IDS = [f"{name}-{device}" for name, device in PAIRS]
