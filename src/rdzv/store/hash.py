"""HashStore: an in-process, thread-safe store; a thin wrapper over :class:`rdzv.engine.Engine`.

Same role as ``torch.distributed.HashStore``: threads of one process share it (``clone()``
returns the same object). One lock serialises engine calls. A blocking call registers a typed
engine waiter (:meth:`~rdzv.engine.Engine.get_wait`, ``queue_pop_wait`` ...) whose wake-up
sets the calling thread's :class:`threading.Event`; the engine hands the waiter what it
waited for (the value, the popped item) in the same step, so this module only carries
results to callers and applies their timeouts: waking is exact (no polling, no spurious
wake-ups, ``add`` wakes waiters, a pushed item goes to a blocked ``queue_pop`` even when a
``get`` of the key waited first). Leases (:meth:`HashStore.set_lease`) are the engine's too,
on :func:`time.monotonic`: every call first expires the leases whose deadline has passed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from rdzv.engine import Engine, Waiter
from rdzv.errors import QueueEmptyError
from rdzv.store import tcp_ops
from rdzv.store.base import Store, TimeoutLike

__all__ = ["HashStore"]

_R = TypeVar("_R")


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

    # ----------------------------------------------------------------- helpers
    def _now(self) -> Engine:
        """The engine with every lease due by now expired; call with the lock held."""
        engine = self._engine
        deadline = engine.next_deadline()
        if deadline is not None:
            now = time.monotonic()
            if deadline <= now:
                engine.expire(now)
        return engine

    def _block(
        self,
        op: str,
        keys: list[str],
        timeout: float,
        register: Callable[[Engine, threading.Event], _R | Waiter | None],
    ) -> _R | None:
        """Run ``register`` under the lock: its result, unless it parked a waiter; then wait
        for that waiter up to ``timeout`` seconds and return what the engine handed it.
        Raises the store's timeout error (the waiter unregistered) at the deadline."""
        event = threading.Event()
        with self._lock:
            got = register(self._now(), event)
        if not isinstance(got, Waiter):
            return got
        if not event.wait(None if timeout == float("inf") else timeout):
            with self._lock:
                # Fired between the timeout and the lock: that still counts as success.
                if self._engine.cancel(got):
                    raise self._timeout_error(op, keys, timeout)
        return got.result  # type: ignore[return-value]  # what the waiter's kind yields

    # ----------------------------------------------------------------- core
    def _set(self, key: str, value: bytes) -> None:
        with self._lock:
            self._now().set(key.encode("utf-8"), value)

    def _get(self, key: str, timeout: float) -> bytes:
        bkey = key.encode("utf-8")
        value = self._block("get", [key], timeout, lambda e, ev: e.get_wait(bkey, _wake, ev))
        assert isinstance(value, bytes)
        return value

    def _add(self, key: str, amount: int) -> int:
        with self._lock:
            return self._now().add(key.encode("utf-8"), amount)

    def _append(self, key: str, value: bytes) -> None:
        with self._lock:
            self._now().append(key.encode("utf-8"), value)

    def _compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        with self._lock:
            return self._now().compare_set(key.encode("utf-8"), expected, desired)

    def _check(self, keys: list[str]) -> bool:
        bkeys = _encode(keys)
        with self._lock:
            return self._now().check(bkeys)

    def _wait(self, keys: list[str], timeout: float) -> None:
        bkeys = _encode(keys)
        self._block("wait", keys, timeout, lambda e, ev: e.wait(bkeys, _wake, ev))

    def _delete_key(self, key: str) -> bool:
        with self._lock:
            return self._now().delete_key(key.encode("utf-8"))

    def _num_keys(self) -> int:
        with self._lock:
            return self._now().num_keys()

    def _list_keys(self) -> list[str]:
        with self._lock:
            raw = self._now().list_keys()
        return [k.decode("utf-8") for k in raw]

    def _multi_get(self, keys: list[str], timeout: float) -> list[bytes]:
        bkeys = _encode(keys)
        values = self._block(
            "multi_get", keys, timeout, lambda e, ev: e.multi_get_wait(bkeys, _wake, ev)
        )
        assert isinstance(values, list)
        return values

    def _multi_set(self, keys: list[str], values: list[bytes]) -> None:
        bkeys = _encode(keys)
        with self._lock:
            self._now().multi_set(bkeys, values)

    def _barrier(self, key: str, world_size: int, timeout: float) -> None:
        bkey = key.encode("utf-8")
        self._block("barrier", [key], timeout, lambda e, ev: e.barrier(bkey, world_size, _wake, ev))

    def _queue_push(self, key: str, value: bytes) -> None:
        with self._lock:
            self._now().queue_push(key.encode("utf-8"), value)

    def _queue_pop(self, key: str, timeout: float | None) -> bytes:
        bkey = key.encode("utf-8")
        if timeout is None:
            with self._lock:
                value = self._now().queue_pop(bkey)
            if value is None:
                raise QueueEmptyError(f"queue_pop: queue {key!r} is empty on {self!r}")
            return value
        item = self._block(
            "queue_pop", [key], timeout, lambda e, ev: e.queue_pop_wait(bkey, _wake, ev)
        )
        assert isinstance(item, bytes)
        return item

    def _queue_len(self, key: str) -> int:
        with self._lock:
            return self._now().queue_len(key.encode("utf-8"))

    # ----------------------------------------------------------------- leases
    def _set_lease(self, key: str, value: bytes, ttl: float) -> None:
        # Store.set_lease (semantics, units, errors), in the engine's lease table as on
        # rdzv's server: the TTL rounded up to whole milliseconds, time.monotonic's clock.
        deadline = time.monotonic() + tcp_ops.lease_ms(ttl) / 1000
        with self._lock:
            self._now().set_lease(key.encode("utf-8"), value, deadline)
