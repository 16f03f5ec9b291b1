"""A blocking Store facade over AsyncTCPStore, so the contract suite runs on the async client.

Each call is submitted to an event loop running in a background thread; every public method
forwards to the coroutine of the same name, so the async client's own argument checks and
semantics are what the suite exercises.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from rdzv.store.async_tcp import AsyncTCPStore
from rdzv.store.base import KeyLike, Store, TimeoutLike, ValueLike

_T = TypeVar("_T")


class LoopThread:
    """An event loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 60.0) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class AsyncBridge(Store):
    def __init__(self, loop: LoopThread, store: AsyncTCPStore) -> None:
        super().__init__(store.timeout)
        self._loop = loop
        self._store = store

    def __repr__(self) -> str:
        return f"AsyncBridge({self._store!r})"

    def _do(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self._loop.run(coro)

    @property
    def timeout(self) -> timedelta:
        return self._store.timeout

    def set_timeout(self, timeout: TimeoutLike) -> None:
        self._store.set_timeout(timeout)

    def clone(self) -> AsyncBridge:
        return AsyncBridge(self._loop, self._do(self._store.clone()))

    def close(self) -> None:
        self._do(self._store.close())

    def has_extended_api(self) -> bool:
        return self._store.has_extended_api()

    def set(self, key: KeyLike, value: ValueLike) -> None:
        self._do(self._store.set(key, value))

    def get(self, key: KeyLike) -> bytes:
        return self._do(self._store.get(key))

    def add(self, key: KeyLike, amount: int) -> int:
        return self._do(self._store.add(key, amount))

    def append(self, key: KeyLike, value: ValueLike) -> None:
        self._do(self._store.append(key, value))

    def compare_set(self, key: KeyLike, expected: ValueLike, desired: ValueLike) -> bytes:
        return self._do(self._store.compare_set(key, expected, desired))

    def check(self, keys: Sequence[KeyLike]) -> bool:
        return self._do(self._store.check(keys))

    def wait(self, keys: Sequence[KeyLike], timeout: TimeoutLike | None = None) -> None:
        self._do(self._store.wait(keys, timeout))

    def delete_key(self, key: KeyLike) -> bool:
        return self._do(self._store.delete_key(key))

    def num_keys(self) -> int:
        return self._do(self._store.num_keys())

    def list_keys(self) -> list[str]:
        return self._do(self._store.list_keys())

    def multi_get(self, keys: Sequence[KeyLike], timeout: TimeoutLike | None = None) -> list[bytes]:
        return self._do(self._store.multi_get(keys, timeout))

    def multi_set(self, keys: Sequence[KeyLike], values: Sequence[ValueLike]) -> None:
        self._do(self._store.multi_set(keys, values))

    def set_lease(self, key: KeyLike, value: ValueLike, ttl: TimeoutLike) -> None:
        self._do(self._store.set_lease(key, value, ttl))

    def queue_push(self, key: KeyLike, value: ValueLike) -> None:
        self._do(self._store.queue_push(key, value))

    def queue_pop(self, key: KeyLike, block: bool = True) -> bytes:
        return self._do(self._store.queue_pop(key, block))

    def queue_len(self, key: KeyLike) -> int:
        return self._do(self._store.queue_len(key))

    def barrier(
        self,
        key: KeyLike,
        world_size: int,
        timeout: TimeoutLike | None = None,
        rank: int | None = None,
    ) -> None:
        self._do(self._store.barrier(key, world_size, timeout, rank))

    # The facade overrides every public method; the core is never reached.
    def _set(self, key: str, value: bytes) -> None:
        raise AssertionError("unreachable")

    def _get(self, key: str, timeout: float) -> bytes:
        raise AssertionError("unreachable")

    def _add(self, key: str, amount: int) -> int:
        raise AssertionError("unreachable")

    def _compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        raise AssertionError("unreachable")

    def _check(self, keys: list[str]) -> bool:
        raise AssertionError("unreachable")

    def _wait(self, keys: list[str], timeout: float) -> None:
        raise AssertionError("unreachable")

    def _delete_key(self, key: str) -> bool:
        raise AssertionError("unreachable")

    def _num_keys(self) -> int:
        raise AssertionError("unreachable")
