"""The background thread of a dynamic-rendezvous handler: heartbeats, and the pushed
doorbells behind ``num_nodes_waiting()``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from rdzv.errors import RendezvousError, StoreError, StoreTimeoutError
from rdzv.events import NodeState
from rdzv.rendezvous.liveness import Liveness
from rdzv.rendezvous.state import slot_count
from rdzv.store.base import Store

__all__ = ["KeepAlive"]

logger = logging.getLogger("rdzv.rendezvous.keepalive")


class KeepAlive:
    """The background thread of a handler: heartbeats, and while the node is a member of a
    completed round, the pushed doorbells behind its ``num_nodes_waiting()``.

    It has its own store handle (``store``, a clone of the handler's): the thread that runs
    ``next_rendezvous`` blocks in waits on the main one. It holds no reference to the
    handler, so a dropped handler is collected and its finalizer stops the thread (as
    torch's ``_PeriodicTimer``).
    """

    def __init__(
        self,
        store: Store,
        liveness: Liveness,
        interval: float,
        heartbeat_timeout: float,
        name: str,
        record: Callable[[str, NodeState], None],
    ) -> None:
        self._store = store
        self._liveness = liveness
        self._interval = interval
        self._heartbeat_timeout = heartbeat_timeout
        self._record = record
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # the mode changed, or stop
        self._key: str | None = None
        # Running mode: the keys whose existence means "nodes are waiting", the counters
        # that say how many, and the cached answer.
        self._doorbells: list[str] = []
        self._count_keys: tuple[str, str] | None = None
        self._rung = False
        self._waiting = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def name(self) -> str:
        return self._thread.name

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def track(self, key: str | None) -> None:
        """Beat ``key`` from now on (None: nothing)."""
        with self._lock:
            self._key = key

    def set_pending(self) -> None:
        with self._lock:
            self._doorbells = []
            self._count_keys = None
            self._rung = False
            self._waiting = 0

    def set_running(self, doorbells: list[str], joined: str, ngone: str) -> None:
        with self._lock:
            self._doorbells = doorbells
            self._count_keys = (joined, ngone)
            self._rung = False
            self._waiting = 0
        self._wake.set()

    def waiting(self) -> int:
        with self._lock:
            return self._waiting

    def stop(self, join: bool = False) -> None:
        self._stop.set()
        self._wake.set()
        if join and self._thread is not threading.current_thread():
            self._thread.join(self._interval + 1.0)

    def _refresh(self, store: Store) -> None:
        with self._lock:
            count_keys = self._count_keys
        if count_keys is None:
            return
        joined = slot_count(store.add(count_keys[0], 0))
        ngone = store.add(count_keys[1], 0)
        with self._lock:
            if self._count_keys == count_keys:
                self._waiting = max(0, joined - ngone)

    def _run(self) -> None:
        store = self._store
        next_beat = time.monotonic() + self._interval
        while not self._stop.is_set():
            try:
                with self._lock:
                    doorbells = self._doorbells if not self._rung else []
                timeout = max(0.0, next_beat - time.monotonic())
                if doorbells:
                    try:
                        store._wait(list(doorbells), timeout)  # core call: float seconds
                    except StoreTimeoutError:
                        pass
                    else:
                        with self._lock:
                            if self._doorbells is doorbells:
                                self._rung = True
                        self._refresh(store)
                        continue
                else:
                    self._wake.wait(timeout)
                    self._wake.clear()
                if time.monotonic() < next_beat or self._stop.is_set():
                    continue
                next_beat = time.monotonic() + self._interval
                self._beat(store)
                with self._lock:
                    rung = self._rung
                if rung:
                    self._refresh(store)
            except (RendezvousError, StoreError, OSError) as exc:
                if self._stop.is_set():
                    break  # stopped while blocked: the store may be gone already
                msg = f"The keep-alive of {self.name} has failed: {type(exc).__name__}: {exc}"
                logger.warning(msg)
                self._record(msg, NodeState.FAILED)
                if self._stop.wait(min(self._interval, 1.0)):
                    break
                next_beat = time.monotonic()

    def _beat(self, store: Store) -> None:
        with self._lock:
            key = self._key
        if key is None:
            return
        started = time.monotonic()
        ok = self._liveness.keep_alive(store, key)
        took = time.monotonic() - started
        if took > self._heartbeat_timeout:
            logger.warning(
                "the keep-alive of %s took %.3fs, more than the heartbeat timeout of %.3fs",
                key,
                took,
                self._heartbeat_timeout,
            )
        if not ok:
            with self._lock:
                if self._key == key:
                    self._key = None
            msg = (
                f"The heartbeat key {key!r} was retired or declared dead by a peer: this "
                "node is no longer considered part of that round."
            )
            logger.warning(msg)
            self._record(msg, NodeState.FAILED)
