"""A Store wrapper that counts the operations made through it (benchmarks and tests).

Each public operation counts once, whatever the backend does underneath: ``multi_get`` of
1000 keys is one operation (one round trip on a TCPStore), ``get`` is one (two round trips on
the wire for torch's client: WAIT then GET).
"""

from __future__ import annotations

import threading
from collections import Counter

from rdzv.store.base import Store

__all__ = ["CountingStore", "OpCounter"]


class OpCounter:
    """Thread-safe operation counts, shared by a CountingStore and its clones."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        #: Bytes of values sent and received (keys excluded).
        self.value_bytes = 0

    def bump(self, op: str, value_bytes: int = 0) -> None:
        with self._lock:
            self.counts[op] += 1
            self.value_bytes += value_bytes

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


class CountingStore(Store):
    """Delegates every operation to ``inner`` and counts it in ``counter``."""

    def __init__(
        self,
        inner: Store,
        counter: OpCounter | None = None,
        clone_counter: OpCounter | None = None,
    ) -> None:
        super().__init__(inner.timeout)
        self.inner = inner
        self.counter = counter if counter is not None else OpCounter()
        #: Where clones count (the rendezvous' keep-alive thread works on a clone): the
        #: same counter unless given.
        self.clone_counter = clone_counter if clone_counter is not None else self.counter

    def __repr__(self) -> str:
        return f"CountingStore({self.inner!r})"

    def clone(self) -> CountingStore:
        return type(self)(self.inner.clone(), self.clone_counter)

    def has_extended_api(self) -> bool:
        return self.inner.has_extended_api()

    def _set(self, key: str, value: bytes) -> None:
        self.counter.bump("set", len(value))
        self.inner._set(key, value)

    def _get(self, key: str, timeout: float) -> bytes:
        value = self.inner._get(key, timeout)
        self.counter.bump("get", len(value))
        return value

    def _add(self, key: str, amount: int) -> int:
        self.counter.bump("add")
        return self.inner._add(key, amount)

    def _compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        current = self.inner._compare_set(key, expected, desired)
        self.counter.bump("compare_set", len(expected) + len(desired) + len(current))
        return current

    def _check(self, keys: list[str]) -> bool:
        self.counter.bump("check")
        return self.inner._check(keys)

    def _wait(self, keys: list[str], timeout: float) -> None:
        self.counter.bump("wait")
        self.inner._wait(keys, timeout)

    def _delete_key(self, key: str) -> bool:
        self.counter.bump("delete_key")
        return self.inner._delete_key(key)

    def _num_keys(self) -> int:
        self.counter.bump("num_keys")
        return self.inner._num_keys()

    def _list_keys(self) -> list[str]:
        self.counter.bump("list_keys")
        return self.inner._list_keys()

    def _multi_get(self, keys: list[str], timeout: float) -> list[bytes]:
        values = self.inner._multi_get(keys, timeout)
        self.counter.bump("multi_get", sum(len(v) for v in values))
        return values

    def _multi_set(self, keys: list[str], values: list[bytes]) -> None:
        self.counter.bump("multi_set", sum(len(v) for v in values))
        self.inner._multi_set(keys, values)
