# Stub for threadpoolctl (ships no type information): only what embedtools' benchmarks call.
from typing import Any

def threadpool_info() -> list[dict[str, Any]]: ...
