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
* with ``data_dir``, every change is journaled (:class:`rdzv.persistence.DurableJournal`)
  and the journal is committed before any reply that could reveal it is written: replies
  produced while changes are uncommitted are held per connection and released by one commit
  per event-loop iteration (group commit over every connection served in that iteration);
  see ``docs/durability.md``;
* binds exactly the host it is given (torch binds every interface, whatever ``host_name``
  says); IPv4, IPv6, port 0 and pre-bound listening sockets are supported.

:class:`StoreServer` runs on the caller's event loop; :class:`ServerThread` runs one in a
background thread with its own loop (what ``TCPStore(is_master=True)`` uses);
:func:`serve` runs one until a signal (what ``rdzv serve`` uses).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

from rdzv import auth, fastpath, wire
from rdzv.engine import Engine, Waiter
from rdzv.errors import AuthError, NetworkError, StoreError
from rdzv.fastpath import REPLY_LIMIT, BusyPoller, Receiver, executor_for
from rdzv.persistence import DurableJournal
from rdzv.stats import REQUEST_BUCKETS, ServerSnapshot, ServerStats
from rdzv.wire import (
    CHECK_NOT_READY,
    CHECK_READY,
    DEFAULT_LIMITS,
    STOP_WAITING,
    WAIT_CANCELED,
    Limits,
    Op,
    Request,
)

__all__ = ["ServerThread", "StoreServer", "new_event_loop", "raise_fd_limit", "serve"]

logger = logging.getLogger("rdzv.server")

_T = TypeVar("_T")

#: Transport write-buffer high-water mark: above it, the connection stops reading requests
#: until its replies drain (asyncio's default is 64 KiB; a LIST_KEYS or MULTI_GET reply may
#: legitimately be larger, so allow a few MiB before pausing).
WRITE_HIGH_WATER = 4 * 1024 * 1024
#: Listen backlog requested; the kernel caps it at ``net.core.somaxconn`` (torch asks for the
#: system maximum too).
LISTEN_BACKLOG = 65535
#: Descriptors kept free for the server's own use (journal, snapshot, log files, the metrics
#: channel, a refused connection's socket) when the connection limit is derived from the
#: descriptor limit: past ``RLIMIT_NOFILE - open descriptors - FD_RESERVE`` connections, a
#: connection is refused with an error naming the limit, never left to fail in accept()
#: (EMFILE), which a client sees as an unexplained reset.
FD_RESERVE = 64
#: Seconds a refused connection (over the connection limit) is kept open at most, waiting
#: for its PING to answer it with the reason.
REFUSAL_GRACE = 1.0
#: torch's sentence for a server that cannot bind; rdzv's detail follows it.
LISTEN_FAILED = "The server socket has failed to listen on any local network address."
#: Default of ``max_waits_per_connection``: a torch client parks at most one wait at a time;
#: rdzv's pipelining clients a few; 4096 bounds the memory one connection can pin.
DEFAULT_MAX_WAITS_PER_CONNECTION = 4096
#: Default of ``max_wait_keys_per_connection``: keys over one connection's parked waits; one
#: WAIT of torch's largest key count (131072) fits, so does any torch client (one wait at a
#: time). 131072 parked keys pin ~15 MB.
DEFAULT_MAX_WAIT_KEYS_PER_CONNECTION = 128 * 1024
#: Keys of dropped waits unregistered per event-loop iteration (a closed connection's, or
#: after CANCEL_WAIT): ~2 ms of work, so a connection dropping waits on millions of keys
#: delays the others by that much per iteration, not by seconds.
RELEASE_KEYS = 8192
#: Default of ``auth_timeout`` (seconds to authenticate on a server with a token).
DEFAULT_AUTH_TIMEOUT = 10.0
#: Bytes a connection may send before it authenticates (on a server with a token). The
#: handshake takes 76 (VALIDATE 5, PING 5, EXT_AUTH_BEGIN 1, EXT_AUTH_PROOF 65); the rest is
#: room for a retried challenge. More closes the connection: without the token, a client
#: cannot make the server buffer a request.
MAX_UNAUTHENTICATED_BYTES = 1024
#: Default of ``request_timeout``: seconds a request may take to arrive once its first byte
#: has (a half-sent request is not held forever). A full 256 MiB request needs ~4.5 MB/s.
DEFAULT_REQUEST_TIMEOUT = 60.0
#: Default of ``max_partial_bytes``: bytes of half-received requests the server holds, over
#: all connections; past it, the connections whose requests stalled longest are closed. One
#: request of ``max_request_bytes`` (256 MiB) fits.
DEFAULT_MAX_PARTIAL_BYTES = 256 * 1024 * 1024
#: Received bytes parsed at a time: a read (up to 256 KiB) is parsed and executed in slices
#: this size, so the replies of one slice are written together and a client pipelining many
#: small requests can be made to wait its turn (see TURN_REQUESTS).
INPUT_SLICE = 16 * 1024
#: Requests a connection may execute in one turn (one event-loop iteration): past it, the
#: rest of its input waits for the next iteration, so one client pipelining thousands of
#: requests delays the others by a few milliseconds at most (measured: a 256 KiB read of
#: PINGs took 80 ms in one go).
TURN_REQUESTS = 1024
#: Replies gathered before they are written (one ``transport.write`` per slice of requests,
#: not per reply: a buffer of a million 4-byte writes stalls uvloop's flush for seconds).
FLUSH_BYTES = 64 * 1024
#: Default of ``max_output_bytes``: replies buffered for one connection (held for a commit
#: plus the transport's buffer) past which a connection that does not read them is dropped.
DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024 * 1024
#: Default of ``max_total_output_bytes``: replies buffered on the whole server for
#: connections that stopped reading them, past which the one that stopped first is dropped.
DEFAULT_MAX_TOTAL_OUTPUT_BYTES = 256 * 1024 * 1024
#: Seconds between attempts to write the journal again after a commit failed (disk full).
JOURNAL_RETRY_INTERVAL = 0.5
#: Lines about connections opening and closing logged per second at most; past it, one line a
#: second counts the rest. A storm of 15,000 connects otherwise spends ~40% of the server's
#: CPU formatting log lines nobody reads one by one (measured with bench/init_storm.py).
CONNECTION_LOG_RATE = 50

_I64 = wire.reply_i64
_EXT_OK = wire.reply_ext_ok()
_EMPTY_BLOB = wire.reply_blob(b"")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's when uvloop is installed (the ``fast`` extra), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def raise_fd_limit() -> tuple[int, int] | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (a server holds one fd per client).

    Returns the (soft, hard) limits now in force, or None where ``resource`` is unavailable.
    """
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.debug("could not raise RLIMIT_NOFILE to %s: %s", target, exc)
    return soft, hard


def format_endpoint(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals bracketed."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# Kinds of parked waiters (Waiter.owner = (connection, kind, argument)).
_WAIT, _BARRIER, _GET, _MULTI_GET, _QUEUE_POP, _EXT_BARRIER = range(6)


class _ConnectionLog:
    """INFO lines about connections opening and closing, at most :data:`CONNECTION_LOG_RATE`
    a second; the lines past it are counted and summarised once the second is over."""

    __slots__ = ("_closed", "_lines", "_opened", "_server", "_summary", "_window")

    def __init__(self, server: StoreServer) -> None:
        self._server = server
        self._window = -1.0  # when the current second began (loop time)
        self._lines = 0  # lines logged in it
        self._opened = self._closed = 0  # not logged, to summarise
        self._summary: asyncio.TimerHandle | None = None

    def __call__(self, opened: bool, msg: str, *args: object) -> None:
        if not logger.isEnabledFor(logging.INFO):
            return
        loop = self._server._loop  # not asyncio.get_running_loop(): a getpid() call each
        if loop is None:  # not started (a test driving a protocol by hand)
            logger.info(msg, *args)
            return
        now = loop.time()
        if now - self._window >= 1.0:
            self._window, self._lines = now, 0
        if self._lines < CONNECTION_LOG_RATE:
            self._lines += 1
            logger.info(msg, *args)
            return
        if opened:
            self._opened += 1
        else:
            self._closed += 1
        if self._summary is None:
            when = self._window + 1.0
            self._summary = loop.call_at(when, self._summarise)

    def _summarise(self) -> None:
        self._summary = None
        logger.info(
            "%d more connections opened and %d closed in the last second, not logged one "
            "by one (%d open)",
            self._opened,
            self._closed,
            len(self._server._connections),
        )
        self._opened = self._closed = 0

    def cancel(self) -> None:
        if self._summary is not None:
            self._summary.cancel()
            self._summary = None


class _Close(Exception):
    """Raised by a handler: close this connection, logging ``reason``."""


class _Connection(asyncio.Protocol):
    """One client connection: parser, parked waiters, bound keys, flow control.

    Replies are written as they are produced (torch clients keep one request in flight, so
    there is nothing to batch). When the transport's write buffer passes its high-water mark
    (a client that does not read its replies), the remaining requests of the batch are kept
    and reading stops until the buffer drains: memory per connection stays bounded.
    """

    __slots__ = (
        "_backlog",
        "_closed",
        "_held_paused",
        "_input",
        "_paused",
        "_queued",
        "_receiver",
        "_replies",
        "_replies_size",
        "_transport_paused",
        "auth_nonce",
        "auth_timer",
        "bound",
        "handlers",
        "last_write",
        "out",
        "out_bytes",
        "parser",
        "partial",
        "partial_progress",
        "partial_since",
        "partial_timer",
        "peer",
        "refusal",
        "server",
        "transport",
        "unauth_bytes",
        "wait_keys",
        "waiters",
        "write",
    )

    transport: asyncio.Transport
    write: Callable[[bytes], None]

    def __init__(self, server: StoreServer) -> None:
        self.server = server
        self.parser = wire.RequestParser(server.limits, allow_extensions=server.allow_extensions)
        self.peer = "?"
        self.waiters: dict[Waiter, int] = {}  # parked waiter -> keys it named
        self.bound: set[bytes] = set()
        self._backlog: list[Request] | None = None
        self._paused = False  # not reading: one of the two below
        self._transport_paused = False  # the transport's buffer is above its high water
        self._held_paused = False  # replies held for a commit are above WRITE_HIGH_WATER
        self._input: bytes | None = None  # received, not parsed yet: waits for its turn
        self._closed = False
        self._replies: list[bytes] = []  # gathered by _execute, written by _flush
        self._replies_size = 0
        # The request in progress: bytes held, when its first byte came, when bytes last came.
        self.partial = 0
        self.partial_since: float | None = None
        self.partial_progress = 0.0
        self.partial_timer: asyncio.TimerHandle | None = None
        self.unauth_bytes = 0
        self.wait_keys = 0  # keys of this connection's parked waits
        self.out: list[bytes] = []  # replies held until the journal is committed
        self.out_bytes = 0
        self.last_write = 0  # the server's commit count that will cover its last write
        self._queued = False  # in server._outbox
        # Until authenticated (when the server has a token), only the handshake is served.
        self.handlers = _HANDLERS
        self.auth_nonce: bytes | None = None
        #: Also the timer that closes a refused connection (see _refuse).
        self.auth_timer: asyncio.TimerHandle | None = None
        self.refusal = ""
        fast = server._fast
        self._receiver: Receiver | None = None
        if fast is not None:
            # The receiver also parks a WAIT on one absent key (Executor.park) for this
            # connection, and sets the parser's ``validated`` when it takes VALIDATE.
            receiver = self._receiver = Receiver(fast, self._receive, REPLY_LIMIT)
            receiver.parser = self.parser
            receiver.owner = self

    # ------------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        server = self.server
        self.write = self.transport.write if server.journal is None else self._hold
        receiver = self._receiver
        if receiver is not None:
            receiver.write = self.transport.write
        peer = transport.get_extra_info("peername")
        # TCP (the peer is an address tuple; a Unix socket's is a path). Both event loops set
        # TCP_NODELAY on their TCP transports themselves (asyncio since Python 3.6, uvloop
        # always): setting it again cost ~5% of the server's CPU in a connect storm.
        if isinstance(peer, tuple):
            self.peer = format_endpoint(str(peer[0]), int(peer[1]))
            if receiver is not None and server.ssl_context is None:
                # Plain TCP: the receiver may send replies itself while nothing is queued.
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    receiver.fd = sock.fileno()
                    receiver.buffered = self.transport.get_write_buffer_size
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if len(server._connections) >= server.connection_limit:
            self._refuse(server.connection_limit_reason())
            return
        server._connections.add(self)
        server.stats.accepted += 1
        if server.token is not None and not (
            isinstance(peer, tuple) and server.allow_unauthenticated.allows(str(peer[0]))
        ):
            self.handlers = _UNAUTH_HANDLERS
            loop = asyncio.get_running_loop()
            self.auth_timer = loop.call_later(server.auth_timeout, self._auth_expired)
        elif receiver is not None:
            # Served at once: the receiver takes the handshake too (VALIDATE, then a torch
            # client's PING).
            receiver.validate = receiver.enabled = True
        server._connection_log(
            True, "connection from %s (%d open)", self.peer, len(server._connections)
        )

    def _refuse(self, reason: str) -> None:
        """Refuse this connection (over the connection limit) without serving it: an rdzv
        client's PING is answered with :data:`~rdzv.wire.RDZV_REFUSED` and ``reason`` (its
        error names the limit and what raises it), anything else closes the connection;
        closed after :data:`REFUSAL_GRACE` seconds in any case. Its descriptor is held that
        long at most, and the others' service costs one accept."""
        self.server.stats.limit_hit("max_connections")
        self.server.log_refusal(self.peer, reason)
        self.refusal = reason
        self.handlers = _REFUSED_HANDLERS
        loop = asyncio.get_running_loop()
        self.auth_timer = loop.call_later(REFUSAL_GRACE, self.close, reason)

    def _auth_expired(self) -> None:
        if self.handlers is _UNAUTH_HANDLERS:
            self.server.stats.auth_failure("timeout")
            timeout = self.server.auth_timeout
            self.close(f"not authenticated within {timeout:g} s (auth_timeout={timeout:g})")

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._backlog = self._input = None
        if self._receiver is not None:
            self._receiver.enabled = False
            self._receiver = None  # it refers back to this connection
        if self.auth_timer is not None:
            self.auth_timer.cancel()
        if self.partial_timer is not None:
            self.partial_timer.cancel()
        server = self.server
        server._forget_partial(self)
        server._drained(self)
        if self in server._connections:
            server._connections.discard(self)
            server.stats.closed["rdzv" if self.parser.extended else "torch"] += 1
        server._release(self)
        if self.bound:
            server._drop_bound(self, self.bound)
            self.bound.clear()
        if exc is None:
            server._connection_log(False, "connection from %s closed", self.peer)
        else:
            server._connection_log(False, "connection from %s lost: %s", self.peer, exc)

    def pause_writing(self) -> None:
        # The client does not read its replies: stop executing and reading its requests.
        self._transport_paused = True
        self._pause()

    def resume_writing(self) -> None:
        self._transport_paused = False
        self._resume()

    def _pause(self) -> None:
        if self._paused:
            return
        self._paused = True
        if self._receiver is not None:
            self._receiver.enabled = False
        if not self._closed:
            self.transport.pause_reading()
            self.server._backed_up(self)

    def _resume(self) -> None:
        if self._transport_paused or self._held_paused or self._closed or not self._paused:
            return
        self._paused = False
        self.server._drained(self)
        backlog, self._backlog = self._backlog, None
        if backlog:
            self._execute(backlog)
        self._continue()

    def _continue(self) -> None:
        """Go on with the input left for a later turn, then read again once none is left."""
        if self._paused or self._closed:
            return  # _resume calls again
        data, self._input = self._input, None
        if data is not None:
            self._consume(data)
        if self._input is None and not self._paused and not self._closed:
            self.transport.resume_reading()
        self._refresh()

    @property
    def data_received(self) -> Callable[[bytes], None]:
        """What the transport calls with received bytes (uvloop looks it up once per
        connection): the C :class:`~rdzv.fastpath.Receiver` when the fast path is on, which
        hands what it does not take to :meth:`_receive`; else :meth:`_receive` itself."""
        receiver = self._receiver
        if receiver is not None:
            return receiver  # times itself while the server counts
        return self._receive_timed if self.server.stats.counting else self._receive

    def _receive_timed(self, data: bytes) -> None:
        start = time.perf_counter()
        self._receive(data)
        self.server.stats.request_time.observe(time.perf_counter() - start)

    def _receive(self, data: bytes) -> None:
        if self._closed:
            return  # closing; ignore whatever still arrives
        if self.handlers is _UNAUTH_HANDLERS:
            self.unauth_bytes += len(data)
            if self.unauth_bytes > MAX_UNAUTHENTICATED_BYTES:
                self.server.stats.auth_failure("unauthenticated")
                self.close(
                    f"sent {self.unauth_bytes} bytes without authenticating: only the "
                    f"authentication handshake (at most {MAX_UNAUTHENTICATED_BYTES} bytes) "
                    "is accepted before it"
                )
                return
        if self._input is not None:  # earlier input still waits for its turn
            self._input += data
            return
        self._consume(data)
        self._refresh()

    def _consume(self, data: bytes) -> None:
        """Parse and execute ``data`` a slice at a time; past :data:`TURN_REQUESTS`, keep
        the rest for the next loop iteration (reading paused until then)."""
        parser = self.parser
        parsed = pos = 0
        size = len(data)
        view = memoryview(data) if size > INPUT_SLICE else None
        while True:
            if view is None:
                requests = parser.receive(data)
                pos = size
            else:
                requests = parser.receive(view[pos : pos + INPUT_SLICE])
                pos += INPUT_SLICE
            if self._backlog is not None:
                self._backlog += requests  # keep the order behind the postponed ones
            else:
                self._execute(requests)
            parsed += len(requests)
            if pos >= size or self._closed:
                break
            if self._backlog is not None or parsed >= TURN_REQUESTS:
                self._input = data[pos:]
                self.transport.pause_reading()
                if self._backlog is None:
                    loop = self.server._loop
                    assert loop is not None
                    loop.call_soon(self._continue)
                break
        if not self._closed:
            self.server._track_partial(self, parsed > 0)

    def _refresh(self) -> None:
        """Tell the C receiver whether the next bytes may skip the Python path: only when
        nothing but the engine's state decides their outcome (see rdzv.fastpath)."""
        receiver = self._receiver
        if receiver is not None:
            parser = self.parser
            receiver.extended = parser.extended
            receiver.enabled = (
                parser.idle
                and self.handlers is _HANDLERS
                and not self.waiters
                and self._backlog is None
                and self._input is None
                and not self._paused
                and not self._closed
            )

    def _execute(self, requests: list[Request]) -> None:
        """Run ``requests`` in order, until the connection pauses (the rest is postponed).

        Without a journal, the replies are gathered and written together (:meth:`_flush`)."""
        if self.server.journal is not None or not requests:
            self._run(requests)
            return
        self.write = self._gather
        try:
            self._run(requests)
        finally:
            self.write = self.transport.write
            if self._replies:
                self._flush()

    def _gather(self, data: bytes) -> None:
        self._replies.append(data)
        self._replies_size += len(data)
        if self._replies_size >= FLUSH_BYTES:
            self._flush()  # may pause writing (the client does not read)

    def _flush(self) -> None:
        replies = self._replies
        data = b"".join(replies) if len(replies) > 1 else replies[0]
        replies.clear()
        self._replies_size = 0
        self.transport.write(data)

    def _run(self, requests: list[Request]) -> None:
        server = self.server
        counts = server._op_counts
        i = 0
        try:
            for req in requests:
                i += 1
                if counts is not None:
                    counts[req.op] += 1
                if _IS_WRITE[req.op]:
                    if server.read_only is not None:
                        server._refuse_write(self, req)
                        continue
                    self.last_write = server._commits + 1
                self.handlers[req.op](server, self, req)
                if server._fired:
                    server._drain()
                if self._closed:
                    return
                if self._paused and i < len(requests):
                    self._backlog = requests[i:]
                    return
        except _Close as exc:
            self.close(str(exc))
            return
        except (StoreError, ValueError) as exc:
            # A torch opcode failed (e.g. ADD on a non-integer): torch's protocol has no
            # error reply, so, like torch's server, close this connection.
            if server._fired:
                server._drain()
            self.close(f"{type(exc).__name__}: {exc}")
            return
        if self.parser.error is not None:
            server.stats.protocol_error(str(self.parser.error))
            self.close(f"protocol violation: {self.parser.error}")
        elif server.journal is not None and server.journal.dirty:
            server._schedule_commit()  # commit writes nobody awaits a reply to, promptly

    def _hold(self, data: bytes) -> None:
        """``write`` of a durable server: send now when nothing is uncommitted, else hold the
        reply until the next group commit (keeping this connection's reply order)."""
        server = self.server
        journal = server.journal
        assert journal is not None
        if not journal.dirty and not self.out:
            self.transport.write(data)
            return
        self.out.append(data)
        self.out_bytes += len(data)
        if not self._queued:
            self._queued = True
            server._outbox.append(self)
        server._schedule_commit()
        if self.out_bytes > WRITE_HIGH_WATER and not self._held_paused:
            # Held replies count like the transport's buffer: stop reading requests until
            # the commit releases them (and the client reads them).
            self._held_paused = True
            self._pause()

    def buffered(self) -> int:
        """Bytes of replies not yet sent: held for a commit plus the transport's buffer."""
        return self.out_bytes + self.transport.get_write_buffer_size()

    def send_stateless(self, data: bytes) -> None:
        """Write a reply that reveals no state (a PING echo, an error, an authentication
        step): at once, unless this connection has replies held or a write of its own not
        yet committed (any reply acknowledges the writes sent before it)."""
        server = self.server
        if server.journal is None:
            self.write(data)  # in order with the replies _execute gathers
        elif not self.out and self.last_write <= server._commits:
            self.transport.write(data)
        else:
            self.write(data)

    def eof_received(self) -> bool | None:
        return None  # close the transport (and, through connection_lost, drop waiters)

    # ------------------------------------------------------------------ helpers
    def add_waiter(self, waiter: Waiter, keys: int) -> None:
        """Record a parked ``waiter`` of this connection, named ``keys`` keys."""
        self.waiters[waiter] = keys
        self.wait_keys += keys

    def send(self, data: bytes) -> None:
        """Write a deferred reply (a woken waiter's) unless the connection is gone. These
        come whether or not the connection reads: one that is already backed up past the
        high-water mark and would pass ``max_output_bytes`` is dropped instead."""
        if self._closed:
            return
        before = self.buffered()
        limit = self.server.max_output_bytes
        if before > WRITE_HIGH_WATER and before + len(data) > limit:
            self.server.stats.limit_hit("max_output_bytes")
            self.close(
                f"the client does not read its replies ({before + len(data)} bytes of replies "
                f"would be buffered; max_output_bytes={limit})",
                abort=True,
            )
            return
        self.write(data)
        if self._paused:
            self.server._backed_up(self, len(data))

    def close(self, reason: str, abort: bool = False) -> None:
        """Close this connection (after flushing queued replies), logging why; ``abort``
        discards the unsent replies instead (a client that does not read them)."""
        if self._closed:
            return
        if self.refusal:  # logged when refused (see StoreServer.log_refusal)
            logger.debug("closing refused connection from %s", self.peer)
        else:
            logger.warning("closing connection from %s: %s", self.peer, reason)
        if self.out and not abort:
            self.server._commit()  # flush the replies held for this connection first
        if self._replies and not abort:
            self._flush()
        self._replies.clear()
        self._closed = True
        self._backlog = self._input = None
        self.server._forget_partial(self)
        if self._receiver is not None:
            self._receiver.enabled = False
        if abort:
            self.out.clear()
            self.out_bytes = 0
            self.transport.abort()
        else:
            self.transport.close()


# --------------------------------------------------------------------------- handlers
# One function per opcode: (server, connection, request) -> None; replies go to conn.write.

_Handler = Callable[["StoreServer", _Connection, Any], None]


def _h_validate(server: StoreServer, conn: _Connection, req: wire.Validate) -> None:
    pass  # the parser checked the magic; no reply (torch sends none)


def _h_set(server: StoreServer, conn: _Connection, req: wire.Set) -> None:
    if server._bound:
        server._unbind(req.key)
    server.engine.set(req.key, req.value)


def _h_compare_set(server: StoreServer, conn: _Connection, req: wire.CompareSet) -> None:
    engine = server.engine
    before = engine.get(req.key)
    result = engine.compare_set(req.key, req.expected, req.desired)
    if server._bound and engine.get(req.key) is not before:
        server._unbind(req.key)
    conn.write(wire.reply_blob(result))


def _h_get(server: StoreServer, conn: _Connection, req: wire.Get) -> None:
    value = server.engine.get(req.key)
    # Missing key: an empty blob, as torch's libuv server (its legacy server closes).
    conn.write(_EMPTY_BLOB if value is None else wire.reply_blob(value))


def _h_add(server: StoreServer, conn: _Connection, req: wire.Add) -> None:
    if server._bound:
        server._unbind(req.key)
    conn.write(_I64(server.engine.add(req.key, req.amount)))


def _h_check(server: StoreServer, conn: _Connection, req: wire.Check) -> None:
    conn.write(CHECK_READY if server.engine.check(req.keys) else CHECK_NOT_READY)


def _h_wait(server: StoreServer, conn: _Connection, req: wire.Wait) -> None:
    keys = req.keys
    engine = server.engine
    if len(keys) == 1 and engine.get(keys[0]) is not None:  # fast path: torch's get()
        conn.write(STOP_WAITING)
        return
    server._check_waits(conn, len(keys))
    waiter = engine.wait(keys, server._on_fire, (conn, _WAIT, None))
    if waiter is None:
        conn.write(STOP_WAITING)
    else:
        conn.add_waiter(waiter, len(keys))


def _h_num_keys(server: StoreServer, conn: _Connection, req: wire.GetNumKeys) -> None:
    conn.write(_I64(server.engine.num_keys()))


def _h_delete_key(server: StoreServer, conn: _Connection, req: wire.DeleteKey) -> None:
    if server._bound:
        server._unbind(req.key)
    conn.write(_I64(1 if server.engine.delete_key(req.key) else 0))


def _h_append(server: StoreServer, conn: _Connection, req: wire.Append) -> None:
    if server._bound:
        server._unbind(req.key)
    server.engine.append(req.key, req.value)


def _h_multi_get(server: StoreServer, conn: _Connection, req: wire.MultiGet) -> None:
    values = server.engine.multi_get(req.keys)
    conn.write(wire.reply_blobs([b"" if v is None else v for v in values]))


def _h_multi_set(server: StoreServer, conn: _Connection, req: wire.MultiSet) -> None:
    if server._bound:
        for key in req.keys:
            server._unbind(key)
    server.engine.multi_set(req.keys, req.values)


def _h_cancel_wait(server: StoreServer, conn: _Connection, req: wire.CancelWait) -> None:
    server._release(conn)
    conn.write(WAIT_CANCELED)


def _h_ping(server: StoreServer, conn: _Connection, req: wire.Ping) -> None:
    read_only = server.read_only is not None
    conn.send_stateless(wire.reply_ping(req.nonce, conn.parser.extended, read_only=read_only))


def _h_queue_push(server: StoreServer, conn: _Connection, req: wire.QueuePush) -> None:
    server.engine.queue_push(req.key, req.value)


def _h_queue_pop(server: StoreServer, conn: _Connection, req: wire.QueuePop) -> None:
    engine = server.engine
    length = engine.queue_len(req.key)
    conn.write(wire.reply_queue_pop(engine.queue_pop(req.key), length))


def _h_queue_len(server: StoreServer, conn: _Connection, req: wire.QueueLen) -> None:
    conn.write(_I64(server.engine.queue_len(req.key)))


def _h_list_keys(server: StoreServer, conn: _Connection, req: wire.ListKeys) -> None:
    conn.write(wire.reply_key_list(server.engine.list_keys()))


def _h_barrier(server: StoreServer, conn: _Connection, req: wire.Barrier) -> None:
    if server._bound:
        server._unbind(req.key)
    server._check_waits(conn, 1)
    waiter = server.engine.barrier(req.key, req.world_size, server._on_fire, (conn, _BARRIER, None))
    if waiter is None:
        conn.write(STOP_WAITING)
    else:
        conn.add_waiter(waiter, 1)


# ---- extensions: every reply starts with EXT_OK or EXT_ERROR.


def _ext_error(conn: _Connection, exc: Exception) -> None:
    conn.write(wire.reply_ext_error(wire.error_code_for(exc), str(exc)))


def _h_ext_add(server: StoreServer, conn: _Connection, req: wire.ExtAdd) -> None:
    if server._bound:
        server._unbind(req.key)
    try:
        total = server.engine.add(req.key, req.amount)
    except (StoreError, ValueError) as exc:
        _ext_error(conn, exc)
    else:
        conn.write(_EXT_OK + _I64(total))


def _h_ext_barrier(server: StoreServer, conn: _Connection, req: wire.ExtBarrier) -> None:
    if server._bound:
        server._unbind(req.key)
    server._check_waits(conn, 1)
    try:
        waiter = server.engine.barrier(
            req.key, req.world_size, server._on_fire, (conn, _EXT_BARRIER, None)
        )
    except (StoreError, ValueError) as exc:
        _ext_error(conn, exc)
        return
    if waiter is None:
        conn.write(_EXT_OK)
    else:
        conn.add_waiter(waiter, 1)


def _h_ext_get_wait(server: StoreServer, conn: _Connection, req: wire.ExtGetWait) -> None:
    value = server.engine.get(req.key)
    if value is not None:
        conn.write(_EXT_OK + wire.reply_blob(value))
    else:
        server._check_waits(conn, 1)
        server._park(conn, [req.key], _GET, req.key, "value")


def _h_ext_multi_get_wait(
    server: StoreServer, conn: _Connection, req: wire.ExtMultiGetWait
) -> None:
    reply = server._multi_get_reply(req.keys)
    if reply is not None:
        conn.write(reply)
    else:
        server._check_waits(conn, len(req.keys))
        server._park(conn, req.keys, _MULTI_GET, req.keys, "value")


def _h_ext_queue_pop_wait(
    server: StoreServer, conn: _Connection, req: wire.ExtQueuePopWait
) -> None:
    value = server.engine.queue_pop(req.key)
    if value is not None:
        conn.write(_EXT_OK + wire.reply_blob(value))
    else:
        server._check_waits(conn, 1)
        server._park(conn, [req.key], _QUEUE_POP, req.key, "queue")


def _h_ext_list_keys(server: StoreServer, conn: _Connection, req: wire.ExtListKeys) -> None:
    prefix = req.prefix
    entries = [(k, len(v)) for k, v in server.engine.items() if k.startswith(prefix)]
    conn.write(_EXT_OK + wire.reply_key_sizes(entries))


def _h_ext_num_keys(server: StoreServer, conn: _Connection, req: wire.ExtNumKeys) -> None:
    prefix = req.prefix
    if prefix:
        count = sum(1 for k in server.engine.list_keys() if k.startswith(prefix))
    else:
        count = server.engine.num_keys()
    conn.write(_EXT_OK + _I64(count))


def _h_ext_set_ephemeral(server: StoreServer, conn: _Connection, req: wire.ExtSetEphemeral) -> None:
    server._unbind(req.key)
    server.engine.set(req.key, req.value)
    if server.journal is not None:
        server.journal.mark_volatile(req.key)
    server._bound[req.key] = conn
    conn.bound.add(req.key)
    conn.write(_EXT_OK)


def _h_ext_set_lease(server: StoreServer, conn: _Connection, req: wire.ExtSetLease) -> None:
    if not 0 < req.ttl_ms <= wire.MAX_LEASE_MS:
        limit = wire.MAX_LEASE_MS
        _ext_error(conn, ValueError(f"set_lease: ttl must be 1..{limit} ms, got {req.ttl_ms}"))
        return
    server._unbind(req.key)
    server.engine.set(req.key, req.value)
    if server.journal is not None:
        server.journal.mark_volatile(req.key)
    loop = asyncio.get_running_loop()
    handle = loop.call_later(req.ttl_ms / 1000.0, server._expire, req.key)
    server._bound[req.key] = handle
    conn.write(_EXT_OK)


# ---- authentication (see rdzv.auth): served before and after the connection authenticated.


def _h_auth_begin(server: StoreServer, conn: _Connection, req: wire.ExtAuthBegin) -> None:
    if server.token is None:
        _ext_error(conn, AuthError("this server has no token configured (authentication off)"))
        return
    conn.auth_nonce = auth.new_nonce()  # fresh per attempt: a recorded proof never verifies
    conn.send_stateless(_EXT_OK + conn.auth_nonce)


def _h_auth_proof(server: StoreServer, conn: _Connection, req: wire.ExtAuthProof) -> None:
    token = server.token
    if token is None:
        _ext_error(conn, AuthError("this server has no token configured (authentication off)"))
        return
    nonce, conn.auth_nonce = conn.auth_nonce, None  # single use
    if nonce is None:
        server.stats.auth_failure("no_challenge")
        _ext_error(conn, AuthError("EXT_AUTH_PROOF sent before EXT_AUTH_BEGIN"))
        raise _Close("authentication refused: proof sent without asking for a challenge")
    if not auth.verify(auth.client_proof(token, nonce, req.client_nonce), req.proof):
        server.stats.auth_failure("wrong_token")
        _ext_error(conn, AuthError("authentication failed: wrong token"))
        raise _Close("authentication failed: wrong token (the client's proof did not verify)")
    conn.handlers = _HANDLERS
    conn.send_stateless(_EXT_OK + auth.server_proof(token, nonce, req.client_nonce))
    logger.info("connection from %s authenticated", conn.peer)


def _h_unauth_ping(server: StoreServer, conn: _Connection, req: wire.Ping) -> None:
    if req.nonce == wire.RDZV_PING_NONCE and conn.parser.extended:
        conn.send_stateless(wire.reply_ping(req.nonce, True, auth_required=True))
        return
    server.stats.auth_failure("unauthenticated")
    raise _Close(
        "refused an unauthenticated client: this server requires a token and the client "
        "did not negotiate rdzv extensions (a torch client cannot authenticate); allow its "
        "network with --allow-unauthenticated / allow_unauthenticated="
    )


def _h_unauthenticated(server: StoreServer, conn: _Connection, req: Request) -> None:
    server.stats.auth_failure("unauthenticated")
    raise _Close(
        f"refused {req.op.name} before authentication: this server requires a token "
        "(rdzv clients: pass token= / token_file= / $RDZV_TOKEN; torch clients: allow their "
        "network with --allow-unauthenticated)"
    )


def _build_handlers() -> list[_Handler]:
    table: dict[Op, Callable[..., None]] = {
        Op.VALIDATE: _h_validate,
        Op.SET: _h_set,
        Op.COMPARE_SET: _h_compare_set,
        Op.GET: _h_get,
        Op.ADD: _h_add,
        Op.CHECK: _h_check,
        Op.WAIT: _h_wait,
        Op.GETNUMKEYS: _h_num_keys,
        Op.DELETE_KEY: _h_delete_key,
        Op.APPEND: _h_append,
        Op.MULTI_GET: _h_multi_get,
        Op.MULTI_SET: _h_multi_set,
        Op.CANCEL_WAIT: _h_cancel_wait,
        Op.PING: _h_ping,
        Op.QUEUE_PUSH: _h_queue_push,
        Op.QUEUE_POP: _h_queue_pop,
        Op.QUEUE_LEN: _h_queue_len,
        Op.LIST_KEYS: _h_list_keys,
        Op.BARRIER: _h_barrier,
        Op.EXT_ADD: _h_ext_add,
        Op.EXT_BARRIER: _h_ext_barrier,
        Op.EXT_GET_WAIT: _h_ext_get_wait,
        Op.EXT_MULTI_GET_WAIT: _h_ext_multi_get_wait,
        Op.EXT_QUEUE_POP_WAIT: _h_ext_queue_pop_wait,
        Op.EXT_LIST_KEYS: _h_ext_list_keys,
        Op.EXT_NUM_KEYS: _h_ext_num_keys,
        Op.EXT_SET_EPHEMERAL: _h_ext_set_ephemeral,
        Op.EXT_SET_LEASE: _h_ext_set_lease,
        Op.EXT_AUTH_BEGIN: _h_auth_begin,
        Op.EXT_AUTH_PROOF: _h_auth_proof,
    }
    handlers: list[_Handler] = [_h_validate] * 256
    for op, fn in table.items():
        handlers[op] = fn
    return handlers


_HANDLERS = _build_handlers()
#: Requests that change the store: refused while the journal cannot be written.
_WRITE_OPS = (
    Op.SET,
    Op.COMPARE_SET,
    Op.ADD,
    Op.DELETE_KEY,
    Op.APPEND,
    Op.MULTI_SET,
    Op.QUEUE_PUSH,
    Op.QUEUE_POP,
    Op.BARRIER,
    Op.EXT_ADD,
    Op.EXT_BARRIER,
    Op.EXT_QUEUE_POP_WAIT,
    Op.EXT_SET_EPHEMERAL,
    Op.EXT_SET_LEASE,
)
_IS_WRITE = [op in _WRITE_OPS for op in range(256)]
#: ... of which these have an extension reply, which can carry the error.
_EXT_WRITE_OPS = frozenset(op for op in _WRITE_OPS if op >= Op.EXT_ADD)


def _h_refused_ping(server: StoreServer, conn: _Connection, req: wire.Ping) -> None:
    if req.nonce == wire.RDZV_PING_NONCE and conn.parser.extended:
        conn.send_stateless(wire.reply_refused(conn.refusal))
    raise _Close(conn.refusal)


def _h_refused(server: StoreServer, conn: _Connection, req: Request) -> None:
    raise _Close(conn.refusal)


_REFUSED_HANDLERS: list[_Handler] = [_h_refused] * 256
_REFUSED_HANDLERS[Op.VALIDATE] = _h_validate
_REFUSED_HANDLERS[Op.PING] = _h_refused_ping

_UNAUTH_HANDLERS: list[_Handler] = [_h_unauthenticated] * 256
_UNAUTH_HANDLERS[Op.VALIDATE] = _h_validate
_UNAUTH_HANDLERS[Op.PING] = _h_unauth_ping
_UNAUTH_HANDLERS[Op.EXT_AUTH_BEGIN] = _h_auth_begin
_UNAUTH_HANDLERS[Op.EXT_AUTH_PROOF] = _h_auth_proof


# --------------------------------------------------------------------------- server


class StoreServer:
    """A TCPStore server on the running asyncio event loop.

    Args:
        host: the address to listen on, bound exactly: ``"127.0.0.1"``, ``"::1"``, a host
            name (every address it resolves to), ``"0.0.0.0"``/``"::"`` for all IPv4/IPv6
            interfaces, ``""`` for all interfaces of both families.
        port: TCP port; 0 picks a free one (read :attr:`port` after :meth:`start`).
        sock: an already bound (listening or not) socket to adopt instead of binding, as
            torch's ``master_listen_fd``; ``host`` and ``port`` are then ignored.
        engine: the state to serve (a fresh :class:`~rdzv.engine.Engine` by default).
        limits: request limits (:data:`rdzv.wire.DEFAULT_LIMITS`: torch libuv's).
        allow_extensions: offer rdzv's protocol extensions to clients that ask for them.
        token: shared secret (bytes, >= 16; see :func:`rdzv.auth.load_token`). When set,
            every connection must authenticate (HMAC challenge-response, ``docs/security.md``)
            before any other request; others are closed with a logged reason.
        allow_unauthenticated: networks (CIDR strings or a
            :class:`~rdzv.auth.NetworkAllowlist`) whose clients may skip authentication
            (torch clients cannot authenticate).
        ssl: a server-side :class:`ssl.SSLContext`: every connection is TLS (plain clients,
            torch's included, fail the TLS handshake).
        max_connections: most connections open at once (None: what the descriptor limit
            allows, see :data:`FD_RESERVE`; an explicit value above it is lowered to it).
            Further ones are refused, logged with the peer and the limit: an rdzv client's
            handshake fails with :class:`~rdzv.errors.ConnectionLimitError` carrying the
            reason (which limit, what raises it), a torch client's connection is closed.
        max_waits_per_connection: most parked waits (WAIT, BARRIER, blocking get,
            multi_get, queue_pop) per connection; one more closes the connection, logged.
        max_wait_keys_per_connection: most keys over the parked waits of one connection
            (each key costs the server ~120 bytes while parked); past it the connection is
            closed, logged. The default admits one wait of torch's largest key count.
        request_timeout: seconds a request may take to arrive once its first byte has
            (time the connection is paused for not reading its replies excepted); then the
            connection is closed, logged: a half-sent request is not held forever.
        max_partial_bytes: bytes of half-received requests held over all connections;
            past it, the connections whose requests made no progress for the longest are
            closed, logged (the one receiving last, only if it alone is over the limit).
        auth_timeout: seconds a connection that must authenticate may take to do so; then
            it is closed, logged (a client cannot hold a connection without the token).
        max_output_bytes: replies buffered for one connection (held for a commit plus the
            transport's buffer) past which a connection that is already backed up (it
            stopped reading its replies) is dropped, logged. Whatever the limit, a
            connection whose buffered replies pass 4 MiB is not read from until they drain.
        max_total_output_bytes: replies buffered on the whole server for connections that
            stopped reading (each counted from when its reading paused), past which the
            connection that stopped first is dropped, logged: many connections of one
            client cannot add up what ``max_output_bytes`` bounds for one.
        data_dir: make the state durable in this directory (created if missing): recovered
            by :meth:`start`, every change journaled and committed before any reply that
            depends on it is sent (see ``docs/durability.md``). None: in memory only.
        fsync: with ``data_dir``: ``"always"`` (fsync at every group commit; survives power
            loss), ``"interval"`` (at most every ``fsync_interval`` seconds; survives a
            killed server) or ``"never"`` (the OS decides).
        fsync_interval: seconds between fsyncs for ``fsync="interval"`` (> 0).
        recovery: with ``data_dir``: ``"strict"`` (refuse to start, naming the file and
            offset, when damage goes beyond a torn last commit) or ``"discard-corrupt"``
            (start from what is intact, logging every dropped record and byte); see
            :func:`rdzv.persistence.recover`.
        fastpath: execute the common requests in C (:mod:`rdzv.fastpath`) when the extension
            is built and ``RDZV_FASTPATH`` is not 0 (never with ``data_dir``); False: always
            the Python path. Replies and state are the same either way.
        busy_poll: seconds to keep the event loop polling instead of sleeping after each
            read (:class:`~rdzv.fastpath.BusyPoller`; lower round-trip latency for a client
            doing one request after another, at the price of up to one core while requests
            come that close together); 0 (the default) never polls. Needs the fast path.
        metrics: count requests by opcode and time them (:attr:`stats`, the fast path's
            counters; read by :mod:`rdzv.observe` through :meth:`snapshot`); the rare
            events (connections, auth failures, limit hits) are counted either way.

    Raises :class:`~rdzv.errors.NetworkError` from :meth:`start` when binding fails (the
    message names the endpoint and the OS error); :class:`~rdzv.errors.StoreError` from
    :meth:`start` when ``data_dir`` is unusable or corrupt (the message names the file and
    offset); ValueError for a token with ``allow_extensions=False`` (authentication is an
    extension), a bad network or an unknown ``fsync`` policy.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        sock: socket.socket | None = None,
        engine: Engine | None = None,
        limits: Limits = DEFAULT_LIMITS,
        allow_extensions: bool = True,
        token: bytes | None = None,
        allow_unauthenticated: auth.NetworkAllowlist | Iterable[str] = (),
        ssl: ssl.SSLContext | None = None,
        max_connections: int | None = None,
        max_waits_per_connection: int | None = DEFAULT_MAX_WAITS_PER_CONNECTION,
        auth_timeout: float = DEFAULT_AUTH_TIMEOUT,
        max_wait_keys_per_connection: int | None = DEFAULT_MAX_WAIT_KEYS_PER_CONNECTION,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        max_partial_bytes: int = DEFAULT_MAX_PARTIAL_BYTES,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
        max_total_output_bytes: int = DEFAULT_MAX_TOTAL_OUTPUT_BYTES,
        data_dir: str | os.PathLike[str] | None = None,
        fsync: str = "always",
        fsync_interval: float = 0.05,
        recovery: str = "strict",
        fastpath: bool = True,
        busy_poll: float = 0.0,
        metrics: bool = False,
    ) -> None:
        if token is not None and not allow_extensions:
            raise ValueError("a token requires allow_extensions=True (auth is an extension)")
        for name, value in (
            ("max_connections", max_connections),
            ("max_waits_per_connection", max_waits_per_connection),
            ("max_wait_keys_per_connection", max_wait_keys_per_connection),
            ("max_partial_bytes", max_partial_bytes),
            ("max_output_bytes", max_output_bytes),
            ("max_total_output_bytes", max_total_output_bytes),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        self.token = token
        self.allow_unauthenticated = (
            allow_unauthenticated
            if isinstance(allow_unauthenticated, auth.NetworkAllowlist)
            else auth.NetworkAllowlist(allow_unauthenticated)
        )
        self.ssl_context = ssl
        self.max_connections = max_connections
        #: Connections served at once: max_connections, lowered by start() to what the
        #: descriptor limit allows (see FD_RESERVE); further ones are refused.
        self.connection_limit: int = max_connections if max_connections is not None else 1 << 62
        self._fd_limit: int | None = None
        #: Refusals logged in the current second (loop time it began), and those not logged.
        self._refusal_window = -1.0
        self._refusals_unlogged = 0
        self.max_waits_per_connection = max_waits_per_connection
        self.max_output_bytes = max_output_bytes
        self.max_total_output_bytes = max_total_output_bytes
        # Connections not read from because their replies are not read, oldest first, with
        # the bytes buffered for them (from the pause on), and the sum.
        self._backlogged: dict[_Connection, int] = {}
        self._backlogged_bytes = 0
        if not busy_poll >= 0:
            raise ValueError(f"busy_poll must be >= 0 seconds, got {busy_poll}")
        self.busy_poll = busy_poll
        self._poller: BusyPoller | None = None
        if not auth_timeout > 0:
            raise ValueError(f"auth_timeout must be > 0 seconds, got {auth_timeout}")
        self.auth_timeout = auth_timeout
        if not request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {request_timeout}")
        self.request_timeout = request_timeout
        self.max_partial_bytes = max_partial_bytes
        self.max_wait_keys_per_connection = max_wait_keys_per_connection
        self._partial: dict[_Connection, None] = {}  # connections holding a partial request
        self._releasing: collections.deque[Waiter] = collections.deque()  # see _release
        self._release_scheduled = False
        self._partial_total = 0
        self.host = host
        self._requested_port = port
        self._sock = sock
        self.engine = engine if engine is not None else Engine()
        self.limits = limits
        self.allow_extensions = allow_extensions
        self._servers: list[asyncio.Server] = []
        self._endpoints: list[tuple[str, int]] = []
        self._connections: set[_Connection] = set()
        self._connection_log = _ConnectionLog(self)
        self._fired: list[Waiter] = []
        # key -> the connection (ephemeral) or lease timer handle it is bound to.
        self._bound: dict[bytes, object] = {}
        self._closed: asyncio.Event | None = None
        self.journal: DurableJournal | None = None
        if data_dir is not None:
            self.journal = DurableJournal(
                data_dir, fsync=fsync, fsync_interval=fsync_interval, recovery=recovery
            )
        self._outbox: list[_Connection] = []
        # The C hot path for plain in-memory serving (rdzv.fastpath); off with a journal.
        self._fast = (
            executor_for(self.engine, self._bound, limits)
            if fastpath and self.journal is None
            else None
        )
        self.stats = ServerStats(counting=metrics)
        self._op_counts = self.stats.requests if metrics else None
        if self._fast is not None:
            self._fast.park = self._park_wait
        if metrics and self._fast is not None:
            self._fast.enable_counting([round(b * 1e9) for b in REQUEST_BUCKETS])
        self._commit_scheduled = False
        self._sync_timer: asyncio.TimerHandle | None = None
        self._retry_timer: asyncio.TimerHandle | None = None
        self._commits = 0  # successful group commits
        #: Why writes are refused (the journal cannot be written), or None.
        self.read_only: str | None = None
        self._recovered = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        """Recover the durable state (with ``data_dir``), bind, start accepting connections."""
        loop = self._loop = asyncio.get_running_loop()
        if self.journal is not None and not self._recovered:
            self._recovered = True
            self.journal.open(self.engine)  # StoreError on a corrupt or unusable directory
            logger.info(
                "recovered %d keys from %s (fsync=%s)",
                self.engine.num_keys(),
                self.journal.data_dir,
                self.journal.fsync,
            )
        self._closed = asyncio.Event()
        self._limit_connections_by_fds(raise_fd_limit())
        socks = [self._sock] if self._sock is not None else self._bind()
        try:
            for sock in socks:
                if sock.type != socket.SOCK_STREAM:
                    raise NetworkError(f"the socket {sock!r} to adopt is not a TCP socket")
                sock.setblocking(False)
                with contextlib.suppress(OSError):
                    sock.listen(LISTEN_BACKLOG)
                server = await loop.create_server(
                    lambda: _Connection(self),
                    sock=sock,
                    backlog=LISTEN_BACKLOG,
                    ssl=self.ssl_context,
                )
                self._servers.append(server)
                name = sock.getsockname()
                self._endpoints.append((str(name[0]), int(name[1])))
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        logger.info("listening on %s", ", ".join(self.endpoints))
        if self.busy_poll > 0 and self._fast is not None and self._poller is None:
            self._poller = BusyPoller(loop, self._fast, self.busy_poll)

    def _bind(self) -> list[socket.socket]:
        host = self.host
        port = self._requested_port
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        addrs: list[tuple[int, str]]
        if host == "":
            wildcards = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]
            addrs = [(fam, addr) for fam, addr in wildcards if _has_family(fam)]
        else:
            try:
                infos = socket.getaddrinfo(
                    host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
                )
            except socket.gaierror as exc:
                raise NetworkError(
                    f"{LISTEN_FAILED} Cannot listen on {format_endpoint(host, port)}: the host "
                    "name does not "
                    f"resolve ({exc}); pass an IP address or a resolvable name"
                ) from exc
            addrs = []
            for info in infos:
                entry = (int(info[0]), str(info[4][0]))
                if entry not in addrs:
                    addrs.append(entry)
        socks: list[socket.socket] = []
        try:
            for fam, addr in addrs:
                sock = socket.socket(fam, socket.SOCK_STREAM)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if fam == socket.AF_INET6 and host == "":
                    # "" binds both families explicitly: keep the IPv6 socket IPv6-only.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind((addr, port))
                except OSError as exc:
                    name = errno.errorcode.get(exc.errno or 0, "?")
                    raise NetworkError(
                        f"{LISTEN_FAILED} Cannot listen on {format_endpoint(addr, port)}: "
                        f"{exc.strerror} "
                        f"({name}); pick another port or stop the process using it"
                    ) from exc
                if port == 0:
                    port = sock.getsockname()[1]  # the other addresses share that port
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        return socks

    @property
    def port(self) -> int:
        """The port listened on (the ephemeral one when started with port 0)."""
        if not self._endpoints:
            raise RuntimeError("the server is not started")
        return self._endpoints[0][1]

    @property
    def endpoints(self) -> list[str]:
        """Every ``host:port`` listened on."""
        return [format_endpoint(host, port) for host, port in self._endpoints]

    @property
    def fastpath_state(self) -> str:
        """Whether the C fast path (:mod:`rdzv.fastpath`) serves the common requests: "on",
        or "off (" + the reason + ")"."""
        if self._fast is not None:
            return "on"
        if self.journal is not None:
            return "off (durable: every change is journaled)"
        if not fastpath.AVAILABLE:
            return "off (rdzv._fastpath is not built; reinstall with a C compiler)"
        if not fastpath.ENABLED:
            return "off (RDZV_FASTPATH=0)"
        return "off (fastpath=False)"

    @property
    def busy_poll_state(self) -> str:
        """``"N us"`` when the loop busy-polls N microseconds after reads, else ``"off"``
        (``busy_poll=0``, or no fast path to count reads)."""
        if self.busy_poll > 0 and self._fast is not None:
            return f"{self.busy_poll * 1e6:g} us"
        return "off"

    def _limit_connections_by_fds(self, limits: tuple[int, int] | None) -> None:
        """Lower :attr:`connection_limit` to what the soft descriptor limit leaves once the
        descriptors open now and :data:`FD_RESERVE` are set aside."""
        if limits is None:
            return
        soft = limits[0]
        try:
            open_now = len(os.listdir("/proc/self/fd"))
        except OSError:  # no procfs: assume a few
            open_now = 16
        by_fds = max(1, soft - open_now - FD_RESERVE)
        if by_fds < self.connection_limit:
            self.connection_limit, self._fd_limit = by_fds, soft
            logger.info(
                "serving at most %d connections (descriptor limit %d, %d open, %d reserved)",
                by_fds,
                soft,
                open_now,
                FD_RESERVE,
            )

    def log_refusal(self, peer: str, reason: str) -> None:
        """Log a refused connection: one line a second at most, the next line counting those
        not logged (a join storm past the limit would otherwise log a line per connection)."""
        now = time.monotonic()
        if now - self._refusal_window < 1.0:
            self._refusals_unlogged += 1
            return
        more, self._refusals_unlogged = self._refusals_unlogged, 0
        self._refusal_window = now
        logger.warning(
            "refusing connection from %s: %s%s",
            peer,
            reason,
            f" ({more} more refused since the last line)" if more else "",
        )

    def connection_limit_reason(self) -> str:
        """Why a connection over :attr:`connection_limit` is refused, and what raises it."""
        limit = self.connection_limit
        if self._fd_limit is None:
            return (
                f"connection limit reached: {limit} connections open (max_connections={limit}; "
                "raise it with rdzv serve --max-connections)"
            )
        return (
            f"connection limit reached: {limit} connections open, the most this server's "
            f"descriptor limit allows (RLIMIT_NOFILE {self._fd_limit}, less {FD_RESERVE} "
            "reserved and those open at start); raise it with `ulimit -n` (up to the hard "
            "limit) before starting rdzv serve, or spread the clients over more servers"
        )

    @property
    def num_connections(self) -> int:
        """Connections currently open."""
        return len(self._connections)

    def snapshot(self, *, sizes: bool = True) -> ServerSnapshot:
        """The server's counters now, safe to call from any thread (the metrics listener's):
        it only copies (atomic under the GIL) and never waits for the event loop.

        ``sizes``: also sum the bytes of every value and queue item (O(keys); callers
        polling often should cache it). See :class:`~rdzv.stats.ServerSnapshot`.
        """
        connections = list(self._connections)  # atomic copy; the loop may add meanwhile
        extended = sum(1 for c in connections if c.parser.extended)
        return ServerSnapshot.take(
            self.stats,
            self._fast,
            self.engine,
            self.journal,
            open={"torch": len(connections) - extended, "rdzv": extended},
            waiters=sum(len(c.waiters) for c in connections),
            sizes=sizes,
            read_only=self.read_only is not None,
        )

    async def close(self) -> None:
        """Graceful shutdown: stop listening, flush and close every connection."""
        if self._poller is not None:
            self._poller.close()
            self._poller = None
        for server in self._servers:
            server.close()
        for conn in list(self._connections):
            conn.transport.close()
        for server in self._servers:
            await server.wait_closed()
        for owner in self._bound.values():
            if not isinstance(owner, _Connection):
                cast(asyncio.TimerHandle, owner).cancel()
        self._servers.clear()
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        if self.journal is not None:
            self._commit(retry=True)  # a last try if the journal was failing
            self.journal.close()
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        if self._closed is not None:
            self._closed.set()
        self._connection_log.cancel()
        logger.info("server closed")

    async def wait_closed(self) -> None:
        """Return once :meth:`close` has run."""
        if self._closed is not None:
            await self._closed.wait()

    # ------------------------------------------------------------------ group commit
    def _schedule_commit(self) -> None:
        if not self._commit_scheduled and self.read_only is None and self._loop is not None:
            self._commit_scheduled = True
            # call_soon runs after every connection readable in this loop iteration was
            # served: one commit (one fsync) for all of them.
            self._loop.call_soon(self._commit)

    def _commit(self, retry: bool = False) -> None:
        """Commit the journal, then send every reply held for it. While the journal cannot
        be written (read-only), only the retry timer (``retry``) tries again."""
        self._commit_scheduled = False
        journal = self.journal
        if journal is None:
            self._outbox = []
            return
        if self.read_only is not None and not retry:
            return
        try:
            journal.commit()
        except OSError as exc:
            # Nothing held may be acknowledged: keep every held reply (and the records,
            # which the journal keeps) until a commit succeeds; refuse writes meanwhile.
            self._enter_read_only(journal, exc)
            return
        self._commits += 1
        if self.read_only is not None:
            self.read_only = None
            logger.warning(
                "the journal in %s is writable again: accepting writes", journal.data_dir
            )
        if journal.unsynced and self._sync_timer is None and self._loop is not None:
            # fsync=interval: the records just written get their fsync within the interval
            # even if no further commit comes.
            self._sync_timer = self._loop.call_later(journal.fsync_interval, self._sync)
        outbox, self._outbox = self._outbox, []
        resumed = []
        for conn in outbox:
            conn._queued = False
            if conn.out and not conn._closed:
                data = b"".join(conn.out) if len(conn.out) > 1 else conn.out[0]
                conn.transport.write(data)
            conn.out.clear()
            conn.out_bytes = 0
            if conn._held_paused:
                conn._held_paused = False
                resumed.append(conn)
        for conn in resumed:
            conn._resume()

    # ------------------------------------------------------------------ output bounds
    def _backed_up(self, conn: _Connection, more: int = 0) -> None:
        """``conn`` stopped being read (``more`` == 0) or got ``more`` bytes of replies
        while stopped: count them, and drop the connections that stopped first while the
        server's total passes ``max_total_output_bytes``."""
        if not more and conn in self._backlogged:
            return
        added = more if more else conn.buffered()
        self._backlogged[conn] = self._backlogged.get(conn, 0) + added
        self._backlogged_bytes += added
        limit = self.max_total_output_bytes
        while self._backlogged_bytes > limit and self._backlogged:
            victim = next(iter(self._backlogged))
            self._drained(victim)
            self.stats.limit_hit("max_total_output_bytes")
            victim.close(
                f"the client does not read its replies, and replies buffered for such "
                f"connections exceed {limit} bytes on this server (max_total_output_bytes="
                f"{limit}); this connection stopped reading first",
                abort=True,
            )

    def _drained(self, conn: _Connection) -> None:
        size = self._backlogged.pop(conn, None)
        if size is not None:
            self._backlogged_bytes -= size

    def _enter_read_only(self, journal: DurableJournal, exc: OSError) -> None:
        if self.read_only is None:
            full = exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
            why = "the disk is full" if full else "the journal cannot be written"
            self.read_only = (
                f"the store is read-only: {why} ({exc.strerror or exc}, in {journal.data_dir});"
                " writes are refused until a commit succeeds again"
            )
            logger.error(
                "%s; retrying every %g s (replies are held until then)",
                self.read_only,
                JOURNAL_RETRY_INTERVAL,
            )
        if self._retry_timer is None and self._loop is not None:
            self._retry_timer = self._loop.call_later(JOURNAL_RETRY_INTERVAL, self._retry)

    def _retry(self) -> None:
        self._retry_timer = None
        self._commit(retry=True)

    def _refuse_write(self, conn: _Connection, req: Request) -> None:
        """Answer a write while :attr:`read_only`: an error reply where the protocol has one
        (rdzv's extensions), else close the connection (torch's writes have no error)."""
        reason = self.read_only
        assert reason is not None
        if conn.handlers is not _HANDLERS:
            conn.handlers[req.op](self, conn, req)  # not authenticated: refused as such
        elif req.op in _EXT_WRITE_OPS:
            conn.send_stateless(wire.reply_ext_error(wire.ErrorCode.STORE, reason))
        else:
            raise _Close(f"refused {req.op.name}: {reason}")

    def _sync(self) -> None:
        self._sync_timer = None
        journal = self.journal
        if journal is not None:
            try:
                journal.sync()
            except OSError as exc:
                self._enter_read_only(journal, exc)

    # ------------------------------------------------------------------ partial requests
    def _track_partial(self, conn: _Connection, completed: bool) -> None:
        """Account for ``conn``'s request in progress after a read (``completed``: at least
        one request of it was complete, so a new one started)."""
        held = conn.parser.partial_bytes
        if held == 0:
            if conn.partial:
                self._forget_partial(conn)
            conn.partial_since = None
            return
        loop = self._loop
        assert loop is not None
        now = loop.time()
        if held != conn.partial:
            self._partial_total += held - conn.partial
            conn.partial = held
            conn.partial_progress = now
            self._partial[conn] = None
        if completed or conn.partial_since is None:
            conn.partial_since = now
            if conn.partial_timer is None:
                conn.partial_timer = loop.call_at(
                    now + self.request_timeout, self._partial_expired, conn
                )
        if self._partial_total > self.max_partial_bytes:
            self._shed_partial(conn)

    def _forget_partial(self, conn: _Connection) -> None:
        if conn.partial:
            self._partial_total -= conn.partial
            conn.partial = 0
        self._partial.pop(conn, None)

    def _partial_expired(self, conn: _Connection) -> None:
        conn.partial_timer = None
        since = conn.partial_since
        if conn._closed or since is None:
            return
        loop = self._loop
        assert loop is not None
        now = loop.time()
        if conn._paused or conn._input is not None:
            since = conn.partial_since = now  # we are not reading: not the client's delay
        due = since + self.request_timeout
        if now < due:
            conn.partial_timer = loop.call_at(due, self._partial_expired, conn)
            return
        timeout = self.request_timeout
        self.stats.limit_hit("request_timeout")
        conn.close(
            f"request not complete {timeout:g} s after its first byte ({conn.partial} bytes "
            f"received; request_timeout={timeout:g})"
        )

    def _shed_partial(self, current: _Connection) -> None:
        """Close connections holding partial requests until their total fits the limit:
        the longest stalled first, ``current`` (receiving now) last."""
        limit = self.max_partial_bytes
        stalled = sorted(
            (c for c in self._partial if c is not current), key=lambda c: c.partial_progress
        )
        for conn in [*stalled, current]:
            if self._partial_total <= limit:
                return
            self.stats.limit_hit("max_partial_bytes")
            conn.close(
                f"partial-request limit: {self._partial_total} bytes of half-received "
                f"requests held (max_partial_bytes={limit}); this connection's "
                f"{conn.partial}-byte request made no progress for the longest"
                if conn is not current
                else f"partial-request limit: this connection's request alone holds "
                f"{conn.partial} bytes (max_partial_bytes={limit})"
            )

    # ------------------------------------------------------------------ waiters
    def _check_waits(self, conn: _Connection, keys: int) -> None:
        """Raise _Close if parking one more wait on ``keys`` keys would pass a limit."""
        limit = self.max_waits_per_connection
        if limit is not None and len(conn.waiters) >= limit:
            self.stats.limit_hit("max_waits_per_connection")
            raise _Close(
                f"pending-wait limit exceeded ({limit} parked waits on this connection; "
                f"max_waits_per_connection={limit})"
            )
        limit = self.max_wait_keys_per_connection
        if limit is not None and conn.wait_keys + keys > limit:
            self.stats.limit_hit("max_wait_keys_per_connection")
            raise _Close(
                f"parked-wait key limit exceeded (a wait on {keys} keys with {conn.wait_keys} "
                f"parked on this connection; max_wait_keys_per_connection={limit})"
            )

    def _release(self, conn: _Connection) -> None:
        """Drop every parked wait of ``conn`` (they never reply). Their keys are
        unregistered :data:`RELEASE_KEYS` per loop iteration, so that dropping waits on
        many keys does not stall the other connections."""
        if not conn.waiters:
            return
        for waiter in conn.waiters:
            waiter.owner = None  # fired or not, no reply any more (see _reply_to)
        self._releasing.extend(conn.waiters)
        conn.waiters.clear()
        conn.wait_keys = 0
        if not self._release_scheduled:
            self._release_step()

    def _release_step(self) -> None:
        self._release_scheduled = False
        releasing = self._releasing
        engine = self.engine
        budget = RELEASE_KEYS
        while releasing and budget > 0:
            waiter = releasing[0]
            step = min(budget, len(waiter.missing))
            if engine.release(waiter, step):
                releasing.popleft()
            budget -= max(step, 1)
        if releasing and self._loop is not None:
            self._release_scheduled = True
            self._loop.call_soon(self._release_step)

    def _on_fire(self, waiter: Waiter) -> None:
        # Engine callback: must not re-enter the engine, so defer the work to _drain, which
        # the connection runs right after the current request.
        self._fired.append(waiter)

    def _park(
        self, conn: _Connection, keys: list[bytes], kind: int, arg: object, only: str
    ) -> None:
        waiter = self.engine.wait(keys, self._on_fire, (conn, kind, arg), only=only)
        if waiter is None:  # became present: cannot happen on one loop, but stay correct
            self._fired.append(Waiter(set(), self._on_fire, (conn, kind, arg)))
        else:
            conn.add_waiter(waiter, len(keys))

    def _park_wait(self, conn: _Connection, key: bytes) -> bool:
        """The fast path's ``park`` (:attr:`rdzv.fastpath.Executor.park`): park a WAIT on
        the absent ``key`` for ``conn`` as :func:`_h_wait` does and return True; False
        (nothing registered, the Python path takes the WAIT) when a limit would close the
        connection."""
        limit = self.max_waits_per_connection
        if limit is not None and len(conn.waiters) >= limit:
            return False
        limit = self.max_wait_keys_per_connection
        if limit is not None and conn.wait_keys + 1 > limit:
            return False
        waiter = self.engine.wait((key,), self._on_fire, (conn, _WAIT, None))
        if waiter is None:
            return False
        conn.add_waiter(waiter, 1)
        return True

    def _multi_get_reply(self, keys: list[bytes]) -> bytes | None:
        values = self.engine.multi_get(keys)
        if any(v is None for v in values):
            return None
        return _EXT_OK + wire.reply_blobs(values)  # type: ignore[arg-type]

    def _drain(self) -> None:
        """Reply to every waiter the last operation released."""
        fired = self._fired
        engine = self.engine
        while fired:
            batch = fired[:]
            fired.clear()
            for waiter in batch:
                self._reply_to(waiter, engine)

    def _reply_to(self, waiter: Waiter, engine: Engine) -> None:
        if waiter.owner is None:
            return  # dropped (connection closed, CANCEL_WAIT) while it was being released
        conn, kind, arg = cast(tuple[_Connection, int, Any], waiter.owner)
        conn.wait_keys -= conn.waiters.pop(waiter, 0)
        if conn._closed:
            return
        if kind in (_WAIT, _BARRIER):
            conn.send(STOP_WAITING)
            if not conn.waiters:
                conn._refresh()  # its next requests may take the fast path again
        elif kind == _EXT_BARRIER:
            conn.send(_EXT_OK)
        elif kind in (_GET, _QUEUE_POP):
            value = engine.get(arg) if kind == _GET else engine.queue_pop(arg)
            if value is None:  # gone again (a queue item another waiter took): wait again
                self._park(conn, [arg], kind, arg, "value" if kind == _GET else "queue")
            else:
                conn.send(_EXT_OK + wire.reply_blob(value))
        elif kind == _MULTI_GET:
            reply = self._multi_get_reply(arg)
            if reply is None:
                self._park(conn, arg, kind, arg, "value")
            else:
                conn.send(reply)

    # ------------------------------------------------------------------ bound keys
    def _unbind(self, key: bytes) -> None:
        owner = self._bound.pop(key, None)
        if owner is None:
            return
        if isinstance(owner, _Connection):
            owner.bound.discard(key)
        else:  # a lease timer (uvloop's handles are not asyncio.TimerHandle instances)
            cast(asyncio.TimerHandle, owner).cancel()

    def _drop_bound(self, conn: _Connection, keys: Iterable[bytes]) -> None:
        for key in keys:
            if self._bound.get(key) is conn:
                del self._bound[key]
                self.engine.delete_key(key)
                logger.debug("deleted ephemeral key %r of %s", key, conn.peer)
        if self.journal is not None and self.journal.dirty:
            self._schedule_commit()

    def _expire(self, key: bytes) -> None:
        owner = self._bound.get(key)
        if owner is not None and not isinstance(owner, _Connection):
            del self._bound[key]
            self.engine.delete_key(key)
            logger.debug("lease of key %r expired", key)
            if self.journal is not None:
                self._schedule_commit()


def _has_family(family: int) -> bool:
    try:
        socket.socket(family, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


class ServerThread:
    """A :class:`StoreServer` running on its own event loop in a daemon thread.

    ``start()`` returns once the server listens (or raises its bind error); ``stop()``
    shuts it down gracefully and joins the thread. Arguments as :class:`StoreServer`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **kwargs: Any) -> None:
        self._args = (host, port)
        self._kwargs = kwargs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: StoreServer | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()

    @property
    def server(self) -> StoreServer:
        if self._server is None:
            raise RuntimeError("the server thread is not started")
        return self._server

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> ServerThread:
        self._thread = threading.Thread(target=self._run, name="rdzv-store-server", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def _run(self) -> None:
        loop = self._loop = new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            server = StoreServer(*self._args, **self._kwargs)
            loop.run_until_complete(server.start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._server = server
        self._ready.set()
        try:
            loop.run_until_complete(server.wait_closed())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def call(self, fn: Callable[[StoreServer], _T], timeout: float = 10.0) -> _T:
        """Run ``fn(server)`` on the server's loop and return its result (thread-safe access
        to the server and its engine, e.g. for metrics or tests)."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the server thread is not started")
        server = self.server

        async def run() -> _T:
            return fn(server)

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Close the server and join its thread (idempotent)."""
        loop, server, thread = self._loop, self._server, self._thread
        if loop is None or server is None or thread is None or not thread.is_alive():
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout)
        thread.join(timeout)


def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    on_listening: Callable[[StoreServer], None] | None = None,
    **kwargs: Any,
) -> None:
    """Run a server in this thread until SIGINT or SIGTERM, then shut down gracefully.

    ``on_listening(server)`` is called once the server listens.
    """
    import signal

    loop = new_event_loop()
    asyncio.set_event_loop(loop)

    async def main() -> None:
        server = StoreServer(host, port, **kwargs)
        await server.start()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        if on_listening is not None:
            on_listening(server)
        await stop.wait()
        logger.info("signal received, shutting down")
        await server.close()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
