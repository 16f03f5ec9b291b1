"""The abstract :class:`Store` API, with torch's method names, argument order and semantics.

A backend implements a small core of protected methods that receive already validated
arguments (``str`` keys, ``bytes`` values, timeouts as float seconds):

``_set, _get, _add, _compare_set, _check, _wait, _delete_key, _num_keys`` and ``clone``.

A store may also be defined the torch way: a subclass of :class:`Store` that overrides only
the public methods it needs (``set``, ``get``, ``add``, ...). The core methods then call
those overrides, so :class:`~rdzv.store.prefix.PrefixStore`, the fallbacks and the
rendezvous handlers use them; a method overridden neither way raises NotImplementedError
(a RuntimeError) whose text starts with torch's "Not implemented.".

Everything else has a generic fallback here, written once (the same fallbacks as torch's
``c10d::Store`` base class): ``append`` as a compare_set loop, ``multi_get``/``multi_set`` as
sequences of get/set under one deadline, ``barrier`` as add + set + wait. ``list_keys``, the
queue operations and ``set_lease`` raise :class:`NotImplementedError` unless the backend
provides them.

Timeouts: every timeout argument accepts a :class:`datetime.timedelta` or a number of seconds
(``int``/``float``); ``None`` means the store's default (:attr:`Store.timeout`, 300 s unless
changed). ``0`` means *do not block*: the operation succeeds only if it can complete at once,
else it raises :class:`~rdzv.errors.StoreTimeoutError` immediately (torch's HashStore and
FileStore read 0 as "forever"; rdzv has one meaning everywhere). ``math.inf`` waits forever.
Negative or NaN timeouts raise :class:`ValueError`.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from rdzv.engine import INT64_MAX, INT64_MIN
from rdzv.errors import CounterError, StoreTimeoutError

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_LEASE_TTL",
    "KeyLike",
    "Store",
    "TimeoutLike",
    "ValueLike",
    "check_amount",
    "check_block",
    "check_ttl",
    "check_world_size",
    "handle_for_thread",
    "key_to_str",
    "keys_to_list",
    "timeout_error",
    "timeout_to_seconds",
    "value_to_bytes",
    "values_to_list",
]

#: Default store timeout in seconds, torch's ``kDefaultTimeout``.
DEFAULT_TIMEOUT = 300.0

#: Longest TTL :meth:`Store.set_lease` accepts, seconds (one year; the TCP wire protocol's
#: limit, :data:`rdzv.wire.MAX_LEASE_MS`, applied to every backend alike).
MAX_LEASE_TTL = 365 * 24 * 3600.0

KeyLike = str | bytes
ValueLike = str | bytes | bytearray | memoryview
TimeoutLike = timedelta | float | int


def key_to_str(key: object) -> str:
    """Validate a key: ``str`` as is, ``bytes`` decoded as UTF-8 (torch accepts both).

    Raises TypeError for any other type and ValueError for bytes that are not UTF-8.
    """
    if isinstance(key, str):
        return key
    if isinstance(key, bytes):
        try:
            return key.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"store keys must be UTF-8 text; {key[:64]!r} is not") from exc
    raise TypeError(f"store keys must be str (or UTF-8 bytes), got {type(key).__name__}: {key!r}")


def keys_to_list(keys: object, what: str = "keys") -> list[str]:
    """Validate a list of keys. A lone ``str``/``bytes`` is refused (it would be iterated
    character by character), as is any non-iterable; raises TypeError."""
    if isinstance(keys, (str, bytes)) or not isinstance(keys, Sequence):
        raise TypeError(
            f"{what} must be a list of str keys, got {type(keys).__name__}: {keys!r}; "
            f"wrap a single key in a list"
        )
    return [key_to_str(k) for k in keys]


def value_to_bytes(value: object, what: str = "value") -> bytes:
    """Validate a value: bytes-like as bytes, ``str`` encoded UTF-8; TypeError otherwise."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(
        f"store {what}s must be bytes or str, got {type(value).__name__}: {value!r}; "
        "encode numbers yourself (e.g. str(n)) or use add() for counters"
    )


def timeout_to_seconds(timeout: object, what: str = "timeout") -> float:
    """Convert a timeout (timedelta or seconds) to float seconds.

    Raises TypeError for other types (``bool`` included) and ValueError for negative or NaN
    values. ``math.inf`` is allowed and means no limit.
    """
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise TypeError(
            f"{what} must be a datetime.timedelta or a number of seconds, "
            f"got {type(timeout).__name__}: {timeout!r}"
        )
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"{what} must be >= 0 seconds, got {timeout!r}")
    return seconds


def check_ttl(ttl: object) -> float:
    """Validate the ``ttl`` of a lease (:meth:`Store.set_lease`): a timedelta or a number
    of seconds, ``0 < ttl <=`` :data:`MAX_LEASE_TTL`; return it in seconds.

    Raises TypeError for another type (``bool`` included), ValueError out of that range
    (infinity and NaN included).
    """
    seconds = timeout_to_seconds(ttl, "ttl")
    if not 0 < seconds <= MAX_LEASE_TTL:
        raise ValueError(
            f"set_lease: ttl must be > 0 and <= {MAX_LEASE_TTL:g} seconds (one year), got "
            f"{ttl!r}; use set() for a key that should not expire"
        )
    return seconds


def check_amount(key: object, amount: object) -> int:
    """Validate the ``amount`` of ``add``: TypeError unless an int (bool refused),
    CounterError outside int64."""
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise TypeError(f"add: amount must be an int, got {type(amount).__name__}: {amount!r}")
    if not INT64_MIN <= amount <= INT64_MAX:
        raise CounterError(
            f"add: amount {amount} for key {key!r} is outside the int64 range "
            f"[{INT64_MIN}, {INT64_MAX}]"
        )
    return amount


def values_to_list(key_list: Sequence[str], values: object) -> list[bytes]:
    """Validate the values of ``multi_set`` against its keys: TypeError unless a list of
    bytes/str, ValueError on a length mismatch."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"multi_set: values must be a list, got {type(values).__name__}")
    if len(key_list) != len(values):
        raise ValueError(
            f"multi_set: got {len(key_list)} keys but {len(values)} values; pass one value per key"
        )
    return [value_to_bytes(v) for v in values]


def check_block(block: object) -> bool:
    """Validate ``queue_pop``'s ``block`` flag (TypeError unless a bool)."""
    if not isinstance(block, bool):
        raise TypeError(f"queue_pop: block must be a bool, got {type(block).__name__}")
    return block


def check_world_size(world_size: object) -> int:
    """Validate a barrier's ``world_size``: TypeError unless an int, ValueError below 1."""
    if not isinstance(world_size, int) or isinstance(world_size, bool):
        raise TypeError(f"barrier: world_size must be an int, got {world_size!r}")
    if world_size < 1:
        raise ValueError(f"barrier: world_size must be >= 1, got {world_size}")
    return world_size


def check_barrier_rank(rank: object, world_size: int) -> int:
    """Validate a barrier's ``rank``: TypeError unless an int, ValueError outside
    ``0..world_size-1``."""
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise TypeError(f"barrier: rank must be an int or None, got {rank!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"barrier: rank must be in 0..{world_size - 1}, got {rank}")
    return rank


def barrier_arrivals_key(key: str) -> str:
    """Where ranked barrier arrivals are logged (one ``"{rank}\\n"`` per arrival)."""
    return f"{key}/arrived_ranks"


def missing_ranks(log: bytes, world_size: int, rank: int) -> list[int]:
    """The ranks that did not reach the barrier generation that ``rank`` waits in, from the
    arrivals log: those that arrived fewer times than ``rank`` did."""
    counts: dict[int, int] = {}
    for line in log.split(b"\n"):
        if line.strip().isdigit():
            counts[int(line)] = counts.get(int(line), 0) + 1
    mine = max(counts.get(rank, 0), 1)
    return [r for r in range(world_size) if counts.get(r, 0) < mine]


def missing_ranks_error(exc: StoreTimeoutError, missing: list[int], world_size: int) -> str:
    """The message of a ranked barrier's timeout: ``exc``'s plus every missing rank."""
    return (
        f"{exc}; {len(missing)} of {world_size} ranks never arrived: {', '.join(map(str, missing))}"
    )


def timeout_error(op: str, keys: Sequence[str], seconds: float, where: str) -> StoreTimeoutError:
    """The error of a blocking ``op`` on ``keys`` that ran out of ``seconds`` on ``where``."""
    # torch's sentence first ("wait timeout after 100ms, keys: /a, /b"; a get is a wait
    # there), then rdzv's detail.
    verb = "wait" if op in ("get", "multi_get") else op
    names = ", ".join(f"/{k}" for k in keys)
    return StoreTimeoutError(
        f"{verb} timeout after {format_ms(seconds)}, keys: {names} ({op} on {where}: the "
        "keys were not set in time; check that the writing ranks are alive, or raise the "
        "timeout)"
    )


def _seconds_to_timedelta(seconds: float) -> timedelta:
    return timedelta.max if math.isinf(seconds) else timedelta(seconds=seconds)


def format_ms(seconds: float) -> str:
    """``1.5`` -> ``"1500ms"``, as torch prints timeouts."""
    return "unlimited" if math.isinf(seconds) else f"{round(seconds * 1000)}ms"


class Deadline:
    """A point on the monotonic clock, ``timeout`` seconds from now (``inf``: never)."""

    __slots__ = ("at", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.at = time.monotonic() + timeout

    def remaining(self) -> float:
        """Seconds left, never negative (``inf`` for an unlimited deadline)."""
        if math.isinf(self.timeout):
            return math.inf
        return max(0.0, self.at - time.monotonic())


def _takes_timeout(method: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
        return True
    return any(p.name == "timeout" or p.kind is p.VAR_KEYWORD for p in params)


def _ignoring_timeout(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: Store, arg: Any, timeout: TimeoutLike | None = None) -> Any:
        return method(self, arg)

    return call


class Store:
    """A key-value store shared by the processes of a job; torch's ``dist.Store`` API.

    Keys are ``str`` (``bytes`` accepted, decoded as UTF-8); values are ``bytes`` (``str`` is
    accepted and encoded UTF-8); counters are int64. Every method is safe to call from
    several threads unless a backend says otherwise.
    """

    def __init__(self, timeout: TimeoutLike | None = None) -> None:
        self._timeout = DEFAULT_TIMEOUT if timeout is None else timeout_to_seconds(timeout)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A store defined in Python the torch way overrides get(key)/multi_get(keys) without
        # the timeout parameter; accept it there too (the override keeps its own waiting,
        # as it did when reached through the core methods), so callers may always pass it.
        super().__init_subclass__(**kwargs)
        for name in ("get", "multi_get"):
            method = cls.__dict__.get(name)
            if callable(method) and not _takes_timeout(method):
                setattr(cls, name, _ignoring_timeout(method))

    # ----------------------------------------------------------------- timeouts
    @property
    def timeout(self) -> timedelta:
        """The default timeout of blocking operations (read-only; use :meth:`set_timeout`)."""
        return _seconds_to_timedelta(self._timeout)

    def set_timeout(self, timeout: TimeoutLike) -> None:
        """Set the default timeout used by get, wait without a timeout, multi_get, blocking
        queue_pop and barrier without a timeout. Raises TypeError/ValueError as
        :func:`timeout_to_seconds`."""
        self._timeout = timeout_to_seconds(timeout)

    def _resolve_timeout(self, timeout: TimeoutLike | None) -> float:
        return self._timeout if timeout is None else timeout_to_seconds(timeout)

    def _timeout_error(self, op: str, keys: Sequence[str], seconds: float) -> StoreTimeoutError:
        return timeout_error(op, keys, seconds, repr(self))

    # ----------------------------------------------------------------- public API
    def set(self, key: KeyLike, value: ValueLike) -> None:
        """Insert or overwrite ``key`` with ``value`` and wake the key's waiters.

        Raises TypeError for a non-str key or a non-bytes/str value.
        Same semantics as ``torch.distributed.Store.set``.
        """
        self._set(key_to_str(key), value_to_bytes(value))

    def set_lease(self, key: KeyLike, value: ValueLike, ttl: TimeoutLike) -> None:
        """Set ``key`` to ``value`` with a lease: the store deletes the key once ``ttl`` has
        passed since this call, unless it was written again before. ``set_lease`` again
        renews (the new value, a new ``ttl`` from that call); any other write that changes it
        (set, add, append, multi_set, a compare_set that swaps it) makes it an ordinary key
        that does not expire.
        Waiters of the key are woken as by :meth:`set`; the expiry wakes nobody.

        ``ttl``: seconds (int/float) or a timedelta, ``0 < ttl <=`` :data:`MAX_LEASE_TTL`
        (one year). The server's clock decides, and the key never goes before ``ttl``:
        HashStore and TCPStore round ``ttl`` up to whole milliseconds, EtcdStore to whole
        seconds and to
        etcd's minimum TTL (about 2 s with etcd's defaults; one etcd lease per call).

        Supported by HashStore, TCPStore and AsyncTCPStore on an rdzv server, EtcdStore, and
        a PrefixStore over one of them (rdzv's extension: torch's stores have no leases).
        Keys that live as long as a connection are TCPStore's ``set_ephemeral``; keys that
        expire together under one renewable lease are EtcdStore's ``lease()``.

        Raises:
            TypeError / ValueError: a bad key, value or ``ttl`` (:func:`check_ttl`).
            NotImplementedError: the backend has no leases (FileStore, a store defined in
                Python that does not override ``set_lease``).
            StoreError: TCPStore on a server without rdzv's protocol extensions (torch's).
        """
        self._set_lease(key_to_str(key), value_to_bytes(value), check_ttl(ttl))

    def get(self, key: KeyLike, timeout: TimeoutLike | None = None) -> bytes:
        """Return the value of ``key``, waiting up to ``timeout`` (seconds or timedelta;
        default None: :attr:`timeout`) for it to be set.

        Raises :class:`~rdzv.errors.StoreTimeoutError` if the key is still absent at the
        deadline (at once when the timeout is 0), TypeError/ValueError for a bad timeout (as
        :func:`timeout_to_seconds`). A key that only names a queue is not a value.
        Same semantics as ``torch.distributed.Store.get`` (``get(key)`` is torch's call).
        """
        return self._get(key_to_str(key), self._resolve_timeout(timeout))

    def add(self, key: KeyLike, amount: int) -> int:
        """Atomically add ``amount`` (int64, may be 0 or negative) to the counter under ``key``
        and return the new value. An absent key starts at 0. The counter is stored as ASCII
        decimal and parsed with C ``strtoll`` rules (same semantics as torch's ``add``); unlike
        torch's HashStore, ``add`` wakes the key's waiters.

        Raises TypeError if ``amount`` is not an int, :class:`~rdzv.errors.CounterError` (a
        ValueError) if the stored value is not an integer or the sum overflows int64.
        """
        return self._add(key_to_str(key), check_amount(key, amount))

    def append(self, key: KeyLike, value: ValueLike) -> None:
        """Concatenate ``value`` to the value of ``key``, creating it when absent; wakes its
        waiters. Same semantics as ``torch.distributed.Store.append``."""
        self._append(key_to_str(key), value_to_bytes(value))

    def compare_set(self, key: KeyLike, expected: ValueLike, desired: ValueLike) -> bytes:
        """Atomically set ``key`` to ``desired`` if its value equals ``expected``.

        Same semantics as ``torch.distributed.Store.compare_set``:

        * absent key, empty ``expected``: creates the key, returns ``desired``;
        * absent key, non-empty ``expected``: changes nothing, returns ``expected``;
        * value == ``expected``: sets ``desired``, returns ``desired``;
        * value != ``expected``: changes nothing, returns the current value.
        """
        return self._compare_set(
            key_to_str(key),
            value_to_bytes(expected, "expected value"),
            value_to_bytes(desired, "desired value"),
        )

    def check(self, keys: Sequence[KeyLike]) -> bool:
        """Without blocking, return True iff every key exists (an empty list is True).
        Same semantics as ``torch.distributed.Store.check``."""
        return self._check(keys_to_list(keys))

    def wait(self, keys: Sequence[KeyLike], timeout: TimeoutLike | None = None) -> None:
        """Block until every key in ``keys`` exists.

        ``timeout``: seconds or timedelta; ``None`` uses :attr:`timeout`; ``0`` does not
        block. Raises :class:`~rdzv.errors.StoreTimeoutError` naming the keys at the deadline.
        Same semantics as ``torch.distributed.Store.wait``.
        """
        key_list = keys_to_list(keys)
        seconds = self._resolve_timeout(timeout)
        if key_list:
            self._wait(key_list, seconds)

    def delete_key(self, key: KeyLike) -> bool:
        """Delete ``key``; return True if it existed, False otherwise (truthfully, unlike
        torch's FileStore). Does not wake waiters and does not touch queues."""
        return self._delete_key(key_to_str(key))

    def num_keys(self) -> int:
        """The number of keys in the store, counted as torch counts them: queues excluded,
        internal bookkeeping keys included (TCPStore's ``init/`` worker counter, FileStore's
        ``refcount/`` and ``cleanup/``), and a PrefixStore counts its whole underlying store.
        ``len(list_keys())`` counts only user keys (of a PrefixStore's namespace)."""
        return self._num_keys()

    def list_keys(self) -> list[str]:
        """Every user key, in no particular order. Raises NotImplementedError on a backend
        that cannot enumerate keys."""
        return self._list_keys()

    def multi_get(self, keys: Sequence[KeyLike], timeout: TimeoutLike | None = None) -> list[bytes]:
        """The values of ``keys`` in order, waiting up to ``timeout`` (default None:
        :attr:`timeout`; one deadline for the whole batch) for missing ones. Raises
        :class:`~rdzv.errors.StoreTimeoutError`, and TypeError/ValueError for a bad timeout.
        ``multi_get(keys)`` is torch's call."""
        key_list = keys_to_list(keys)
        seconds = self._resolve_timeout(timeout)
        return self._multi_get(key_list, seconds) if key_list else []

    def multi_set(self, keys: Sequence[KeyLike], values: Sequence[ValueLike]) -> None:
        """Set ``keys[i]`` to ``values[i]`` for every i.

        Raises ValueError, before writing anything, if the lengths differ (torch's HashStore
        has undefined behaviour there), TypeError for bad keys or values.
        """
        key_list = keys_to_list(keys)
        value_list = values_to_list(key_list, values)
        if key_list:
            self._multi_set(key_list, value_list)

    def queue_push(self, key: KeyLike, value: ValueLike) -> None:
        """Append ``value`` to the FIFO queue ``key`` and wake one blocked popper. Queues are a
        namespace separate from values. Raises NotImplementedError where unsupported."""
        self._queue_push(key_to_str(key), value_to_bytes(value))

    def queue_pop(self, key: KeyLike, block: bool = True) -> bytes:
        """Pop the front of the FIFO queue ``key``.

        ``block=True`` waits up to :attr:`timeout` for an item and raises
        :class:`~rdzv.errors.StoreTimeoutError` at the deadline; ``block=False`` raises
        :class:`~rdzv.errors.QueueEmptyError` at once on an empty queue. With several blocked
        poppers, one push releases exactly one of them.
        """
        return self._queue_pop(key_to_str(key), self._timeout if check_block(block) else None)

    def queue_len(self, key: KeyLike) -> int:
        """The number of items in the FIFO queue ``key`` (0 for a queue never used)."""
        return self._queue_len(key_to_str(key))

    def barrier(
        self,
        key: KeyLike,
        world_size: int,
        timeout: TimeoutLike | None = None,
        rank: int | None = None,
    ) -> None:
        """Block until ``world_size`` callers have reached the barrier ``key``.

        ``timeout`` as in :meth:`wait`. The key can be reused: the next ``world_size``
        arrivals form the next barrier (torch releases a reused key at once). ``rank``
        (``0..world_size-1``): the caller's rank; every ranked arrival is also logged (one
        ``append`` to ``{key}/arrived_ranks``), so that a timeout's error lists every rank
        that never arrived (no cap). Callers of one barrier should all pass their rank or
        none. Raises ValueError for ``world_size < 1`` or a rank out of range,
        :class:`~rdzv.errors.StoreTimeoutError` at the deadline (the arrival stays counted,
        as in torch).
        """
        name, size = key_to_str(key), check_world_size(world_size)
        seconds = self._resolve_timeout(timeout)
        if rank is None:
            self._barrier(name, size, seconds)
            return
        me = check_barrier_rank(rank, size)
        log = barrier_arrivals_key(name)
        self._append(log, f"{me}\n".encode())
        try:
            self._barrier(name, size, seconds)
        except StoreTimeoutError as exc:
            missing = missing_ranks(self._get(log, 0.0), size, me)
            raise StoreTimeoutError(missing_ranks_error(exc, missing, size)) from None

    def has_extended_api(self) -> bool:
        """True when append, multi_get and multi_set are native rather than fallbacks."""
        return False

    def clone(self) -> Store:
        """A new handle on the same data that another thread may use independently.

        Every built-in store implements it; a Python-defined store that does not raises
        NotImplementedError (a RuntimeError, as torch's "pure virtual" error).
        """
        raise NotImplementedError(
            f"Not implemented. {type(self).__name__} does not implement clone(): a store "
            "defined in Python overrides it to share its data with another handle."
        )

    # ----------------------------------------------------------------- backend core
    # A backend overrides these (validated arguments, float-second timeouts). A store
    # defined in Python the torch way overrides the public methods instead: each core
    # method then calls the public override, so PrefixStore, the fallbacks below and the
    # rendezvous handlers reach it. Neither overridden: NotImplementedError.
    def _set(self, key: str, value: bytes) -> None:
        self._public("set")(key, value)

    def _get(self, key: str, timeout: float) -> bytes:
        return bytes(self._public("get")(key))

    def _add(self, key: str, amount: int) -> int:
        return int(self._public("add")(key, amount))

    def _compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        return bytes(self._public("compare_set")(key, expected, desired))

    def _check(self, keys: list[str]) -> bool:
        return bool(self._public("check")(keys))

    def _wait(self, keys: list[str], timeout: float) -> None:
        self._public("wait")(keys, _seconds_to_timedelta(timeout))

    def _delete_key(self, key: str) -> bool:
        return bool(self._public("delete_key")(key))

    def _num_keys(self) -> int:
        return int(self._public("num_keys")())

    def _public(self, name: str) -> Any:
        """The subclass's override of the public method ``name``; NotImplementedError when
        there is none (the core method was not overridden either)."""
        if getattr(type(self), name) is getattr(Store, name):
            raise _not_implemented(self, name)
        return getattr(self, name)

    def _overrides(self, name: str) -> bool:
        return getattr(type(self), name) is not getattr(Store, name)

    # ----------------------------------------------------------------- generic fallbacks
    def _list_keys(self) -> list[str]:
        if self._overrides("list_keys"):
            return list(self.list_keys())
        raise NotImplementedError(f"{type(self).__name__} cannot list its keys")

    def _append(self, key: str, value: bytes) -> None:
        if self._overrides("append"):
            self.append(key, value)
            return
        # compare_set loop, as torch's c10d::Store::append.
        expected = value
        current = self._compare_set(key, b"", value)
        while current != expected:
            expected = current + value
            current = self._compare_set(key, current, expected)

    def _multi_get(self, keys: list[str], timeout: float) -> list[bytes]:
        if self._overrides("multi_get"):
            return [bytes(v) for v in self.multi_get(keys)]
        deadline = Deadline(timeout)
        return [self._get(key, deadline.remaining()) for key in keys]

    def _multi_set(self, keys: list[str], values: list[bytes]) -> None:
        if self._overrides("multi_set"):
            self.multi_set(keys, values)
            return
        for key, value in zip(keys, values, strict=True):
            self._set(key, value)

    def _barrier(self, key: str, world_size: int, timeout: float) -> None:
        if self._overrides("barrier"):
            self.barrier(key, world_size, _seconds_to_timedelta(timeout))
            return
        # torch's base-class barrier (add + set + wait), made reusable: arrival c belongs to
        # generation ceil(c / world_size); generation 1 uses torch's key names.
        count = self._add(f"{key}/num_members", 1)
        generation = -(-count // world_size)
        last = f"{key}/last_member" + ("" if generation == 1 else f"/{generation}")
        if count == generation * world_size:
            self._set(last, b"1")
        try:
            self._wait([last], timeout)
        except StoreTimeoutError:
            raise self._timeout_error("barrier", [key], timeout) from None

    def _set_lease(self, key: str, value: bytes, ttl: float) -> None:
        """``set_lease`` with a validated ``ttl`` in seconds."""
        if self._overrides("set_lease"):
            self.set_lease(key, value, ttl)
            return
        raise NotImplementedError(
            f"{type(self).__name__} has no leases (set_lease): keys that expire need "
            "TCPStore on an rdzv server or EtcdStore"
        )

    def _queue_push(self, key: str, value: bytes) -> None:
        if self._overrides("queue_push"):
            self.queue_push(key, value)
            return
        raise NotImplementedError(f"{type(self).__name__} does not support queues")

    def _queue_pop(self, key: str, timeout: float | None) -> bytes:
        if self._overrides("queue_pop"):
            return bytes(self.queue_pop(key, timeout is not None))
        raise NotImplementedError(f"{type(self).__name__} does not support queues")

    def _queue_len(self, key: str) -> int:
        if self._overrides("queue_len"):
            return int(self.queue_len(key))
        raise NotImplementedError(f"{type(self).__name__} does not support queues")


def _not_implemented(store: Store, name: str) -> NotImplementedError:
    return NotImplementedError(
        f"Not implemented. {type(store).__name__} does not implement {name}(): a store "
        f"defined in Python overrides the public method {name}() (or the core method "
        f"_{name}() of rdzv's backend API)."
    )


def handle_for_thread(store: Store) -> Store:
    """A handle on ``store`` for another thread: ``store.clone()``, or ``store`` itself when
    it cannot be cloned (a Python-defined store without ``clone``, which then serves every
    thread, as torch's rendezvous uses it)."""
    try:
        return store.clone()
    except NotImplementedError:
        return store
