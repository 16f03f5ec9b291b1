"""The TCPStore server (:class:`StoreServer`): accepting on the sockets of
:mod:`rdzv.server.listeners`, the connection and output limits over all connections, waiter
dispatch (the results the engine handed woken waiters, carried to their connections), the
clock of the engine's leases (a timer at the next deadline) and the news of closed
connections (their bound keys), and group commit of the durable journal. Connections are
:mod:`rdzv.server.connection`, request handlers :mod:`rdzv.server.handlers`."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import socket
import ssl
import time
from collections.abc import Iterable
from typing import cast

from rdzv import auth, wire
from rdzv.endpoint import format_endpoint
from rdzv.engine import QUEUE_POP, Engine, Waiter
from rdzv.errors import NetworkError
from rdzv.server import fastpath, listeners
from rdzv.server.connection import Connection, ConnectionLog
from rdzv.server.fastpath import BusyPoller, executor_for
from rdzv.server.handlers import (
    EXT_WRITE_OPS,
    HANDLERS,
    Close,
    wait_reply,
)
from rdzv.server.listeners import DEFAULT_ACCEPT_QUEUES, LISTEN_BACKLOG
from rdzv.server.loop import raise_fd_limit
from rdzv.server.persistence import DurableJournal
from rdzv.stats import REQUEST_BUCKETS, ServerSnapshot, ServerStats
from rdzv.wire import DEFAULT_LIMITS, Limits, Request

__all__ = ["StoreServer"]

logger = logging.getLogger("rdzv.server")

#: Descriptors kept free for the server's own use (journal, snapshot, log files, the metrics
#: channel, a refused connection's socket) when the connection limit is derived from the
#: descriptor limit: past ``RLIMIT_NOFILE - open descriptors - FD_RESERVE`` connections, a
#: connection is refused with an error naming the limit, never left to fail in accept()
#: (EMFILE), which a client sees as an unexplained reset.
FD_RESERVE = 64
#: Seconds by which a lease may expire before its deadline: the lease timer's tolerance for a
#: timer that fires early (uvloop's clock ticks in milliseconds).
LEASE_TIMER_SLACK = 0.001
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
#: Default of ``request_timeout``: seconds a request may take to arrive once its first byte
#: has (a half-sent request is not held forever). A full 256 MiB request needs ~4.5 MB/s.
DEFAULT_REQUEST_TIMEOUT = 60.0
#: Default of ``max_partial_bytes``: bytes of half-received requests the server holds, over
#: all connections; past it, the connections whose requests stalled longest are closed. One
#: request of ``max_request_bytes`` (256 MiB) fits.
DEFAULT_MAX_PARTIAL_BYTES = 256 * 1024 * 1024
#: Default of ``max_output_bytes``: replies buffered for one connection (held for a commit
#: plus the transport's buffer) past which a connection that does not read them is dropped.
DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024 * 1024
#: Default of ``max_total_output_bytes``: replies buffered on the whole server for
#: connections that stopped reading them, past which the one that stopped first is dropped.
DEFAULT_MAX_TOTAL_OUTPUT_BYTES = 256 * 1024 * 1024
#: Seconds between attempts to write the journal again after a commit failed (disk full).
JOURNAL_RETRY_INTERVAL = 0.5


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
            :func:`rdzv.server.persistence.recover`.
        fastpath: execute the common requests in C (:mod:`rdzv.server.fastpath`) when the extension
            is built and ``RDZV_FASTPATH`` is not 0 (never with ``data_dir``); False: always
            the Python path. Replies and state are the same either way.
        busy_poll: seconds to keep the event loop polling instead of sleeping after each
            read (:class:`~rdzv.server.fastpath.BusyPoller`; lower round-trip latency for a client
            doing one request after another, at the price of up to one core while requests
            come that close together); 0 (the default) never polls. Needs the fast path.
        metrics: count requests by opcode and time them (:attr:`stats`, the fast path's
            counters; read by :mod:`rdzv.observe` through :meth:`snapshot`); the rare
            events (connections, auth failures, limit hits) are counted either way.
        accept_queues: listening sockets per address (>= 1), sharing the port through
            SO_REUSEPORT on Linux (elsewhere, and for an adopted ``sock``, always one). The
            kernel spreads incoming connections over them, each with its own accept queue
            of up to ``net.core.somaxconn`` connections, so a storm of up to that many times
            ``accept_queues`` simultaneous connects is absorbed without dropped SYNs (a
            dropped SYN costs its client a 1 s retransmit). The port is checked free first
            with an ordinary bind, under a per-port lock held until the group listens, so a
            second server cannot join the group, even one started at the same moment
            (:func:`rdzv.server.listeners.listen`).

    Raises :class:`~rdzv.errors.NetworkError` from :meth:`start` when binding fails (the
    message names the endpoint and the OS error); :class:`~rdzv.errors.StoreError` from
    :meth:`start` when ``data_dir`` is unusable or corrupt (the message names the file and
    offset); ValueError for a token with ``allow_extensions=False`` (authentication is an
    extension), a bad network, an unknown ``fsync`` policy or ``accept_queues < 1``.
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
        accept_queues: int = DEFAULT_ACCEPT_QUEUES,
    ) -> None:
        if accept_queues < 1:
            raise ValueError(f"accept_queues must be >= 1, got {accept_queues}")
        self.accept_queues = accept_queues
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
        self._backlogged: dict[Connection, int] = {}
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
        self._partial: dict[Connection, None] = {}  # connections holding a partial request
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
        self._connections: set[Connection] = set()
        self._connection_log = ConnectionLog(self)
        self._fired: list[Waiter] = []
        # The timer that expires the engine's leases, and the deadline it is set for.
        self._lease_timer: asyncio.TimerHandle | None = None
        self._lease_timer_at = 0.0
        self._closed: asyncio.Event | None = None
        self.journal: DurableJournal | None = None
        if data_dir is not None:
            self.journal = DurableJournal(
                data_dir, fsync=fsync, fsync_interval=fsync_interval, recovery=recovery
            )
        self._outbox: list[Connection] = []
        # The C hot path for plain in-memory serving (rdzv.server.fastpath); off with a journal.
        self._fast = (
            executor_for(self.engine, limits) if fastpath and self.journal is None else None
        )
        self.stats = ServerStats(counting=metrics)
        self._op_counts = self.stats.requests if metrics else None
        if self._fast is not None:
            self._fast.on_fire = self.on_fire  # WAITs the receivers park wake through it
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
        adopted = self._sock
        socks = (
            [adopted]
            if adopted is not None
            else listeners.listen(self.host, self._requested_port, self.accept_queues)
        )
        try:
            if adopted is not None:  # the listeners' sockets come listening, non-blocking
                if adopted.type != socket.SOCK_STREAM:
                    raise NetworkError(f"the socket {adopted!r} to adopt is not a TCP socket")
                adopted.setblocking(False)
                with contextlib.suppress(OSError):
                    adopted.listen(LISTEN_BACKLOG)
            for sock in socks:
                server = await loop.create_server(
                    lambda: Connection(self),
                    sock=sock,
                    backlog=LISTEN_BACKLOG,
                    ssl=self.ssl_context,
                )
                self._servers.append(server)
                name = sock.getsockname()
                endpoint = (str(name[0]), int(name[1]))
                if endpoint not in self._endpoints:  # the sockets of one accept-queue group
                    self._endpoints.append(endpoint)
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        logger.info("listening on %s", ", ".join(self.endpoints))
        if self.busy_poll > 0 and self._fast is not None and self._poller is None:
            self._poller = BusyPoller(loop, self._fast, self.busy_poll)

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
        """Whether the C fast path (:mod:`rdzv.server.fastpath`) serves the common requests: "on",
        or "off (" + the reason + ")"."""
        if self._fast is not None:
            return "on"
        if self.journal is not None:
            return "off (durable: every change is journaled)"
        if not fastpath.AVAILABLE:
            return "off (rdzv.server._fastpath is not built; reinstall with a C compiler)"
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
        if self._lease_timer is not None:
            self._lease_timer.cancel()
            self._lease_timer = None
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
    def _backed_up(self, conn: Connection, more: int = 0) -> None:
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

    def _drained(self, conn: Connection) -> None:
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

    def _refuse_write(self, conn: Connection, req: Request) -> None:
        """Answer a write while :attr:`read_only`: an error reply where the protocol has one
        (rdzv's extensions), else close the connection (torch's writes have no error)."""
        reason = self.read_only
        assert reason is not None
        if conn.handlers is not HANDLERS:
            conn.handlers[req.op](self, conn, req)  # not authenticated: refused as such
        elif req.op in EXT_WRITE_OPS:
            conn.send_stateless(wire.reply_ext_error(wire.ErrorCode.STORE, reason))
        else:
            raise Close(f"refused {req.op.name}: {reason}")

    def _sync(self) -> None:
        self._sync_timer = None
        journal = self.journal
        if journal is not None:
            try:
                journal.sync()
            except OSError as exc:
                self._enter_read_only(journal, exc)

    # ------------------------------------------------------------------ partial requests
    def _track_partial(self, conn: Connection, completed: bool) -> None:
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

    def _forget_partial(self, conn: Connection) -> None:
        if conn.partial:
            self._partial_total -= conn.partial
            conn.partial = 0
        self._partial.pop(conn, None)

    def _partial_expired(self, conn: Connection) -> None:
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

    def _shed_partial(self, current: Connection) -> None:
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
    def check_waits(self, conn: Connection, keys: int) -> None:
        """Raise Close if parking one more wait on ``keys`` keys would pass a limit."""
        limit = self.max_waits_per_connection
        if limit is not None and len(conn.waiters) >= limit:
            self.stats.limit_hit("max_waits_per_connection")
            raise Close(
                f"pending-wait limit exceeded ({limit} parked waits on this connection; "
                f"max_waits_per_connection={limit})"
            )
        limit = self.max_wait_keys_per_connection
        if limit is not None and conn.wait_keys + keys > limit:
            self.stats.limit_hit("max_wait_keys_per_connection")
            raise Close(
                f"parked-wait key limit exceeded (a wait on {keys} keys with {conn.wait_keys} "
                f"parked on this connection; max_wait_keys_per_connection={limit})"
            )

    def release(self, conn: Connection) -> None:
        """Drop every parked wait of ``conn`` (they never reply). Their keys are
        unregistered :data:`RELEASE_KEYS` per loop iteration, so that dropping waits on
        many keys does not stall the other connections."""
        if not conn.waiters:
            return
        for waiter in conn.waiters:
            waiter.owner = None  # fired or not, no reply any more (see _reply_to)
            if waiter.kind == QUEUE_POP:
                # At once: a push must not pop an item for a connection that is gone.
                self.engine.cancel(waiter)
            else:
                self._releasing.append(waiter)
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

    def on_fire(self, waiter: Waiter) -> None:
        # Engine callback: must not re-enter the engine, so defer the work to _drain, which
        # the connection runs right after the current request.
        self._fired.append(waiter)

    def _drain(self) -> None:
        """Reply to every waiter the last operation released."""
        fired = self._fired
        while fired:
            batch = fired[:]
            fired.clear()
            for waiter in batch:
                self._reply_to(waiter)

    def _reply_to(self, waiter: Waiter) -> None:
        if waiter.owner is None:
            return  # dropped (connection closed, CANCEL_WAIT) while it was being released
        conn, kind = cast(tuple[Connection, int], waiter.owner)
        conn.wait_keys -= conn.waiters.pop(waiter, 0)
        if not conn._closed:
            conn.send(wait_reply(kind, waiter.result))
            if not conn.waiters:
                conn.refresh()  # its next requests may take the fast path again

    # ------------------------------------------------------------------ bound keys, leases
    def set_lease(self, key: bytes, value: bytes, ttl: float) -> None:
        """Set ``key`` to ``value``, deleted after ``ttl`` seconds unless set again (the
        engine holds the lease; this server's timer tells it the time)."""
        loop = asyncio.get_running_loop()
        self.engine.set_lease(key, value, loop.time() + ttl)
        self._arm_lease_timer(loop)

    def owner_closed(self, conn: Connection) -> None:
        """``conn`` closed: the engine deletes the keys bound to it."""
        keys = self.engine.owner_closed(conn)
        if keys:
            logger.debug("deleted %d ephemeral keys of %s", len(keys), conn.peer)
            if self.journal is not None and self.journal.dirty:
                self._schedule_commit()

    def _arm_lease_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        """Have the lease timer fire at the engine's next lease deadline (if any)."""
        deadline = self.engine.next_deadline()
        timer = self._lease_timer
        if timer is not None:
            if deadline is not None and self._lease_timer_at <= deadline:
                return  # fires in time (at worst early: it re-arms then)
            timer.cancel()
            self._lease_timer = None
        if deadline is not None:
            self._lease_timer_at = deadline
            self._lease_timer = loop.call_at(deadline, self._expire_leases, loop)

    def _expire_leases(self, loop: asyncio.AbstractEventLoop) -> None:
        self._lease_timer = None
        # A timer may fire a little before its time (uvloop's tick is a millisecond).
        keys = self.engine.expire(loop.time() + LEASE_TIMER_SLACK)
        if keys:
            logger.debug("leases of %d keys expired", len(keys))
            if self.journal is not None:
                self._schedule_commit()
        self._arm_lease_timer(loop)
