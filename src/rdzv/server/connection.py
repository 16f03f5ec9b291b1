"""One client connection of the TCPStore server (:class:`Connection`, an asyncio Protocol):
reading and parsing requests (through the C receiver of :mod:`rdzv.server.fastpath` when
it is on), executing them with the handler table of :mod:`rdzv.server.handlers`, buffering
and flow control of replies, the limits one connection is held to, and its log lines."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from rdzv import wire
from rdzv.endpoint import format_endpoint
from rdzv.engine import Waiter
from rdzv.errors import StoreError
from rdzv.server.fastpath import REPLY_LIMIT, Receiver
from rdzv.server.handlers import (
    HANDLERS,
    IS_WRITE,
    KIND_WAIT,
    REFUSED_HANDLERS,
    UNAUTH_HANDLERS,
    Close,
)
from rdzv.server.loop import gc_follow_connections
from rdzv.wire import Request

if TYPE_CHECKING:
    from rdzv.server.store_server import StoreServer

__all__ = ["Connection"]

logger = logging.getLogger("rdzv.server")

#: Transport write-buffer high-water mark: above it, the connection stops reading requests
#: until its replies drain (asyncio's default is 64 KiB; a LIST_KEYS or MULTI_GET reply may
#: legitimately be larger, so allow a few MiB before pausing).
WRITE_HIGH_WATER = 4 * 1024 * 1024
#: Seconds a refused connection (over the connection limit) is kept open at most, waiting
#: for its PING to answer it with the reason.
REFUSAL_GRACE = 1.0
#: Bytes a connection may send before it authenticates (on a server with a token). The
#: handshake takes 76 (VALIDATE 5, PING 5, EXT_AUTH_BEGIN 1, EXT_AUTH_PROOF 65); the rest is
#: room for a retried challenge. More closes the connection: without the token, a client
#: cannot make the server buffer a request.
MAX_UNAUTHENTICATED_BYTES = 1024
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
#: Lines about connections opening and closing logged per second at most; past it, one line a
#: second counts the rest. A storm of 15,000 connects otherwise spends ~40% of the server's
#: CPU formatting log lines nobody reads one by one (measured with bench/init_storm.py).
CONNECTION_LOG_RATE = 50


class ConnectionLog:
    """INFO lines about connections opening and closing, at most :data:`CONNECTION_LOG_RATE`
    a second; the lines past it are counted and summarised once the second is over."""

    __slots__ = ("_closed", "_lines", "_opened", "_server", "_summary", "_window")

    def __init__(self, server: StoreServer) -> None:
        self._server = server
        self._window = -1.0  # when the current second began (loop time)
        self._lines = 0  # lines logged in it
        self._opened = self._closed = 0  # not logged, to summarise
        self._summary: asyncio.TimerHandle | None = None

    def __call__(self, opened: bool, msg: str, conn: Connection, *args: object) -> None:
        """Log ``msg % (conn.peer, *args)`` at INFO, or count it (``opened``: a connection
        opened, else closed) past the rate."""
        if not logger.isEnabledFor(logging.INFO):
            return
        loop = self._server._loop  # not asyncio.get_running_loop(): a getpid() call each
        if loop is None:  # not started (a test driving a protocol by hand)
            logger.info(msg, conn.peer, *args)
            return
        now = loop.time()
        if now - self._window >= 1.0:
            self._window, self._lines = now, 0
        if self._lines < CONNECTION_LOG_RATE:
            self._lines += 1
            logger.info(msg, conn.peer, *args)
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


class Connection(asyncio.Protocol):
    """One client connection: parser, parked waiters, flow control.

    Replies are written as they are produced (torch clients keep one request in flight, so
    there is nothing to batch). When the transport's write buffer passes its high-water mark
    (a client that does not read its replies), the remaining requests of the batch are kept
    and reading stops until the buffer drains: memory per connection stays bounded.
    """

    __slots__ = (
        "_address",
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
        "handlers",
        "last_write",
        "out",
        "out_bytes",
        "parser",
        "partial",
        "partial_progress",
        "partial_since",
        "partial_timer",
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
        self._address: object = None  # the peer's address, formatted when asked (``peer``)
        self.waiters: dict[Waiter, int] = {}  # parked waiter -> keys it named
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
        self.handlers = HANDLERS
        self.auth_nonce: bytes | None = None
        #: Also the timer that closes a refused connection (see _refuse).
        self.auth_timer: asyncio.TimerHandle | None = None
        self.refusal = ""
        fast = server._fast
        self._receiver: Receiver | None = None
        if fast is not None:
            # The receiver also parks a WAIT on one absent key for this connection (the
            # waiter's owner as the WAIT handler makes it), and sets the parser's
            # ``validated`` when it takes VALIDATE.
            receiver = self._receiver = Receiver(fast, self._receive, REPLY_LIMIT)
            receiver.parser = self.parser
            receiver.owner = (self, KIND_WAIT)

    @property
    def peer(self) -> str:
        """The client's ``host:port`` ("?" before the connection is made or for a Unix
        socket), formatted when asked: most connections are never logged."""
        address = self._address
        if isinstance(address, tuple):
            return format_endpoint(str(address[0]), int(address[1]))
        return "?"

    # ------------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        server = self.server
        write = self.transport.write  # one bound method for both (an object per connection)
        self.write = write if server.journal is None else self._hold
        receiver = self._receiver
        if receiver is not None:
            receiver.write = write
        peer = transport.get_extra_info("peername")
        # TCP (the peer is an address tuple; a Unix socket's is a path). Both event loops set
        # TCP_NODELAY on their TCP transports themselves (asyncio since Python 3.6, uvloop
        # always): setting it again cost ~5% of the server's CPU in a connect storm.
        self._address = peer
        if isinstance(peer, tuple) and receiver is not None and server.ssl_context is None:
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
        gc_follow_connections(len(server._connections))
        server.stats.accepted += 1
        if server.token is not None and not (
            isinstance(peer, tuple) and server.allow_unauthenticated.allows(str(peer[0]))
        ):
            self.handlers = UNAUTH_HANDLERS
            loop = asyncio.get_running_loop()
            self.auth_timer = loop.call_later(server.auth_timeout, self._auth_expired)
        elif receiver is not None:
            # Served at once: the receiver takes the handshake too (VALIDATE, then a torch
            # client's PING).
            receiver.validate = receiver.enabled = True
        server._connection_log(True, "connection from %s (%d open)", self, len(server._connections))

    def _refuse(self, reason: str) -> None:
        """Refuse this connection (over the connection limit) without serving it: an rdzv
        client's PING is answered with :data:`~rdzv.wire.RDZV_REFUSED` and ``reason`` (its
        error names the limit and what raises it), anything else closes the connection;
        closed after :data:`REFUSAL_GRACE` seconds in any case. Its descriptor is held that
        long at most, and the others' service costs one accept."""
        self.server.stats.limit_hit("max_connections")
        self.server.log_refusal(self.peer, reason)
        self.refusal = reason
        self.handlers = REFUSED_HANDLERS
        loop = asyncio.get_running_loop()
        self.auth_timer = loop.call_later(REFUSAL_GRACE, self.close, reason)

    def _auth_expired(self) -> None:
        if self.handlers is UNAUTH_HANDLERS:
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
            gc_follow_connections(len(server._connections))
            server.stats.closed["rdzv" if self.parser.extended else "torch"] += 1
        server.release(self)
        server.owner_closed(self)
        if exc is None:
            server._connection_log(False, "connection from %s closed", self)
        else:
            server._connection_log(False, "connection from %s lost: %s", self, exc)

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
        self.refresh()

    @property
    def data_received(self) -> Callable[[bytes], None]:
        """What the transport calls with received bytes (uvloop looks it up once per
        connection): the C :class:`~rdzv.server.fastpath.Receiver` when the fast path is on, which
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
        if self.handlers is UNAUTH_HANDLERS:
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
        self.refresh()

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

    def refresh(self) -> None:
        """Tell the C receiver whether the next bytes may skip the Python path: only when
        nothing but the engine's state decides their outcome (see rdzv.server.fastpath)."""
        receiver = self._receiver
        if receiver is not None:
            parser = self.parser
            receiver.extended = parser.extended
            receiver.enabled = (
                parser.idle
                and self.handlers is HANDLERS
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
                if IS_WRITE[req.op]:
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
        except Close as exc:
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
        self.server.release(self)  # now: a woken wait's reply could not be sent any more
        if self._receiver is not None:
            self._receiver.enabled = False
        if abort:
            self.out.clear()
            self.out_bytes = 0
            self.transport.abort()
        else:
            self.transport.close()
