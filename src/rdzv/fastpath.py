"""The TCPStore server's optional C hot path (``rdzv._fastpath``), and when it is used.

The server decodes and executes every request in Python (:mod:`rdzv.wire`,
:mod:`rdzv.server`). For the requests that dominate real traffic (SET, GET, ADD, CHECK,
WAIT and MULTI_GET of up to 16 keys, EXT_ADD and EXT_GET_WAIT) it first offers the received
bytes to a C :class:`Executor` that works directly on the engine's dictionaries and returns
the concatenated replies. The executor takes a request only when its outcome needs nothing
but those dictionaries: no waiter to wake, no ephemeral or leased key to unbind, no barrier
to release, no error to report, no wait to park, no limit exceeded; otherwise it stops, before
changing anything, and the Python path carries on from that request. Replies and state are
byte-identical either way (tests/server/test_fastpath.py runs both on the same input).

The server uses it only on connections where nothing else must see each request: no
durable journal (``--data-dir``), authenticated (or no token), no parked waits, no partial
request buffered. It is built from ``src/rdzv/_fastpath.c`` by ``pip install``
(setup.py, an optional extension: without a C compiler the install still works and the
server is pure Python). Set ``RDZV_FASTPATH=0`` (or ``false``, ``no``, ``off``) in the
environment to disable it.
"""

from __future__ import annotations

import os

from rdzv.engine import Engine
from rdzv.wire import Limits

__all__ = ["AVAILABLE", "ENABLED", "REPLY_LIMIT", "Executor", "Receiver", "executor_for"]

try:
    from rdzv._fastpath import Executor, Receiver
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


def executor_for(engine: Engine, bound: dict[bytes, object], limits: Limits) -> Executor | None:
    """An :class:`Executor` over ``engine``'s state, or None when the fast path is off.

    ``bound`` is the server's map of keys bound to a connection or a lease (writes to them
    take the Python path). The executor shares the dictionaries, so it stays valid as long
    as the engine does.
    """
    if not ENABLED:
        return None
    # The engine's private tables: this module and the engine are the two that know them.
    return Executor(
        engine._data,
        engine._queues,
        engine._waiters,
        engine._barriers,
        bound,
        limits.max_key_bytes,
        limits.max_value_bytes,
        limits.max_keys,
    )
