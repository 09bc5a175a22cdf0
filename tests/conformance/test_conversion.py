"""Any backend's array to any other: values and dtype kept; zero-copy where the README says so."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import embedtools as et
from tests.conformance.backends import IDS, PAIRS


@pytest.mark.parametrize("source", PAIRS, ids=IDS)
@pytest.mark.parametrize("target", PAIRS, ids=IDS)
def test_every_pair_converts_values_and_dtype(source: tuple[str, str], target: tuple[str, str]) -> None:
    src = et.make_backend(*source)
    dst = et.make_backend(*target)
    host = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    for dtype in ("float32", "int64", "float16"):
        array = src.from_numpy(host * 5, dtype=dtype)
        converted = dst.convert(array)
        assert dst.dtype(converted) == dtype
        np.testing.assert_array_equal(dst.to_numpy(converted), src.to_numpy(array))


def shares(a: Any, b: Any) -> bool:
    return bool(np.shares_memory(np.from_dlpack(a), np.from_dlpack(b)))


def test_cpu_conversions_that_are_zero_copy() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("mlx.core")
    numpy_b, torch_b, mlx_b = (et.make_backend(n, "cpu") for n in ("numpy", "torch", "mlx"))
    host = np.arange(8, dtype=np.float32)
    tensor = torch_b.convert(host)
    assert shares(tensor, host), "numpy -> torch (cpu) shares memory"
    assert np.shares_memory(numpy_b.convert(tensor), host), "torch (cpu) -> numpy shares memory"
    mx_array = mlx_b.convert(host)
    assert not np.shares_memory(np.asarray(mx_array), host), "numpy -> mlx copies"
    back = numpy_b.convert(mx_array)
    assert np.shares_memory(back, np.asarray(mx_array)), "mlx -> numpy shares memory"
    t_from_mx = torch_b.convert(mx_array)
    assert np.shares_memory(t_from_mx.numpy(), np.asarray(mx_array)), "mlx -> torch (cpu) shares memory"
