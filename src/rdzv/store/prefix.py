"""PrefixStore: a namespace inside another store (``"<prefix>/" + key``), like torch's.

Differences from ``torch.distributed.PrefixStore``, each a fix of a documented torch defect:

* ``list_keys()`` is scoped to the prefix (``len(list_keys())`` counts this namespace's
  keys); ``num_keys()`` counts the whole underlying store, as torch's does;
* the timeout is the PrefixStore's own: it starts as the underlying store's and
  :meth:`set_timeout` changes only this view (torch forwards it to the shared store, silently
  changing every other user's timeout). Blocking calls pass this timeout down explicitly.
"""

from __future__ import annotations

from rdzv.store.base import Store

__all__ = ["PrefixStore"]


class PrefixStore(Store):
    """A view of ``store`` in which every key ``k`` is stored as ``f"{prefix}/{k}"``.

    Args:
        prefix: the namespace (``str``); nested PrefixStores compose (``a/b/k``).
        store: the underlying :class:`~rdzv.store.base.Store`.

    Raises ValueError if ``store`` is None and TypeError if it is not a Store or the prefix
    is not a str.
    """

    def __init__(self, prefix: str, store: Store) -> None:
        if store is None:
            raise ValueError("PrefixStore: store argument cannot be None")
        if not isinstance(store, Store):
            raise TypeError(f"PrefixStore: store must be an rdzv Store, got {type(store).__name__}")
        if not isinstance(prefix, str):
            raise TypeError(f"PrefixStore: prefix must be a str, got {type(prefix).__name__}")
        super().__init__(store.timeout)
        self._prefix = prefix
        self._head = prefix + "/"
        self._store = store

    def __repr__(self) -> str:
        return f"PrefixStore(prefix={self._prefix!r}, store={self._store!r})"

    @property
    def prefix(self) -> str:
        """The namespace, without the trailing ``/``."""
        return self._prefix

    @property
    def underlying_store(self) -> Store:
        """The wrapped store (as torch's ``underlying_store``)."""
        return self._store

    @property
    def _underlying_non_prefix_store(self) -> Store:
        store = self._store
        while isinstance(store, PrefixStore):
            store = store._store
        return store

    def _k(self, key: str) -> str:
        return self._head + key

    def clone(self) -> PrefixStore:
        """``PrefixStore(prefix, underlying.clone())`` with this view's timeout."""
        twin = PrefixStore(self._prefix, self._store.clone())
        twin._timeout = self._timeout
        return twin

    def has_extended_api(self) -> bool:
        return self._store.has_extended_api()

    def _set(self, key: str, value: bytes) -> None:
        self._store._set(self._k(key), value)

    def _get(self, key: str, timeout: float) -> bytes:
        return self._store.get(self._k(key), timeout)

    def _add(self, key: str, amount: int) -> int:
        return self._store._add(self._k(key), amount)

    def _append(self, key: str, value: bytes) -> None:
        self._store._append(self._k(key), value)

    def _compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        return self._store._compare_set(self._k(key), expected, desired)

    def _check(self, keys: list[str]) -> bool:
        return self._store._check([self._k(k) for k in keys])

    def _wait(self, keys: list[str], timeout: float) -> None:
        self._store._wait([self._k(k) for k in keys], timeout)

    def _delete_key(self, key: str) -> bool:
        return self._store._delete_key(self._k(key))

    def _num_keys(self) -> int:
        return self._store._num_keys()

    def _list_keys(self) -> list[str]:
        head = self._head
        n = len(head)
        return [k[n:] for k in self._store._list_keys() if k.startswith(head)]

    def _multi_get(self, keys: list[str], timeout: float) -> list[bytes]:
        return self._store.multi_get([self._k(k) for k in keys], timeout)

    def _multi_set(self, keys: list[str], values: list[bytes]) -> None:
        self._store._multi_set([self._k(k) for k in keys], values)

    def _barrier(self, key: str, world_size: int, timeout: float) -> None:
        self._store._barrier(self._k(key), world_size, timeout)

    def _set_lease(self, key: str, value: bytes, ttl: float) -> None:
        self._store._set_lease(self._k(key), value, ttl)

    def _queue_push(self, key: str, value: bytes) -> None:
        self._store._queue_push(self._k(key), value)

    def _queue_pop(self, key: str, timeout: float | None) -> bytes:
        return self._store._queue_pop(self._k(key), timeout)

    def _queue_len(self, key: str) -> int:
        return self._store._queue_len(self._k(key))
