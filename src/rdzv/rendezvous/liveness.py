"""Liveness for the dynamic rendezvous: how a node proves it is alive, how peers find out it
is not. Pluggable: :class:`Liveness` is the interface the handler uses; this module provides
:class:`HeartbeatLiveness`, which works on any :class:`~rdzv.store.base.Store`. A backend with
native leases (etcd) implements the same interface with a lease-bound key instead.

The contract, per *liveness key* (one per slot of a round, chosen by the handler):

* the owner calls :meth:`Liveness.announce` once (its entries are written together with the
  node descriptor), then :meth:`Liveness.keep_alive` every ``keep_alive_interval``;
* the owner calls :meth:`Liveness.retire` when it leaves the slot;
* observers call :meth:`LivenessObserver.observe` periodically on the keys they watch; it
  reports each key as alive, gone (retired or already declared dead: terminal) or *declared*
  (this very call found it dead and marked it so: exactly one observer ever gets
  ``DECLARED`` for a key, so the caller can account for the death exactly once).

Nothing compares wall clocks: :class:`HeartbeatLiveness` keys hold counters that the owner
increments; an observer declares a key dead when the counter has not changed for
``keep_alive_interval * keep_alive_max_attempt`` seconds *of the observer's own monotonic
clock*. Clock skew between machines, NTP steps and time-zone changes are irrelevant.
"""

from __future__ import annotations

import contextlib
import enum
import threading
from abc import ABC, abstractmethod

from rdzv.errors import RendezvousStateError, StoreTimeoutError
from rdzv.rendezvous.ops import NOW, Call, Check, CompareSet, MultiGet, Program, Wait, run_blocking
from rdzv.store.base import Store

__all__ = [
    "HeartbeatLiveness",
    "Liveness",
    "LivenessObserver",
    "Status",
]

#: Marker written by the owner when it leaves its slot.
LEFT = b"left"
#: Prefix of the marker written by the observer that declares a key dead (followed by the
#: observer's token, so that compare_set tells the winner apart from the losers).
DEAD_PREFIX = b"dead:"


class Status(enum.Enum):
    """What an observer learned about a liveness key."""

    ALIVE = "alive"
    #: Retired by its owner or declared dead earlier (terminal).
    GONE = "gone"
    #: Declared dead by this observe() call (reported to exactly one observer).
    DECLARED = "declared"


class LivenessObserver(ABC):
    """Stateful watcher of liveness keys (one per watching thread)."""

    @abstractmethod
    def observe(self, store: Store, keys: list[str]) -> dict[str, Status]:
        """Look at ``keys`` once; declare dead the ones that have expired.

        Raises RendezvousStateError if a key holds something that is not a liveness value,
        store errors unchanged.
        """

    def observe_program(self, keys: list[str]) -> Program[dict[str, Status]]:
        """:meth:`observe` as a program (:mod:`rdzv.rendezvous.ops`); the default runs
        :meth:`observe` on a blocking store."""
        result: dict[str, Status] = yield Call(lambda store: self.observe(store, keys))
        return result

    @abstractmethod
    def forget(self, keys: list[str]) -> None:
        """Drop the history of ``keys`` (no longer watched)."""

    def last_change(self, key: str) -> float | None:
        """The ``time.monotonic()`` at which this observer last saw ``key`` change (its last
        heartbeat as far as it knows), None if it has no history of it."""
        return None

    @abstractmethod
    def next_deadline(self) -> float | None:
        """The earliest ``time.monotonic()`` at which :meth:`observe` could declare one of the
        watched keys dead (None when nothing is watched), so that the caller can wake up
        exactly then instead of polling."""


class Liveness(ABC):
    """How the nodes of a rendezvous prove they are alive (see the module docstring)."""

    @property
    @abstractmethod
    def expiry(self) -> float:
        """Seconds without proof of life after which a key is declared dead."""

    @abstractmethod
    def announce(self, key: str) -> list[tuple[str, bytes]]:
        """Start being alive at ``key``. Returns entries that the handler writes with the node
        descriptor, in one multi_set and after the descriptor (a backend that writes its own
        key here, e.g. with an etcd lease, returns ``[]``)."""

    @abstractmethod
    def keep_alive(self, store: Store, key: str) -> bool:
        """Renew ``key``. False if it has been retired or declared dead meanwhile (the owner
        then knows that its peers consider it gone). Store errors propagate."""

    @abstractmethod
    def retire(self, store: Store, key: str) -> bool:
        """Mark ``key`` as left (terminal). True if this call did it, False if the key was
        already declared dead (or no longer exists). Store errors propagate."""

    @abstractmethod
    def observer(self, token: str) -> LivenessObserver:
        """A new observer; ``token`` identifies it in the marks it writes."""

    def keep_alive_program(self, key: str) -> Program[bool]:
        """:meth:`keep_alive` as a program; the default runs it on a blocking store."""
        result: bool = yield Call(lambda store: self.keep_alive(store, key))
        return result

    def retire_program(self, key: str) -> Program[bool]:
        """:meth:`retire` as a program; the default runs it on a blocking store."""
        result: bool = yield Call(lambda store: self.retire(store, key))
        return result

    def snapshot_program(self, keys: list[str], token: str) -> Program[list[Status]]:
        """:meth:`snapshot` as a program; the default runs it on a blocking store."""
        result: list[Status] = yield Call(lambda store: self.snapshot(store, keys, token))
        return result

    def declare_dead(self, store: Store, key: str, token: str) -> bool:
        """Mark ``key`` dead now, on a verdict reached elsewhere (the launcher's heartbeat
        watch): compare_set from its current value to the dead marker of ``token``. True if
        this call marked it; False if it is missing, already gone, or kept changing (its
        owner is beating after all). Store errors propagate."""
        marker = DEAD_PREFIX + token.encode()
        for _ in range(8):
            if not store.check([key]):
                return False
            value = store.get(key)
            if _is_gone(value):
                return False
            if store.compare_set(key, value, marker) == marker:
                return True
        return False

    @abstractmethod
    def snapshot(self, store: Store, keys: list[str], token: str) -> list[Status]:
        """The status of every key *now*, for a decision that cannot wait (closing a round).

        A key that does not exist yet belongs to a node that took its slot but has not
        written it: wait for it up to :attr:`expiry`, then declare it dead (``DECLARED``
        for the caller that won). Existing keys are ALIVE unless retired/declared (GONE).
        Raises RendezvousStateError on a value that is not a liveness value.
        """


def _is_gone(value: bytes) -> bool:
    return value == LEFT or value.startswith(DEAD_PREFIX)


def _counter(key: str, value: bytes) -> int:
    if value.isdigit() and len(value) <= 20:
        return int(value)
    raise RendezvousStateError(
        f"the liveness key {key!r} holds {value[:48]!r}, which is neither a heartbeat counter "
        "nor a left/dead marker: the rendezvous state is corrupt or hostile"
    )


class HeartbeatLiveness(Liveness):
    """Liveness by heartbeat counters, on any Store (compare_set, check, wait, multi_get).

    The owner's key holds an ASCII counter that :meth:`keep_alive` increments (a
    compare_set from the value it wrote last: it fails on a retired or deleted key);
    ``left`` when its owner retired it; ``dead:<token>`` when an observer declared it dead.
    Declaring is a compare_set from the value the observer saw to its own marker: it fails if
    the owner beat in between (so a slow-but-alive node is never marked dead on a stale read)
    and succeeds for exactly one observer.

    Args:
        keep_alive_interval: seconds between heartbeats (> 0).
        keep_alive_max_attempt: missed heartbeats before a key is dead (>= 1).
    """

    def __init__(self, keep_alive_interval: float, keep_alive_max_attempt: int) -> None:
        if not keep_alive_interval > 0:
            raise ValueError(
                f"keep_alive_interval must be > 0 seconds, got {keep_alive_interval!r}"
            )
        if keep_alive_max_attempt < 1:
            raise ValueError(f"keep_alive_max_attempt must be >= 1, got {keep_alive_max_attempt!r}")
        self._expiry = keep_alive_interval * keep_alive_max_attempt
        self._lock = threading.Lock()
        self._last: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"HeartbeatLiveness(expiry={self._expiry}s)"

    @property
    def expiry(self) -> float:
        return self._expiry

    def announce(self, key: str) -> list[tuple[str, bytes]]:
        with self._lock:
            self._last[key] = 0
        return [(key, b"0")]

    def keep_alive(self, store: Store, key: str) -> bool:
        return run_blocking(store, self.keep_alive_program(key))

    def keep_alive_program(self, key: str) -> Program[bool]:
        # compare_set rather than add: a retired key ("left"/"dead:...") makes add fail, and
        # a torch server drops the connection on that; a deleted key must not be re-created.
        with self._lock:
            last = self._last.get(key)
        if last is None:
            return False
        expected = str(last).encode()
        desired = str(last + 1).encode()
        current: bytes = yield CompareSet(key, expected, desired)
        with self._lock:
            if current != desired or key not in self._last:
                # retired or declared dead (a marker), deleted with its round (compare_set
                # returns `expected` for a missing key), or retired by us meanwhile
                self._last.pop(key, None)
                if current != desired and current != expected and not _is_gone(current):
                    _counter(key, current)  # not a liveness value at all: corrupt
                return False
            self._last[key] = last + 1
        return True

    def retire(self, store: Store, key: str) -> bool:
        return run_blocking(store, self.retire_program(key))

    def retire_program(self, key: str) -> Program[bool]:
        with self._lock:
            last = self._last.pop(key, None)
        expected = b"0" if last is None else str(last).encode()
        for _ in range(64):
            current: bytes = yield CompareSet(key, expected, LEFT)
            if current == LEFT:
                return True
            if current.startswith(DEAD_PREFIX):
                return False
            if current == expected:
                return False  # the key does not exist (compare_set returns `expected`)
            _counter(key, current)  # a beat landed in between: retry from that value
            expected = current
        return False

    def observer(self, token: str) -> LivenessObserver:
        return _HeartbeatObserver(self._expiry, DEAD_PREFIX + token.encode())

    def snapshot(self, store: Store, keys: list[str], token: str) -> list[Status]:
        return run_blocking(store, self.snapshot_program(keys, token))

    def snapshot_program(self, keys: list[str], token: str) -> Program[list[Status]]:
        if not keys:
            return []
        try:  # one request when every key exists (the usual case)
            values: dict[str, bytes | None] = dict(
                zip(keys, (yield MultiGet(keys, 0.0)), strict=True)
            )
        except StoreTimeoutError:
            with contextlib.suppress(StoreTimeoutError):
                yield Wait(keys, self._expiry)
            values = yield from _read(keys)
        marker = DEAD_PREFIX + token.encode()
        result: list[Status] = []
        for key in keys:
            value = values[key]
            if value is None:
                value = yield CompareSet(key, b"", marker)
                if value == marker:
                    result.append(Status.DECLARED)
                    continue
            if _is_gone(value):
                result.append(Status.GONE)
            else:
                _counter(key, value)
                result.append(Status.ALIVE)
        return result


def _read(keys: list[str]) -> Program[dict[str, bytes | None]]:
    """The values of ``keys`` (None for missing ones) without blocking: one ``multi_get``
    that does not wait when all exist; otherwise the missing ones are found by halving (a
    few ``check`` calls: missing keys are rare, those of slots taken a moment ago)."""
    values: dict[str, bytes | None] = dict.fromkeys(keys)
    try:
        values.update(zip(keys, (yield MultiGet(keys, 0.0)), strict=True))
        return values
    except StoreTimeoutError:
        pass
    missing = set((yield from _find_missing(keys)))
    present = [k for k in keys if k not in missing]
    if present:
        values.update(zip(present, (yield MultiGet(present)), strict=True))
    return values


def _find_missing(keys: list[str]) -> Program[list[str]]:
    """The missing keys among ``keys``, known not to all exist."""
    if len(keys) == 1:
        return keys
    middle = len(keys) // 2
    missing: list[str] = []
    for half in (keys[:middle], keys[middle:]):
        if not (yield Check(half)):
            missing.extend((yield from _find_missing(half)))
    return missing


class _HeartbeatObserver(LivenessObserver):
    def __init__(self, expiry: float, marker: bytes) -> None:
        self._expiry = expiry
        self._marker = marker
        # key -> (value seen, monotonic time it was first seen); value None = key missing.
        self._seen: dict[str, tuple[bytes | None, float]] = {}

    def forget(self, keys: list[str]) -> None:
        for key in keys:
            self._seen.pop(key, None)

    def last_change(self, key: str) -> float | None:
        seen = self._seen.get(key)
        return None if seen is None else seen[1]

    def next_deadline(self) -> float | None:
        if not self._seen:
            return None
        return min(since for _, since in self._seen.values()) + self._expiry

    def observe(self, store: Store, keys: list[str]) -> dict[str, Status]:
        return run_blocking(store, self.observe_program(keys))

    def observe_program(self, keys: list[str]) -> Program[dict[str, Status]]:
        if not keys:
            return {}
        values = yield from _read(keys)
        now: float = yield NOW
        result: dict[str, Status] = {}
        for key, value in values.items():
            if value is not None and _is_gone(value):
                self._seen.pop(key, None)
                result[key] = Status.GONE
                continue
            if value is not None:
                _counter(key, value)
            seen = self._seen.get(key)
            if seen is None or seen[0] != value:
                self._seen[key] = (value, now)
                result[key] = Status.ALIVE
                continue
            if now - seen[1] < self._expiry:
                result[key] = Status.ALIVE
                continue
            current = yield CompareSet(key, b"" if value is None else value, self._marker)
            if current == self._marker:
                self._seen.pop(key, None)
                result[key] = Status.DECLARED
            elif _is_gone(current):
                self._seen.pop(key, None)
                result[key] = Status.GONE
            else:
                _counter(key, current)
                self._seen[key] = (current, now)
                result[key] = Status.ALIVE
        return result
