"""The sans-I/O key-value state machine shared by HashStore and the TCP server.

:class:`Engine` owns the whole data model of a store:

* values: ``bytes -> bytes``;
* integer counters, stored in the value map as ASCII decimal like torch (``add`` parses the
  old value with C ``strtoll`` rules, see :func:`parse_counter`);
* FIFO queues, a namespace of their own (``queue_push``/``queue_pop``);
* barrier counters, stored under the barrier key in the value map;
* the registry of :class:`Waiter` objects: who waits for which keys.

It never blocks, never sleeps and never touches a socket, thread or clock. Blocking is the
wrapper's business: HashStore parks threads on events, the server parks connections. A waiter
registration carries a callback; when an operation makes the waiter's last missing key
present, the engine unregisters the waiter and calls that callback synchronously, before the
operation returns. The callback must not call back into the engine.

Keys are ``bytes`` exactly as they travel on the wire (torch clients send ``"/" + key``);
the stores above decide the namespace. The engine imposes no size limits; the codec does.

Waking rules (a superset of torch's libuv server, minus its accidents):

* ``set``, ``append``, ``multi_set``, ``add``, ``barrier`` and a ``compare_set`` that leaves
  the key present wake every waiter of the key that a value can satisfy (torch's HashStore
  forgets ``add``; torch's libuv server also wakes on a failed ``compare_set`` of a missing
  key, a spurious wake-up); waiters for a queue item only (``only="queue"``) stay parked;
* ``queue_push`` wakes exactly one waiter of the key (as torch's ``notify_one``): the
  longest-registered waiter for a queue item (``only="queue"``, a blocking ``queue_pop``
  that pops on wake-up), else the longest-registered waiter for either (``only=None``: a
  torch client's WAIT cannot say what it waits for). Waiters for a value only
  (``only="value"``, a blocking ``get``) stay parked. So a pushed item goes to a waiting
  ``queue_pop`` rather than to an earlier ``get`` that cannot use it (torch's HashStore
  hands it to the pop too); between torch clients, the wire protocol decides;
* ``delete_key`` wakes nobody.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple, Protocol

from rdzv.errors import CounterError

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "Engine",
    "FastPathTables",
    "Journal",
    "Waiter",
    "format_counter",
    "parse_counter",
    "show_key",
]

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

_WHITESPACE = b" \t\n\v\f\r"
_DIGITS = b"0123456789"


def show_key(key: bytes) -> str:
    """A key for messages: the text as the user wrote it, quoted (bytes that are not UTF-8
    shown as escapes)."""
    return repr(key.decode("utf-8", "backslashreplace"))


def parse_counter(key: bytes, raw: bytes) -> int:
    """Parse a stored counter value the way torch does (C ``strtoll``/``std::stoll``, base 10).

    Leading whitespace and one sign are accepted, then at least one digit; anything after the
    digits is ignored (``b" 12abc"`` is 12). Raises :class:`CounterError` naming ``key`` when
    there is no digit or the number does not fit in int64.
    """
    # Fast path: what add itself writes (optional "-", then digits).
    if raw.isdigit() or (raw[:1] == b"-" and raw[1:].isdigit()):
        value = int(raw)
        if INT64_MIN <= value <= INT64_MAX:
            return value
    i = 0
    n = len(raw)
    while i < n and raw[i] in _WHITESPACE:
        i += 1
    start = i
    if i < n and raw[i] in b"+-":
        i += 1
    digits_start = i
    while i < n and raw[i] in _DIGITS:
        i += 1
    if i == digits_start:
        raise CounterError(
            f"add: the value under key {show_key(key)} is {raw[:64]!r}, "
            "which is not a base-10 integer; "
            "add only works on keys that are absent or hold an integer written by add"
        )
    value = int(raw[start:i])
    if not INT64_MIN <= value <= INT64_MAX:
        raise CounterError(
            f"add: the value under key {show_key(key)} ({value}) is outside the int64 range "
            f"[{INT64_MIN}, {INT64_MAX}]"
        )
    return value


def format_counter(value: int) -> bytes:
    """Encode a counter as torch stores it: ASCII decimal, ``-`` for negatives."""
    return str(value).encode("ascii")


class Waiter:
    """One registration in the waiter registry.

    ``missing`` holds the keys still awaited; the engine empties it. ``callback(waiter)`` is
    called once, when the last key arrives (or, for a barrier waiter, when the barrier
    releases). ``owner`` is free for the wrapper (a connection, an event). ``only`` is what
    makes a key present for it: ``"value"``, ``"queue"`` (an item) or ``None`` (either).
    """

    __slots__ = ("barrier_target", "callback", "missing", "only", "owner")

    def __init__(
        self,
        missing: set[bytes],
        callback: Callable[[Waiter], None],
        owner: object = None,
        barrier_target: int | None = None,
        only: str | None = None,
    ) -> None:
        self.missing = missing
        self.callback = callback
        self.owner = owner
        self.barrier_target = barrier_target
        self.only = only

    def __repr__(self) -> str:
        return f"Waiter(missing={sorted(self.missing)!r}, barrier_target={self.barrier_target})"


class FastPathTables(NamedTuple):
    """What the TCP server's C fast path (``rdzv.server._fastpath``) may touch of an engine,
    and how.

    Obtained from :meth:`Engine.fastpath_tables`; the dictionaries are the engine's own (they
    stay valid, and current, as long as the engine lives). The engine keeps these invariants
    between calls, and the fast path must keep them too:

    * ``data`` (key -> value, ``bytes -> bytes``, insertion-ordered): the fast path may read
      it, and may insert or overwrite the value of a key only when that key is in none of
      ``waiters``, ``barriers`` and ``bound`` (a write there must wake, release or unbind:
      the Python path's work). It never deletes.
    * ``queues`` (key -> non-empty ``collections.deque`` of bytes): read only (presence);
      an empty queue is never in it.
    * ``waiters`` (key -> ``dict[Waiter, None]``, non-empty, registration order): read only
      (membership).
    * ``barriers`` (key -> ``dict[Waiter, None]`` of parked barrier waiters): read only
      (membership).
    * ``bound`` (key -> owner or lease: keys set with ``set_ephemeral``/``set_lease``): read
      only (membership).
    * ``park(key, callback, owner) -> Waiter``: registers a waiter for a value or an item
      (a torch WAIT) on one key that is absent now (no value, no queue item; the caller
      checked). Its callback fires, as any waiter's, when the key becomes present.

    The engine must have no journal while the fast path is used: its writes are not
    journaled.
    """

    data: dict[bytes, bytes]
    queues: dict[bytes, deque[bytes]]
    waiters: dict[bytes, dict[Waiter, None]]
    barriers: dict[bytes, dict[Waiter, None]]
    bound: dict[bytes, object]
    park: Callable[[bytes, Callable[[Waiter], None], object], Waiter]


class Journal(Protocol):
    """Receives every state change of an :class:`Engine`, after it is applied, in order.

    Replaying the calls on an empty engine (:meth:`Engine.apply_set` and friends) rebuilds
    the state; counters, barriers and compare_set arrive as the resulting ``on_set``, so
    replay is deterministic. Used by :mod:`rdzv.server.persistence` for durability.
    """

    def on_set(self, key: bytes, value: bytes) -> None: ...

    def on_append(self, key: bytes, value: bytes) -> None: ...

    def on_delete(self, key: bytes) -> None: ...

    def on_queue_push(self, key: bytes, value: bytes) -> None: ...

    def on_queue_pop(self, key: bytes) -> None: ...


class Engine:
    """In-memory store state machine; see the module docstring for the rules.

    Not thread-safe: the wrapper serialises calls (HashStore with a lock, the server by
    running on one event loop). ``journal``, if given, is told every state change.
    """

    __slots__ = ("_barriers", "_data", "_journal", "_queues", "_waiters")

    def __init__(self, journal: Journal | None = None) -> None:
        self._journal = journal
        self._data: dict[bytes, bytes] = {}
        self._queues: dict[bytes, deque[bytes]] = {}
        # key -> waiters registered on it, in registration order (dicts keep order).
        self._waiters: dict[bytes, dict[Waiter, None]] = {}
        # barrier key -> waiters parked until the counter reaches their target.
        self._barriers: dict[bytes, dict[Waiter, None]] = {}

    # ----------------------------------------------------------------- plain values
    def get(self, key: bytes) -> bytes | None:
        """The value of ``key``, or ``None`` when absent (queues are not values)."""
        return self._data.get(key)

    def set(self, key: bytes, value: bytes) -> None:
        """Insert or overwrite ``key`` and wake its waiters."""
        self._data[key] = value
        if self._journal is not None:
            self._journal.on_set(key, value)
        self._fire(key)

    def multi_set(self, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
        """``set`` each pair in order. Raises ValueError (and changes nothing) on a length
        mismatch, where torch's HashStore has undefined behaviour."""
        if len(keys) != len(values):
            raise ValueError(
                f"multi_set: got {len(keys)} keys but {len(values)} values; pass one value per key"
            )
        for key, value in zip(keys, values, strict=True):
            self.set(key, value)

    def multi_get(self, keys: Iterable[bytes]) -> list[bytes | None]:
        """The values of ``keys`` in order, ``None`` for absent keys."""
        data = self._data
        return [data.get(k) for k in keys]

    def append(self, key: bytes, value: bytes) -> None:
        """Concatenate ``value`` to ``key`` (created when absent) and wake its waiters."""
        old = self._data.get(key)
        self._data[key] = value if old is None else old + value
        if self._journal is not None:
            self._journal.on_append(key, value)
        self._fire(key)

    def add(self, key: bytes, amount: int) -> int:
        """Add ``amount`` to the counter under ``key`` (absent: starts at 0); return the sum.

        Wakes the key's waiters and releases barrier waiters whose target is reached.
        Raises :class:`CounterError` if the stored value is not an integer or the sum leaves
        int64; the store is unchanged then.
        """
        old = self._data.get(key)
        total = amount if old is None else parse_counter(key, old) + amount
        if not INT64_MIN <= total <= INT64_MAX:
            raise CounterError(
                f"add: {old!r} + {amount} under key {show_key(key)} overflows int64 "
                f"(limit {INT64_MAX if total > 0 else INT64_MIN})"
            )
        stored = self._data[key] = format_counter(total)
        if self._journal is not None:
            self._journal.on_set(key, stored)
        self._fire(key)
        self._release_barrier(key, total)
        return total

    def compare_set(self, key: bytes, expected: bytes, desired: bytes) -> bytes:
        """Atomic compare-and-set with torch's truth table
        (same semantics as ``torch.distributed.Store.compare_set``):

        ============  ===============  ==============  ============
        key state     ``expected``     effect          returns
        ============  ===============  ==============  ============
        absent        empty            key = desired   desired
        absent        non-empty        nothing         expected
        present == e  any              key = desired   desired
        present != e  any              nothing         current
        ============  ===============  ==============  ============

        Waiters of the key wake iff the key is present afterwards.
        """
        current = self._data.get(key)
        if current is None:
            if expected:
                return expected
            self._data[key] = desired
            if self._journal is not None:
                self._journal.on_set(key, desired)
            self._fire(key)
            return desired
        if current == expected:
            self._data[key] = desired
            if self._journal is not None:
                self._journal.on_set(key, desired)
            return desired
        return current

    def delete_key(self, key: bytes) -> bool:
        """Remove ``key`` from the value map; True if it was there. Wakes nobody; queues are
        untouched."""
        if self._data.pop(key, None) is None:
            return False
        if self._journal is not None:
            self._journal.on_delete(key)
        return True

    def check(self, keys: Iterable[bytes]) -> bool:
        """True iff every key is present: a value, or a non-empty queue (like torch)."""
        return all(self._present(k) for k in keys)

    def num_keys(self) -> int:
        """Number of entries in the value map (queues are not counted, like torch)."""
        return len(self._data)

    def list_keys(self) -> list[bytes]:
        """Every key of the value map, in insertion order."""
        return list(self._data)

    def items(self) -> Iterable[tuple[bytes, bytes]]:
        """A read-only view of the value map (for snapshots and tooling)."""
        return self._data.items()

    # ----------------------------------------------------------------- queues
    def queue_push(self, key: bytes, value: bytes) -> None:
        """Append ``value`` to the FIFO ``key`` and wake exactly one waiter of ``key`` (a
        waiter for an item first, else one for either; see the module's waking rules)."""
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
        queue.append(value)
        if self._journal is not None:
            self._journal.on_queue_push(key, value)
        self._fire_one(key)

    def queue_pop(self, key: bytes) -> bytes | None:
        """Pop the front of FIFO ``key``; ``None`` when it is empty or unknown."""
        queue = self._queues.get(key)
        if not queue:
            return None
        value = queue.popleft()
        if not queue:
            del self._queues[key]
        if self._journal is not None:
            self._journal.on_queue_pop(key)
        return value

    def queue_len(self, key: bytes) -> int:
        """Length of FIFO ``key`` (0 when unknown)."""
        queue = self._queues.get(key)
        return 0 if queue is None else len(queue)

    def queues(self) -> Iterable[tuple[bytes, Iterable[bytes]]]:
        """A read-only view of the non-empty queues (for snapshots and tooling)."""
        return self._queues.items()

    # ----------------------------------------------------------------- replay
    # Applying journal records rebuilds state without journaling or waking anyone: replay
    # happens before any client can wait.
    def apply_set(self, key: bytes, value: bytes) -> None:
        self._data[key] = value

    def apply_append(self, key: bytes, value: bytes) -> None:
        self._data[key] = self._data.get(key, b"") + value

    def apply_delete(self, key: bytes) -> None:
        self._data.pop(key, None)

    def apply_queue_push(self, key: bytes, value: bytes) -> None:
        self._queues.setdefault(key, deque()).append(value)

    def apply_queue_pop(self, key: bytes) -> None:
        queue = self._queues.get(key)
        if queue:
            queue.popleft()
            if not queue:
                del self._queues[key]

    def set_journal(self, journal: Journal | None) -> None:
        """Attach (or detach) the journal, e.g. after a replay."""
        self._journal = journal

    # ----------------------------------------------------------------- waiting
    def wait(
        self,
        keys: Iterable[bytes],
        callback: Callable[[Waiter], None],
        owner: object = None,
        only: str | None = None,
    ) -> Waiter | None:
        """Register interest in ``keys``. Returns ``None`` if all are present now (nothing is
        registered, the callback is not called); otherwise a :class:`Waiter` whose callback
        fires once every key missing *now* has become present at some point (keys present
        now are not re-checked later, as in torch's server).

        A key is present when it holds a value or names a non-empty queue; ``only="value"``
        counts values only (what a blocking ``get`` needs), ``only="queue"`` non-empty queues
        only (what a blocking ``queue_pop`` needs).
        """
        if only is None:
            missing = {k for k in keys if not self._present(k)}
        elif only == "value":
            missing = {k for k in keys if k not in self._data}
        elif only == "queue":
            missing = {k for k in keys if not self._queues.get(k)}
        else:
            raise ValueError(f"wait: only must be None, 'value' or 'queue', not {only!r}")
        if not missing:
            return None
        waiter = Waiter(missing, callback, owner, only=only)
        for key in missing:
            self._waiters.setdefault(key, {})[waiter] = None
        return waiter

    def barrier(
        self,
        key: bytes,
        world_size: int,
        callback: Callable[[Waiter], None],
        owner: object = None,
    ) -> Waiter | None:
        """Arrive at the barrier ``key`` for ``world_size`` participants.

        The arrival counter lives under ``key`` in the value map (ASCII decimal, as in torch's
        server). Arrival number ``c`` belongs to generation ``ceil(c / world_size)`` and is
        released when the counter reaches ``generation * world_size``; so the first use of a
        key behaves exactly as torch's server, and a key can be reused for the next barrier
        (torch releases a reused key at once, a documented difference). Returns ``None`` when
        this arrival releases (or finds released) its generation; else a parked waiter.
        Raises ValueError for ``world_size < 1`` and :class:`CounterError` if the key holds
        a non-integer.
        """
        if world_size < 1:
            raise ValueError(
                f"barrier: world_size must be >= 1, got {world_size} for {show_key(key)}"
            )
        count = self.add(key, 1)
        target = -(-count // world_size) * world_size
        if count >= target:
            return None
        waiter = Waiter({key}, callback, owner, barrier_target=target)
        self._barriers.setdefault(key, {})[waiter] = None
        return waiter

    def cancel(self, waiter: Waiter) -> bool:
        """Unregister ``waiter``; True if it was still registered (had not fired)."""
        table = self._waiters if waiter.barrier_target is None else self._barriers
        registered = False
        for key in waiter.missing:
            registry = table.get(key)
            if registry is not None and waiter in registry:
                del registry[waiter]
                registered = True
                if not registry:
                    del table[key]
        waiter.missing = set()
        return registered

    def release(self, waiter: Waiter, budget: int) -> bool:
        """Unregister at most ``budget`` of ``waiter``'s keys: :meth:`cancel` in steps, so
        that dropping a waiter of many keys need not hold the caller for long. Returns True
        once none is left registered. The caller must ignore the waiter's callback from the
        first step on (its remaining keys may still arrive and fire it)."""
        table = self._waiters if waiter.barrier_target is None else self._barriers
        missing = waiter.missing
        for _ in range(min(budget, len(missing))):
            key = missing.pop()
            registry = table.get(key)
            if registry is not None and waiter in registry:
                del registry[waiter]
                if not registry:
                    del table[key]
        return not missing

    def park(self, key: bytes, callback: Callable[[Waiter], None], owner: object = None) -> Waiter:
        """Register a waiter on one key the caller knows to be absent (no value, no queue
        item), for a value or an item: :meth:`wait` without the presence check, for the C
        fast path (see :class:`FastPathTables`)."""
        waiter = Waiter({key}, callback, owner)
        registry = self._waiters.get(key)
        if registry is None:
            self._waiters[key] = {waiter: None}
        else:
            registry[waiter] = None
        return waiter

    def fastpath_tables(self, bound: dict[bytes, object]) -> FastPathTables:
        """The narrow interface of the C fast path: this engine's dictionaries and its
        :meth:`park`, with the rules the fast path must follow (see :class:`FastPathTables`).
        ``bound`` is the server's map of bound keys (until the engine holds them). Raises
        ValueError if the engine has a journal (the fast path does not journal)."""
        if self._journal is not None:
            raise ValueError("the fast path cannot serve an engine with a journal")
        return FastPathTables(
            self._data, self._queues, self._waiters, self._barriers, bound, self.park
        )

    def value_bytes(self) -> int:
        """Bytes of every value and queue item. Safe to call from another thread than the
        owner's: it sums copies (a dict's values, a deque) taken in C without releasing the
        GIL, retrying if a copy met a concurrent change. O(keys + queue items)."""
        for _ in range(3):
            try:
                total = sum(map(len, list(self._data.values())))
                for queue in list(self._queues.values()):
                    total += sum(map(len, list(queue)))
                return total
            except RuntimeError:  # changed while copied (an allocation ran a finalizer)
                continue
        return -1

    def num_waiters(self) -> int:
        """Number of distinct registered waiters (for metrics and tests)."""
        seen: set[Waiter] = set()
        for registry in self._waiters.values():
            seen.update(registry)
        for parked in self._barriers.values():
            seen.update(parked)
        return len(seen)

    # ----------------------------------------------------------------- internals
    def _present(self, key: bytes) -> bool:
        return key in self._data or bool(self._queues.get(key))

    def _fire(self, key: bytes) -> None:
        """A value was written under ``key``: wake every waiter a value satisfies."""
        registry = self._waiters.get(key)
        if registry is None:
            return
        woken = [w for w in registry if w.only != "queue"]
        if len(woken) == len(registry):
            del self._waiters[key]
        else:
            for waiter in woken:
                del registry[waiter]
        for waiter in woken:
            self._satisfy(waiter, key)

    def _fire_one(self, key: bytes) -> None:
        """An item was pushed to the queue ``key``: wake the longest-registered waiter for
        an item, else the longest-registered waiter for either."""
        registry = self._waiters.get(key)
        if not registry:
            return
        waiter = next((w for w in registry if w.only == "queue"), None)
        if waiter is None:
            waiter = next((w for w in registry if w.only is None), None)
            if waiter is None:
                return
        del registry[waiter]
        if not registry:
            del self._waiters[key]
        self._satisfy(waiter, key)

    def _satisfy(self, waiter: Waiter, key: bytes) -> None:
        waiter.missing.discard(key)
        if not waiter.missing:
            waiter.callback(waiter)

    def _release_barrier(self, key: bytes, count: int) -> None:
        parked = self._barriers.get(key)
        if not parked:
            return
        released = [w for w in parked if w.barrier_target is not None and w.barrier_target <= count]
        for waiter in released:
            del parked[waiter]
        if not parked:
            del self._barriers[key]
        for waiter in released:
            waiter.missing = set()
            waiter.callback(waiter)
