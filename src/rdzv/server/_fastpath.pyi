"""Type stub of the C extension (src/rdzv/server/_fastpath.c); see rdzv.server.fastpath."""

from collections.abc import Callable, Sequence

from rdzv.engine import FastPathTables, Waiter

class Executor:
    @property
    def activity(self) -> int: ...
    epoch: int
    distinct: int
    polling: bool
    on_activity: Callable[[], object] | None
    on_fire: Callable[[Waiter], object] | None
    @property
    def counting(self) -> bool: ...
    def enable_counting(self, bounds_ns: Sequence[int], /) -> None: ...
    def counters(self) -> tuple[dict[int, int], tuple[int, ...], int]: ...
    def __init__(
        self,
        tables: FastPathTables,
        max_key_bytes: int,
        max_value_bytes: int,
        max_keys: int,
    ) -> None: ...
    def run(
        self, buf: bytes, pos: int, extended: bool, reply_limit: int, /
    ) -> tuple[int, bytes | None]: ...

class Receiver:
    enabled: bool
    extended: bool
    validate: bool
    parser: object
    owner: tuple[object, ...] | None
    write: Callable[[bytes], object] | None
    buffered: Callable[[], int] | None
    fd: int
    def __init__(
        self, executor: Executor, slow: Callable[[bytes], object], reply_limit: int
    ) -> None: ...
    def __call__(self, data: bytes, /) -> None: ...
