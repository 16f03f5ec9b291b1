"""The TCPStore server: asyncio (uvloop when installed) over :class:`rdzv.engine.Engine`.

Byte-compatible with torch 2.13's TCPStore clients (and rdzv's), following
``docs/protocol.md``. Design:

* one :class:`asyncio.Protocol` per connection; ``data_received`` feeds the sans-I/O
  :class:`~rdzv.wire.RequestParser`, executes every complete request against the engine and
  writes all replies of that read in one ``transport.write``;
* WAIT, BARRIER and the extension waits park an engine waiter; the engine's wake-up pushes
  the reply to the waiting connection (nothing is polled); a closed connection's waiters are
  dropped, CANCEL_WAIT drops them on request;
* a protocol violation (bad handshake, unknown opcode, a limit exceeded, ``add`` on a
  non-integer by a torch client, which has no error reply) closes only that connection, with
  a logged reason; rdzv clients get error replies instead and keep their connection;
* per-connection buffers: a half-sent request stalls nobody else; a client that does not
  read its replies is paused (``pause_reading``) by transport flow control;
* with ``data_dir``, every change is journaled (:class:`rdzv.server.persistence.DurableJournal`)
  and the journal is committed before any reply that could reveal it is written: replies
  produced while changes are uncommitted are held per connection and released by one commit
  per event-loop iteration (group commit over every connection served in that iteration);
  see ``docs/durability.md``;
* binds exactly the host it is given (torch binds every interface, whatever ``host_name``
  says); IPv4, IPv6, port 0 and pre-bound listening sockets are supported.

:class:`StoreServer` runs on the caller's event loop; :class:`ServerThread` runs one in a
background thread with its own loop (what ``TCPStore(is_master=True)`` uses);
:func:`serve` runs one until a signal (what ``rdzv serve`` uses).

The package, one concept per module:

* :mod:`rdzv.server.store_server`: :class:`StoreServer` (accept, limits over all
  connections, replies to woken waiters, the lease clock, group commit);
* :mod:`rdzv.server.listeners`: the listening sockets (addresses, accept-queue groups, the
  per-port bind lock);
* :mod:`rdzv.server.connection`: one client connection (buffers, flow control, limits);
* :mod:`rdzv.server.handlers`: the opcode -> handler tables;
* :mod:`rdzv.server.fastpath` (and its C source ``_fastpath.c``): the optional C hot path;
* :mod:`rdzv.server.persistence`: the durable journal and its recovery;
* :mod:`rdzv.server.thread`: :class:`ServerThread` and :func:`serve`;
* :mod:`rdzv.server.loop`: the event loop and descriptor limit.
"""

from __future__ import annotations

from rdzv.endpoint import format_endpoint
from rdzv.server.listeners import DEFAULT_ACCEPT_QUEUES
from rdzv.server.loop import new_event_loop, raise_fd_limit
from rdzv.server.store_server import (
    DEFAULT_AUTH_TIMEOUT,
    DEFAULT_MAX_OUTPUT_BYTES,
    DEFAULT_MAX_PARTIAL_BYTES,
    DEFAULT_MAX_TOTAL_OUTPUT_BYTES,
    DEFAULT_MAX_WAIT_KEYS_PER_CONNECTION,
    DEFAULT_MAX_WAITS_PER_CONNECTION,
    DEFAULT_REQUEST_TIMEOUT,
    StoreServer,
)
from rdzv.server.thread import ServerThread, serve

__all__ = [
    "DEFAULT_ACCEPT_QUEUES",
    "DEFAULT_AUTH_TIMEOUT",
    "DEFAULT_MAX_OUTPUT_BYTES",
    "DEFAULT_MAX_PARTIAL_BYTES",
    "DEFAULT_MAX_TOTAL_OUTPUT_BYTES",
    "DEFAULT_MAX_WAITS_PER_CONNECTION",
    "DEFAULT_MAX_WAIT_KEYS_PER_CONNECTION",
    "DEFAULT_REQUEST_TIMEOUT",
    "ServerThread",
    "StoreServer",
    "format_endpoint",
    "new_event_loop",
    "raise_fd_limit",
    "serve",
]
