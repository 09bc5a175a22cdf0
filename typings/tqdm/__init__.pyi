# Stub for tqdm (ships no type information): only what embedtools.progress uses.
from types import TracebackType

class tqdm:
    def __init__(
        self,
        *,
        total: int | None = None,
        desc: str | None = None,
        unit: str = "it",
        delay: float = 0.0,
        leave: bool = True,
        disable: bool | None = False,
    ) -> None: ...
    def update(self, n: float = 1) -> bool | None: ...
    def close(self) -> None: ...
    def __enter__(self) -> tqdm: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...
