"""HashStore: an in-process, thread-safe store; a thin wrapper over :class:`rdzv.engine.Engine`.

Same role as ``torch.distributed.HashStore``: threads of one process share it (``clone()``
returns the same object). One lock serialises engine calls; a blocked thread parks on its own
:class:`threading.Event`, registered with the engine as a waiter and set by the engine's
wake-up, so waking is exact (no polling, no spurious wake-ups, ``add`` wakes waiters).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from rdzv.engine import Engine, Waiter
from rdzv.errors import QueueEmptyError
from rdzv.store.base import Deadline, Store, TimeoutLike

__all__ = ["HashStore"]


def _wake(waiter: Waiter) -> None:
    event = waiter.owner
    assert isinstance(event, threading.Event)
    event.set()


def _encode(keys: list[str]) -> list[bytes]:
    return [k.encode("utf-8") for k in keys]


class HashStore(Store):
    """An in-memory store for the threads of one process.

    Args:
        timeout: default timeout of blocking calls (timedelta or seconds; default 300 s).
    """

    def __init__(self, timeout: TimeoutLike | None = None) -> None:
        super().__init__(timeout)
        self._lock = threading.Lock()
        self._engine = Engine()

    def __repr__(self) -> str:
        return f"HashStore(id=0x{id(self):x})"

    def clone(self) -> HashStore:
        """Return ``self``: a HashStore is already shared by all threads (as torch's)."""
        return self

    def has_extended_api(self) -> bool:
        return True

    # ----------------------------------------------------------------- blocking helper
    def _block(
        self, register: Callable[[Engine, threading.Event], Waiter | None], timeout: float
    ) -> bool:
        """Register a waiter under the lock and wait for it; True if it fired (or was not
        needed), False at the deadline (the waiter is then unregistered)."""
        event = threading.Event()
        with self._lock:
            waiter = register(self._engine, event)
        if waiter is None:
            return True
        if event.wait(None if timeout == float("inf") else timeout):
            return True
        with self._lock:
            # Fired between the timeout and the lock: that still counts as success.
            return not self._engine.cancel(waiter)

    # ----------------------------------------------------------------- core
    def _set(self, key: str, value: bytes) -> None:
        with self._lock:
            self._engine.set(key.encode("utf-8"), value)

    def _get(self, key: str, timeout: float) -> bytes:
        bkey = key.encode("utf-8")
        deadline = Deadline(timeout)
        while True:
            with self._lock:
                value = self._engine.get(bkey)
            if value is not None:
                return value
            if not self._block(
                lambda e, ev: e.wait([bkey], _wake, ev, only="value"), deadline.remaining()
            ):
                raise self._timeout_error("get", [key], timeout)

    def _add(self, key: str, amount: int) -> int:
        with self._lock:
            return self._engine.add(key.encode("utf-8"), amount)

    def _append(self, key: str, value: bytes) -> None:
        with self._lock:
            self._engine.append(key.encode("utf-8"), value)

    def _compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        with self._lock:
            return self._engine.compare_set(key.encode("utf-8"), expected, desired)

    def _check(self, keys: list[str]) -> bool:
        bkeys = _encode(keys)
        with self._lock:
            return self._engine.check(bkeys)

    def _wait(self, keys: list[str], timeout: float) -> None:
        bkeys = _encode(keys)
        if not self._block(lambda e, ev: e.wait(bkeys, _wake, ev), timeout):
            raise self._timeout_error("wait", keys, timeout)

    def _delete_key(self, key: str) -> bool:
        with self._lock:
            return self._engine.delete_key(key.encode("utf-8"))

    def _num_keys(self) -> int:
        with self._lock:
            return self._engine.num_keys()

    def _list_keys(self) -> list[str]:
        with self._lock:
            raw = self._engine.list_keys()
        return [k.decode("utf-8") for k in raw]

    def _multi_get(self, keys: list[str], timeout: float) -> list[bytes]:
        bkeys = _encode(keys)
        deadline = Deadline(timeout)
        while True:
            with self._lock:
                values = self._engine.multi_get(bkeys)
            if all(v is not None for v in values):
                return [v for v in values if v is not None]
            if not self._block(
                lambda e, ev: e.wait(bkeys, _wake, ev, only="value"), deadline.remaining()
            ):
                raise self._timeout_error("multi_get", keys, timeout)

    def _multi_set(self, keys: list[str], values: list[bytes]) -> None:
        bkeys = _encode(keys)
        with self._lock:
            self._engine.multi_set(bkeys, values)

    def _barrier(self, key: str, world_size: int, timeout: float) -> None:
        bkey = key.encode("utf-8")
        if not self._block(lambda e, ev: e.barrier(bkey, world_size, _wake, ev), timeout):
            raise self._timeout_error("barrier", [key], timeout)

    def _queue_push(self, key: str, value: bytes) -> None:
        with self._lock:
            self._engine.queue_push(key.encode("utf-8"), value)

    def _queue_pop(self, key: str, timeout: float | None) -> bytes:
        bkey = key.encode("utf-8")
        deadline = Deadline(0.0 if timeout is None else timeout)
        while True:
            with self._lock:
                value = self._engine.queue_pop(bkey)
            if value is not None:
                return value
            if timeout is None:
                raise QueueEmptyError(f"queue_pop: queue {key!r} is empty on {self!r}")
            if not self._block(
                lambda e, ev: e.wait([bkey], _wake, ev, only="queue"), deadline.remaining()
            ):
                raise self._timeout_error("queue_pop", [key], timeout)

    def _queue_len(self, key: str) -> int:
        with self._lock:
            return self._engine.queue_len(key.encode("utf-8"))
