"""The sans-I/O key-value state machine shared by HashStore and the TCP server.

:class:`Engine` owns the whole data model of a store, and every waiting semantic:

* values: ``bytes -> bytes``;
* integer counters, stored in the value map as ASCII decimal like torch (``add`` parses the
  old value with C ``strtoll`` rules, see :func:`parse_counter`);
* FIFO queues, a namespace of their own (``queue_push``/``queue_pop``);
* barrier counters, stored under the barrier key in the value map;
* the registry of typed :class:`Waiter` objects: who waits for what, and what they get;
* bound keys: a key bound to an owner (``set_ephemeral``: a connection) is deleted when the
  owner closes (:meth:`Engine.owner_closed`); a leased key (``set_lease``) when its deadline
  passes (:meth:`Engine.expire`). Any later write of the key makes it ordinary again.

It never blocks, never sleeps and never touches a socket, thread or clock. Blocking is the
wrapper's business: HashStore parks threads on events, the server parks connections. Time is
the wrapper's too: lease deadlines are numbers on the wrapper's clock, and the wrapper calls
:meth:`Engine.expire` with its "now" once :meth:`Engine.next_deadline` has passed (the
expiry hook). A waiter registration carries a callback; when an operation satisfies the
waiter, the engine unregisters it, stores what it waited for in ``waiter.result`` and calls
the callback synchronously, before the operation returns. The callback must not call back
into the engine. So a woken waiter never re-reads the store: a blocking ``get`` is handed
the value that woke it, a blocking ``queue_pop`` the item it popped, in the same step.

Keys are ``bytes`` exactly as they travel on the wire (torch clients send ``"/" + key``);
the stores above decide the namespace. The engine imposes no size limits; the codec does.

Waiter kinds (:class:`Waiter` ``kind``):

* :data:`WAIT` (:meth:`Engine.wait`): every one of several keys present at some point, as a
  value or a non-empty queue (torch's WAIT); keys present at registration are not re-checked;
* :data:`GET` (:meth:`Engine.get_wait`): a value under one key; ``result`` is that value;
* :data:`MULTI_GET` (:meth:`Engine.multi_get_wait`): values under all of several keys at
  once; ``result`` is the list of values (a key deleted before the last one arrived is
  waited for again, inside the engine);
* :data:`QUEUE_POP` (:meth:`Engine.queue_pop_wait`): an item of one queue; ``result`` is the
  item, popped for the waiter by the push that woke it;
* :data:`BARRIER` (:meth:`Engine.barrier`): a barrier generation released.

Waking rules (a superset of torch's libuv server, minus its accidents):

* ``set``, ``append``, ``multi_set``, ``add``, ``barrier`` and a ``compare_set`` that leaves
  the key present wake every waiter of the key that a value can satisfy (:data:`WAIT`,
  :data:`GET`, :data:`MULTI_GET`; torch's HashStore forgets ``add``; torch's libuv server
  also wakes on a failed ``compare_set`` of a missing key, a spurious wake-up);
  :data:`QUEUE_POP` waiters stay parked;
* ``queue_push`` wakes exactly one waiter of the key (as torch's ``notify_one``): the
  longest-registered :data:`QUEUE_POP` waiter, which gets the item, else the
  longest-registered :data:`WAIT` waiter (a torch client's WAIT cannot say what it waits
  for; the item stays in the queue). :data:`GET` and :data:`MULTI_GET` waiters stay parked.
  So a pushed item goes to a waiting ``queue_pop`` rather than to an earlier ``get`` that
  cannot use it (torch's HashStore hands it to the pop too); between torch clients, the
  wire protocol decides;
* ``add`` (and so ``barrier``) releases the key's barrier waiters whose target is reached;
* ``delete_key``, an owner closing and a lease expiring wake nobody.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple, Protocol

from rdzv.errors import CounterError

__all__ = [
    "BARRIER",
    "GET",
    "INT64_MAX",
    "INT64_MIN",
    "MULTI_GET",
    "QUEUE_POP",
    "WAIT",
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


#: Waiter kinds; see the module docstring.
WAIT = "wait"
GET = "get"
MULTI_GET = "multi_get"
QUEUE_POP = "queue_pop"
BARRIER = "barrier"


class Waiter:
    """One registration in the waiter registry.

    ``kind`` is what it waits for (:data:`WAIT`, :data:`GET`, :data:`MULTI_GET`,
    :data:`QUEUE_POP`, :data:`BARRIER`). ``missing`` holds the keys still awaited; the engine
    empties it. ``callback(waiter)`` is called once, when the waiter is satisfied; by then
    ``result`` holds what it waited for (the value for :data:`GET`, the list of values for
    :data:`MULTI_GET`, the popped item for :data:`QUEUE_POP`; None for the others).
    ``owner`` is free for the wrapper (a connection, an event). ``keys`` are the keys of a
    :data:`MULTI_GET`, in request order; ``barrier_target`` the counter value that releases a
    :data:`BARRIER` waiter.
    """

    __slots__ = ("barrier_target", "callback", "keys", "kind", "missing", "owner", "result")

    def __init__(
        self,
        missing: set[bytes],
        callback: Callable[[Waiter], None],
        owner: object = None,
        kind: str = WAIT,
        keys: list[bytes] | None = None,
        barrier_target: int | None = None,
    ) -> None:
        self.missing = missing
        self.callback = callback
        self.owner = owner
        self.kind = kind
        self.keys = keys
        self.barrier_target = barrier_target
        self.result: bytes | list[bytes] | None = None

    def __repr__(self) -> str:
        return f"Waiter({self.kind}, missing={sorted(self.missing)!r})"


_UNBOUND = object()


class _Lease:
    """A key's lease: the deadline, on the wrapper's clock, at which the key is deleted."""

    __slots__ = ("deadline", "key")

    def __init__(self, key: bytes, deadline: float) -> None:
        self.key = key
        self.deadline = deadline


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
    * ``park(key, callback, owner) -> Waiter``: registers a :data:`WAIT` waiter (for a
      value or an item, as a torch WAIT) on one key that is absent now (no value, no queue
      item; the caller checked). Its callback fires, as any waiter's, when the key becomes
      present.

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
    replay is deterministic. ``mark_volatile(key)`` follows the ``on_set`` of a key bound to
    an owner or a lease: such a key does not survive a restart. Used by
    :mod:`rdzv.server.persistence` for durability.
    """

    def on_set(self, key: bytes, value: bytes) -> None: ...

    def on_append(self, key: bytes, value: bytes) -> None: ...

    def on_delete(self, key: bytes) -> None: ...

    def on_queue_push(self, key: bytes, value: bytes) -> None: ...

    def on_queue_pop(self, key: bytes) -> None: ...

    def mark_volatile(self, key: bytes) -> None: ...


class Engine:
    """In-memory store state machine; see the module docstring for the rules.

    Not thread-safe: the wrapper serialises calls (HashStore with a lock, the server by
    running on one event loop). ``journal``, if given, is told every state change.
    """

    __slots__ = (
        "_barriers",
        "_bound",
        "_data",
        "_journal",
        "_lease_seq",
        "_leases",
        "_owned",
        "_queues",
        "_waiters",
    )

    def __init__(self, journal: Journal | None = None) -> None:
        self._journal = journal
        self._data: dict[bytes, bytes] = {}
        self._queues: dict[bytes, deque[bytes]] = {}
        # key -> waiters registered on it, in registration order (dicts keep order).
        self._waiters: dict[bytes, dict[Waiter, None]] = {}
        # barrier key -> waiters parked until the counter reaches their target.
        self._barriers: dict[bytes, dict[Waiter, None]] = {}
        # bound key -> its owner (set_ephemeral) or its _Lease (set_lease).
        self._bound: dict[bytes, object] = {}
        # owner -> the keys bound to it.
        self._owned: dict[object, set[bytes]] = {}
        # (deadline, sequence, lease) min-heap; entries of leases since replaced stay until
        # they reach the top (lazy deletion).
        self._leases: list[tuple[float, int, _Lease]] = []
        self._lease_seq = 0

    # ----------------------------------------------------------------- plain values
    def get(self, key: bytes) -> bytes | None:
        """The value of ``key``, or ``None`` when absent (queues are not values)."""
        return self._data.get(key)

    def set(self, key: bytes, value: bytes) -> None:
        """Insert or overwrite ``key`` (unbinding it) and wake its waiters."""
        if self._bound:
            self._unbind(key)
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
        """Concatenate ``value`` to ``key`` (created when absent; unbinds it) and wake its
        waiters."""
        if self._bound:
            self._unbind(key)
        old = self._data.get(key)
        self._data[key] = value if old is None else old + value
        if self._journal is not None:
            self._journal.on_append(key, value)
        self._fire(key)

    def add(self, key: bytes, amount: int) -> int:
        """Add ``amount`` to the counter under ``key`` (absent: starts at 0); return the sum.

        Unbinds the key, wakes its waiters and releases barrier waiters whose target is
        reached. Raises :class:`CounterError` if the stored value is not an integer or the
        sum leaves int64; the store is unchanged then.
        """
        old = self._data.get(key)
        total = amount if old is None else parse_counter(key, old) + amount
        if not INT64_MIN <= total <= INT64_MAX:
            raise CounterError(
                f"add: {old!r} + {amount} under key {show_key(key)} overflows int64 "
                f"(limit {INT64_MAX if total > 0 else INT64_MIN})"
            )
        if self._bound:
            self._unbind(key)
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

        A write unbinds the key. Waiters of the key wake iff the key is present afterwards.
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
            if self._bound:
                self._unbind(key)
            self._data[key] = desired
            if self._journal is not None:
                self._journal.on_set(key, desired)
            return desired
        return current

    def delete_key(self, key: bytes) -> bool:
        """Remove ``key`` from the value map (unbinding it); True if it was there. Wakes
        nobody; queues are untouched."""
        if self._bound:
            self._unbind(key)
        return self._delete(key)

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

    # ----------------------------------------------------------------- bound keys, leases
    def set_ephemeral(self, key: bytes, value: bytes, owner: object) -> None:
        """``set`` the key and bind it to ``owner`` (any hashable object: the server passes
        the connection): :meth:`owner_closed` deletes it. A later write of the key (by
        anyone) makes it ordinary again; setting it again binds it to the new owner."""
        self.set(key, value)
        self._bound[key] = owner
        owned = self._owned.get(owner)
        if owned is None:
            self._owned[owner] = {key}
        else:
            owned.add(key)
        if self._journal is not None:
            self._journal.mark_volatile(key)

    def set_lease(self, key: bytes, value: bytes, deadline: float) -> None:
        """``set`` the key with a lease: :meth:`expire` deletes it once its "now" reaches
        ``deadline`` (a time on the wrapper's clock, e.g. ``loop.time() + ttl`` seconds).
        Setting it again with a lease renews it (the new deadline replaces the old one); a
        plain write makes it ordinary. The caller validates the TTL."""
        self.set(key, value)
        lease = _Lease(key, deadline)
        self._bound[key] = lease
        self._lease_seq += 1
        heapq.heappush(self._leases, (deadline, self._lease_seq, lease))
        if self._journal is not None:
            self._journal.mark_volatile(key)

    def owner_closed(self, owner: object) -> list[bytes]:
        """Delete every key still bound to ``owner`` (its connection closed); return them.
        Wakes nobody. Idempotent."""
        keys = self._owned.pop(owner, None)
        if not keys:
            return []
        bound = self._bound
        for key in keys:
            del bound[key]
            self._delete(key)
        return list(keys)

    def next_deadline(self) -> float | None:
        """The earliest deadline of a live lease, or None without leases: the wrapper calls
        :meth:`expire` once its clock reaches it."""
        heap = self._leases
        bound = self._bound
        while heap:
            deadline, _, lease = heap[0]
            if bound.get(lease.key) is lease:
                return deadline
            heapq.heappop(heap)  # replaced or unbound since
        return None

    def expire(self, now: float) -> list[bytes]:
        """Delete every leased key whose deadline is ``<= now``; return them. Wakes nobody."""
        heap = self._leases
        bound = self._bound
        expired: list[bytes] = []
        while heap and heap[0][0] <= now:
            lease = heapq.heappop(heap)[2]
            if bound.get(lease.key) is lease:
                del bound[lease.key]
                self._delete(lease.key)
                expired.append(lease.key)
        return expired

    def bound_keys(self) -> list[bytes]:
        """The keys bound to an owner or a lease, in binding order (for tooling and tests)."""
        return list(self._bound)

    # ----------------------------------------------------------------- queues
    def queue_push(self, key: bytes, value: bytes) -> None:
        """Append ``value`` to the FIFO ``key`` and wake exactly one waiter of ``key`` (a
        :data:`QUEUE_POP` waiter first, which gets the item, else a :data:`WAIT` waiter;
        see the module's waking rules)."""
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
        queue.append(value)
        if self._journal is not None:
            self._journal.on_queue_push(key, value)
        if key in self._waiters:
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
        self, keys: Iterable[bytes], callback: Callable[[Waiter], None], owner: object = None
    ) -> Waiter | None:
        """Register a :data:`WAIT` waiter on ``keys``. Returns ``None`` if all are present
        now (nothing is registered, the callback is not called); otherwise a :class:`Waiter`
        whose callback fires once every key missing *now* has become present at some point
        (keys present now are not re-checked later, as in torch's server). A key is present
        when it holds a value or names a non-empty queue."""
        missing = {k for k in keys if not self._present(k)}
        if not missing:
            return None
        waiter = Waiter(missing, callback, owner)
        self._register(waiter)
        return waiter

    def park(self, key: bytes, callback: Callable[[Waiter], None], owner: object = None) -> Waiter:
        """Register a :data:`WAIT` waiter on one key the caller knows to be absent (no value,
        no queue item): :meth:`wait` without the presence check, for the C fast path (see
        :class:`FastPathTables`)."""
        waiter = Waiter({key}, callback, owner)
        registry = self._waiters.get(key)
        if registry is None:
            self._waiters[key] = {waiter: None}
        else:
            registry[waiter] = None
        return waiter

    def get_wait(
        self, key: bytes, callback: Callable[[Waiter], None], owner: object = None
    ) -> bytes | Waiter:
        """The value of ``key`` if present; else a parked :data:`GET` waiter whose
        ``result`` is the value that wakes it (set, append, add, compare_set, barrier)."""
        value = self._data.get(key)
        if value is not None:
            return value
        waiter = Waiter({key}, callback, owner, GET)
        self._register(waiter)
        return waiter

    def multi_get_wait(
        self, keys: list[bytes], callback: Callable[[Waiter], None], owner: object = None
    ) -> list[bytes] | Waiter:
        """The values of ``keys`` (in order) if all are present; else a parked
        :data:`MULTI_GET` waiter whose ``result`` is the list of values, read at the moment
        the last missing key arrived (a key deleted meanwhile is waited for again)."""
        data = self._data
        values = [data.get(k) for k in keys]
        missing = {k for k, v in zip(keys, values, strict=True) if v is None}
        if not missing:
            return values  # type: ignore[return-value]  # none is None
        waiter = Waiter(missing, callback, owner, MULTI_GET, list(keys))
        self._register(waiter)
        return waiter

    def queue_pop_wait(
        self, key: bytes, callback: Callable[[Waiter], None], owner: object = None
    ) -> bytes | Waiter:
        """Pop the front of FIFO ``key`` if it has one; else a parked :data:`QUEUE_POP`
        waiter whose ``result`` is the item that wakes it, popped for it by that push."""
        value = self.queue_pop(key)
        if value is not None:
            return value
        waiter = Waiter({key}, callback, owner, QUEUE_POP)
        self._register(waiter)
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
        this arrival releases (or finds released) its generation; else a parked
        :data:`BARRIER` waiter. Raises ValueError for ``world_size < 1`` and
        :class:`CounterError` if the key holds a non-integer.
        """
        if world_size < 1:
            raise ValueError(
                f"barrier: world_size must be >= 1, got {world_size} for {show_key(key)}"
            )
        count = self.add(key, 1)
        target = -(-count // world_size) * world_size
        if count >= target:
            return None
        waiter = Waiter({key}, callback, owner, BARRIER, barrier_target=target)
        self._barriers.setdefault(key, {})[waiter] = None
        return waiter

    def cancel(self, waiter: Waiter) -> bool:
        """Unregister ``waiter``; True if it was still registered (had not fired). A waiter
        that fired keeps its ``result``."""
        table = self._barriers if waiter.kind == BARRIER else self._waiters
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
        table = self._barriers if waiter.kind == BARRIER else self._waiters
        missing = waiter.missing
        for _ in range(min(budget, len(missing))):
            key = missing.pop()
            registry = table.get(key)
            if registry is not None and waiter in registry:
                del registry[waiter]
                if not registry:
                    del table[key]
        return not missing

    def fastpath_tables(self) -> FastPathTables:
        """The narrow interface of the C fast path: this engine's dictionaries and its
        :meth:`park`, with the rules the fast path must follow (see :class:`FastPathTables`).
        Raises ValueError if the engine has a journal (the fast path does not journal)."""
        if self._journal is not None:
            raise ValueError("the fast path cannot serve an engine with a journal")
        return FastPathTables(
            self._data, self._queues, self._waiters, self._barriers, self._bound, self.park
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

    def num_waiting_keys(self) -> int:
        """Number of keys some waiter is registered on (barriers apart; for tests)."""
        return len(self._waiters)

    # ----------------------------------------------------------------- internals
    def _present(self, key: bytes) -> bool:
        return key in self._data or bool(self._queues.get(key))

    def _register(self, waiter: Waiter) -> None:
        waiters = self._waiters
        for key in waiter.missing:
            registry = waiters.get(key)
            if registry is None:
                waiters[key] = {waiter: None}
            else:
                registry[waiter] = None

    def _delete(self, key: bytes) -> bool:
        if self._data.pop(key, None) is None:
            return False
        if self._journal is not None:
            self._journal.on_delete(key)
        return True

    def _unbind(self, key: bytes) -> None:
        owner = self._bound.pop(key, _UNBOUND)
        if owner is _UNBOUND or type(owner) is _Lease:
            return  # a lease's heap entry goes when it reaches the top
        owned = self._owned[owner]
        owned.discard(key)
        if not owned:
            del self._owned[owner]

    def _fire(self, key: bytes) -> None:
        """A value was written under ``key``: wake every waiter a value satisfies."""
        registry = self._waiters.get(key)
        if registry is None:
            return
        woken = [w for w in registry if w.kind != QUEUE_POP]
        if len(woken) == len(registry):
            del self._waiters[key]
        else:
            for waiter in woken:
                del registry[waiter]
        for waiter in woken:
            missing = waiter.missing
            missing.discard(key)
            if missing:
                continue
            kind = waiter.kind
            if kind == GET:
                waiter.result = self._data[key]
            elif kind == MULTI_GET and not self._collect(waiter):
                continue
            waiter.callback(waiter)

    def _collect(self, waiter: Waiter) -> bool:
        """A :data:`MULTI_GET` waiter's last key arrived: store its values, or register it
        again on the keys deleted meanwhile (False)."""
        keys = waiter.keys
        assert keys is not None
        data = self._data
        values = [data.get(k) for k in keys]
        missing = {k for k, v in zip(keys, values, strict=True) if v is None}
        if missing:
            waiter.missing = missing
            self._register(waiter)
            return False
        waiter.result = values  # type: ignore[assignment]  # none is None
        return True

    def _fire_one(self, key: bytes) -> None:
        """An item was pushed to the queue ``key``: hand it to the longest-registered
        :data:`QUEUE_POP` waiter, else wake the longest-registered :data:`WAIT` waiter."""
        registry = self._waiters[key]
        waiter = next((w for w in registry if w.kind == QUEUE_POP), None)
        if waiter is None:
            waiter = next((w for w in registry if w.kind == WAIT), None)
            if waiter is None:
                return
        del registry[waiter]
        if not registry:
            del self._waiters[key]
        missing = waiter.missing
        missing.discard(key)
        if missing:
            return
        if waiter.kind == QUEUE_POP:
            waiter.result = self.queue_pop(key)
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
