"""The TCPStore server's optional C hot path (``rdzv.server._fastpath``), and when it is used.

The server decodes and executes every request in Python (:mod:`rdzv.wire`,
:mod:`rdzv.server`). For the requests that dominate real traffic (SET, GET, ADD, CHECK,
WAIT and MULTI_GET of up to 16 keys, a torch client's PING, EXT_ADD and EXT_GET_WAIT) it first
offers the received
bytes to a C :class:`Executor` that works directly on the engine's dictionaries (the ones
:meth:`rdzv.engine.Engine.fastpath_tables` hands it, with the rules it must keep) and returns
the concatenated replies. The executor takes a request only when its outcome needs nothing
but those dictionaries: no waiter to wake, no ephemeral or leased key to unbind, no barrier
to release, no error to report, no wait to park, no limit exceeded; otherwise it stops, before
changing anything, and the Python path carries on from that request. Replies and state are
byte-identical either way (tests/server/test_fastpath.py runs both on the same input).

A connection's :class:`Receiver` also takes two requests that change the connection's state,
so that a torch client's ``init_process_group`` (VALIDATE, PING, ADD, WAIT, GET) runs no
Python code of the server but the waiter's registration: the connection's first request,
VALIDATE, when it arrives whole with the right magic (``Receiver.validate``; it then sets the
parser's ``validated``), and a WAIT on one absent key on a connection with an ``owner``: the
engine registers the waiter (``FastPathTables.park(key, callback, owner)``), the
connection records it (``owner[0].add_waiter(waiter, 1)``, as the WAIT handler does), and
the receiver disables itself until the waiter is woken. It parks only on a connection with
no parked wait (the receiver is disabled otherwise), so the per-connection wait limits (at
least 1) cannot be passed. The waiter's callback is the receiver's: when the write that
wakes it comes and nothing reached the connection since the WAIT (no byte, no close, no
CANCEL_WAIT), the waiter is still the connection's only one and the plain TCP transport is
open with nothing queued, the receiver does what the Python path would (forgets the waiter,
sends STOP_WAITING with one ``send`` on the descriptor, runs again, as
``Connection.refresh`` would decide); otherwise it hands the waiter, unchanged, to
``Executor.on_fire`` (the server's), which replies after the waking request.

The server uses it only on connections where nothing else must see each request: no
durable journal (``--data-dir``), authenticated (or no token), no parked waits, no partial
request buffered. It is built from ``src/rdzv/server/_fastpath.c`` by ``pip install``
(setup.py, an optional extension: without a C compiler the install still works and the
server is pure Python). With metrics on (``StoreServer(metrics=True)``, ``rdzv serve
--metrics-port``), the executor also counts, in C, the requests it executes by opcode and the
time of each receiver call in a histogram (``Executor.enable_counting``); the metrics listener
reads them with ``Executor.counters()`` at scrape time (:mod:`rdzv.observe`). Set
``RDZV_FASTPATH=0`` (or ``false``, ``no``, ``off``) in the
environment to disable it.
"""

from __future__ import annotations

import asyncio
import os
import time

from rdzv.engine import Engine
from rdzv.wire import Limits

__all__ = [
    "AVAILABLE",
    "ENABLED",
    "MAX_POLLING_CLIENTS",
    "POLL_COOLDOWN",
    "REPLY_LIMIT",
    "BusyPoller",
    "Executor",
    "Receiver",
    "executor_for",
]

try:
    from rdzv.server._fastpath import Executor, Receiver
except ImportError:  # not compiled (no C compiler at install time): pure Python
    Executor = Receiver = None  # type: ignore[assignment,misc]

#: The C extension is importable.
AVAILABLE: bool = Executor is not None
#: The server uses it: available and not disabled with ``RDZV_FASTPATH=0``.
ENABLED: bool = AVAILABLE and os.environ.get("RDZV_FASTPATH", "1").strip().lower() not in (
    "0",
    "false",
    "no",
    "off",
)

#: Bytes of replies one :meth:`Executor.run` call gathers before returning them to be
#: written (bounds the memory a burst of pipelined GETs of large values can take at once).
REPLY_LIMIT = 256 * 1024


def executor_for(engine: Engine, limits: Limits) -> Executor | None:
    """An :class:`Executor` over ``engine``'s state, or None when the fast path is off.

    The executor works on :meth:`Engine.fastpath_tables` (the narrow interface the engine
    offers it, with the rules it keeps), so it stays valid as long as the engine does.
    Raises ValueError if the engine has a journal.
    """
    if not ENABLED:
        return None
    return Executor(
        engine.fastpath_tables(),
        limits.max_key_bytes,
        limits.max_value_bytes,
        limits.max_keys,
    )


#: While polling, more connections than this reading within one window stop the poller: with
#: that many concurrent clients the loop rarely sleeps, and polling would take CPU time the
#: clients need (measured on 2 CPUs: -3% throughput with 16 clients). One CPU is the
#: server's; the others can run a client each.
MAX_POLLING_CLIENTS = max(1, (os.cpu_count() or 2) - 1)
#: Seconds the poller stays off after it stopped for concurrency.
POLL_COOLDOWN = 0.01


class BusyPoller:
    """Keeps the event loop polling, instead of sleeping, for ``window`` seconds after each
    request the receivers of ``executor`` handle, while few clients are active.

    A server that sleeps in ``epoll_wait`` between the requests of a client doing one round
    trip after another is woken by the kernel for each one; on a machine whose CPUs go idle
    (a VM's vCPUs above all) that wake-up is most of the round trip (measured: 2.7x the
    requests per second of one torch client, docs/performance.md). While the poller runs,
    the loop keeps calling it back (``call_soon``), so it polls its sockets without
    blocking and finds the next request as soon as it lands. It stops ``window`` seconds
    after the last read (an idle server costs nothing), and for :data:`POLL_COOLDOWN`
    seconds as soon as more than ``max_clients`` connections read within one window (many
    concurrent clients keep the loop busy anyway, and need the CPU). The same idea as Linux's
    ``SO_BUSY_POLL``. ``rdzv serve`` polls by default (``--busy-poll-us``);
    :class:`~rdzv.server.StoreServer` does not, since a server thread inside another
    program would take that program's CPU and GIL.

    Args:
        loop: the server's event loop.
        executor: the executor whose receivers count reads and readers.
        window: seconds to keep polling after a read (> 0).
        max_clients: most connections reading within a window while polling continues.

    Raises ValueError for ``window <= 0`` or ``max_clients < 1``.
    """

    __slots__ = ("_executor", "_loop", "_max_clients", "_period_end", "_seen", "_until", "_window")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        executor: Executor,
        window: float,
        max_clients: int = MAX_POLLING_CLIENTS,
    ) -> None:
        if not window > 0:
            raise ValueError(f"busy-poll window must be > 0 seconds, got {window}")
        if max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {max_clients}")
        self._loop = loop
        self._executor = executor
        self._window = window
        self._max_clients = max_clients
        self._seen = executor.activity
        self._until = self._period_end = 0.0
        executor.polling = False
        executor.on_activity = self._start

    def _new_period(self, now: float) -> None:
        executor = self._executor
        executor.epoch += 1
        executor.distinct = 0
        self._period_end = now + self._window

    def _start(self) -> None:
        # Called by a receiver on a read while not polling (``polling`` is already True and
        # ``activity`` counts that read); the read then counts as the first reader of the new
        # period.
        now = time.perf_counter()
        self._seen = self._executor.activity
        self._until = now + self._window
        self._new_period(now)
        self._loop.call_soon(self._poll)

    def _poll(self) -> None:
        executor = self._executor
        if executor.on_activity is None:  # closed
            executor.polling = False
            return
        if executor.distinct > self._max_clients:  # busy: the clients need the CPU
            self._loop.call_later(POLL_COOLDOWN, self._cooled)
            return
        now = time.perf_counter()
        activity = executor.activity
        if activity != self._seen:
            self._seen = activity
            self._until = now + self._window
        if now >= self._until:
            executor.polling = False
            return
        if now >= self._period_end:
            self._new_period(now)
        self._loop.call_soon(self._poll)

    def _cooled(self) -> None:
        self._executor.polling = False  # the next read starts the poller again

    def close(self) -> None:
        """Stop polling (within one loop iteration) and for good."""
        self._executor.on_activity = None
